#pragma once
// A branch of your own, complete: 1-d convolution stages for signals shaped
// (batch, channels, time) (audio features, sensor channels, ECG leads), each stage halving
// the time axis, and a head that averages over time. Fusion modules (MMTM) tap in after any
// stage: they average a stage's output over every axis after the channels, so any
// (batch, channels, ...) layout works. Copy it and change the stages; docs/concepts.md
// walks through it.
//
//   SignalBranch imu(SignalBranchOptions(6, 5).channels({16, 32}));   // 6 sensor channels, 5 classes
//   SignalBranch ecg(SignalBranchOptions(2, 5).channels({8, 32}));
//   mmbalance::MultiModalNet<SignalBranch, SignalBranch, mmbalance::MMTM> net(
//       imu, ecg, {{1, mmbalance::MMTM(32, 32)}});

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

struct SignalBranchOptions {
  SignalBranchOptions(std::int64_t in_channels, std::int64_t num_classes)
      : in_channels_(in_channels), num_classes_(num_classes) {}
  TORCH_ARG(std::int64_t, in_channels);
  TORCH_ARG(std::int64_t, num_classes);
  TORCH_ARG(std::vector<std::int64_t>, channels) = {16, 32};  // one stage each
  TORCH_ARG(std::int64_t, kernel_size) = 5;                    // odd: the padding keeps T / 2
};

class SignalBranchImpl : public torch::nn::Cloneable<SignalBranchImpl> {
 public:
  explicit SignalBranchImpl(SignalBranchOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    TORCH_CHECK(!options.channels().empty() && options.kernel_size() % 2 == 1,
                "SignalBranch: needs at least one stage and an odd kernel size");
    stages.clear();
    std::int64_t in = options.in_channels();
    for (std::size_t i = 0; i < options.channels().size(); ++i) {
      const std::int64_t out = options.channels()[i];
      const auto conv = torch::nn::Conv1dOptions(in, out, options.kernel_size())
                            .stride(2).padding(options.kernel_size() / 2).bias(false);
      stages.push_back(register_module(
          "stage" + std::to_string(i),
          torch::nn::Sequential(torch::nn::Conv1d(conv), torch::nn::BatchNorm1d(out), torch::nn::ReLU())));
      in = out;
    }
    classifier = register_module("classifier", torch::nn::Linear(in, options.num_classes()));
  }

  // The four members a branch needs (mmbalance::Branch), besides clone().
  std::size_t num_stages() const { return stages.size(); }
  std::int64_t stage_channels(std::size_t i) const { return options.channels().at(i); }
  at::Tensor forward_stage(std::size_t i, const at::Tensor& x) {
    TORCH_CHECK(i > 0 || (x.dim() == 3 && x.size(1) == options.in_channels()),
                "SignalBranch: input must be (batch, ", options.in_channels(), ", time), got ", x.sizes());
    return stages.at(i)->forward(x);
  }
  at::Tensor head(const at::Tensor& x) { return classifier(x.mean(-1)); }

  SignalBranchOptions options;
  std::vector<torch::nn::Sequential> stages;
  torch::nn::Linear classifier{nullptr};
};
TORCH_MODULE(SignalBranch);
