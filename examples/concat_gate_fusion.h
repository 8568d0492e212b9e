#pragma once
// A fusion module of your own, complete: each branch's channels are gated by a sigmoid of
// the concatenated squeeze vectors of every branch (no joint layer, unlike MMTM). Copy it
// and change `forward`; docs/concepts.md walks through it.
//
//   using Net = mmbalance::MultiModalNet<mmbalance::ConvBranch, mmbalance::ConvBranch, ConcatGate>;
//   Net net(branch0, branch1, {{1, ConcatGate(64, 64)}, {2, ConcatGate(128, 128)}});

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <mmbalance/mmbalance.h>

class ConcatGateImpl : public torch::nn::Cloneable<ConcatGateImpl> {
 public:
  // The channel count of each branch at the tap, in branch order.
  explicit ConcatGateImpl(std::vector<std::int64_t> dims) : dims_(std::move(dims)) { reset(); }
  ConcatGateImpl(std::int64_t dim0, std::int64_t dim1) : ConcatGateImpl(std::vector{dim0, dim1}) {}

  void reset() override {
    const std::int64_t all = std::accumulate(dims_.begin(), dims_.end(), std::int64_t{0});
    gates.clear();
    for (std::size_t k = 0; k < dims_.size(); ++k) {
      gates.push_back(register_module("gate" + std::to_string(k), torch::nn::Linear(all, dims_[k])));
    }
    // Before any regular step a re-balancing step holds the gate at sigmoid(0) = 0.5.
    gate_mean = register_module("gate_mean", mmbalance::RunningMean(all, 0.5));
    squeeze_mean = register_module("squeeze_mean", mmbalance::RunningMean(all));
  }

  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& x,
                                  const mmbalance::FusionContext& ctx = {}) {
    using mmbalance::SideMode;
    const std::size_t n = dims_.size();
    std::size_t present = 0;
    while (ctx.side(present) == SideMode::absent) ++present;
    // Each side's squeeze vector; a missing modality's is its training-set average (the
    // running means are double whatever the model's dtype).
    std::vector<at::Tensor> s(n);
    for (std::size_t k = 0; k < n; ++k) {
      s[k] = ctx.side(k) == SideMode::absent ? average(squeeze_mean, k, x[present])
                                             : x[k].flatten(2).mean(-1);
    }
    // The utilization probe's pass over the training set.
    if (ctx.record_squeeze) squeeze_mean->stage(at::cat(s, 1).detach());
    std::vector<at::Tensor> g(n), out(n);
    for (std::size_t k = 0; k < n; ++k) {
      if (ctx.side(k) == SideMode::absent) continue;
      // The probe's cut network: side k's gate sees every other side's average.
      std::vector<at::Tensor> seen = s;
      for (std::size_t j = 0; ctx.side(k) == SideMode::averaged_squeeze && j < n; ++j) {
        if (j != k) seen[j] = average(squeeze_mean, j, x[k]);
      }
      g[k] = torch::sigmoid(gates[k](at::cat(seen, 1)));
    }
    // A regular training step: the balancer commits these if it accepts the step.
    if (ctx.stage_gates) gate_mean->stage(at::cat(g, 1).detach());
    for (std::size_t k = 0; k < n; ++k) {
      if (ctx.side(k) == SideMode::absent) continue;
      // A re-balancing step: the held side gets the average gate of the regular steps.
      if (ctx.side(k) == SideMode::held_gate) g[k] = average(gate_mean, k, x[k]);
      out[k] = x[k] * per_channel(g[k], x[k]);
    }
    return out;
  }

  std::size_t num_inputs() const { return dims_.size(); }
  std::int64_t channels(std::size_t side) const { return dims_.at(side); }

  // The parameters on the path into `side` (θ_side'): that side's gate layer.
  std::vector<at::Tensor> side_parameters(std::size_t side) const {
    return gates.at(side)->parameters();
  }

  std::vector<torch::nn::Linear> gates;
  mmbalance::RunningMean gate_mean{nullptr}, squeeze_mean{nullptr};

 private:
  // Side k's part of `mean`, one row for each of x's samples, in x's dtype.
  at::Tensor average(const mmbalance::RunningMean& mean, std::size_t k, const at::Tensor& x) const {
    const std::int64_t start = std::accumulate(dims_.begin(), dims_.begin() + k, std::int64_t{0});
    return mean->mean.narrow(0, start, dims_[k]).to(x.dtype()).unsqueeze(0).expand({x.size(0), -1});
  }

  // (batch, channels) -> (batch, channels, 1, ...) to scale x's channels.
  static at::Tensor per_channel(const at::Tensor& gate, const at::Tensor& x) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
    shape[0] = gate.size(0);
    shape[1] = gate.size(1);
    return gate.reshape(shape);
  }

  std::vector<std::int64_t> dims_;
};
TORCH_MODULE(ConcatGate);
