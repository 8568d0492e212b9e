#pragma once
/// \file
/// A ResNet-style branch (basic blocks, as ResNet18/34) exposing its residual stages, for
/// taps such as the paper's ModelNet40 setup (MMTMs after the last three stages).

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/branch/branch.h"
#include "mmbalance/detail/check.h"

namespace mmbalance {

/// Options for `ResNetBranch`.
///
/// Example (ResNet18 on RGB views, 40 classes):
/// ```
/// ResNetBranch branch(ResNetBranchOptions(3, 40).blocks({2, 2, 2, 2}).widths({64, 128, 256, 512}));
/// ```
struct ResNetBranchOptions {
  ResNetBranchOptions(std::int64_t in_channels, std::int64_t num_classes)
      : in_channels_(in_channels), num_classes_(num_classes) {}
  TORCH_ARG(std::int64_t, in_channels);
  TORCH_ARG(std::int64_t, num_classes);
  /// Basic blocks per residual stage ({2, 2, 2, 2}: ResNet18; {3, 4, 6, 3}: ResNet34).
  TORCH_ARG(std::vector<std::int64_t>, blocks) = std::vector<std::int64_t>{2, 2, 2, 2};
  /// Output channels per residual stage; stages after the first halve the resolution.
  TORCH_ARG(std::vector<std::int64_t>, widths) = std::vector<std::int64_t>{64, 128, 256, 512};
  /// ImageNet stem (7x7 stride-2 convolution and 3x3 max-pool); false: one 3x3 stride-1
  /// convolution, for small images.
  TORCH_ARG(bool, imagenet_stem) = true;
};

/// conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, then ReLU.
class BasicBlockImpl : public torch::nn::Cloneable<BasicBlockImpl> {
 public:
  BasicBlockImpl(std::int64_t in, std::int64_t out, std::int64_t stride)
      : in_(in), out_(out), stride_(stride) {
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    conv1 = register_module("conv1", Conv2d(Conv2dOptions(in_, out_, 3).stride(stride_).padding(1).bias(false)));
    bn1 = register_module("bn1", BatchNorm2d(out_));
    conv2 = register_module("conv2", Conv2d(Conv2dOptions(out_, out_, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", BatchNorm2d(out_));
    if (stride_ != 1 || in_ != out_) {
      downsample = register_module(
          "downsample", Sequential(Conv2d(Conv2dOptions(in_, out_, 1).stride(stride_).bias(false)),
                                   BatchNorm2d(out_)));
    }
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = at::relu(bn1->forward(conv1->forward(x)));
    y = bn2->forward(conv2->forward(y));
    return at::relu(y + (downsample ? downsample->forward(x) : x));
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Sequential downsample{nullptr};

 private:
  std::int64_t in_, out_, stride_;
};
TORCH_MODULE(BasicBlock);

/// Stem + residual stages + global-average-pool and linear head; satisfies `Branch`.
/// Stage 0 is the stem followed by the first residual stage, so stage i ends where
/// torchvision's `layer{i+1}` ends.
class ResNetBranchImpl : public torch::nn::Cloneable<ResNetBranchImpl> {
 public:
  explicit ResNetBranchImpl(const ResNetBranchOptions& options) : options(options) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& blocks = options.blocks();
    const auto& widths = options.widths();
    TORCH_CHECK(!blocks.empty() && blocks.size() == widths.size(), "ResNetBranch: ",
                blocks.size(), " stage block counts but ", widths.size(), " widths");
    TORCH_CHECK(options.in_channels() > 0 && options.num_classes() > 0,
                "ResNetBranch: in_channels and num_classes must be positive");
    stem = Sequential();
    if (options.imagenet_stem()) {
      stem->push_back(Conv2d(Conv2dOptions(options.in_channels(), widths[0], 7).stride(2).padding(3).bias(false)));
      stem->push_back(BatchNorm2d(widths[0]));
      stem->push_back(ReLU());
      stem->push_back(MaxPool2d(MaxPool2dOptions(3).stride(2).padding(1)));
    } else {
      stem->push_back(Conv2d(Conv2dOptions(options.in_channels(), widths[0], 3).padding(1).bias(false)));
      stem->push_back(BatchNorm2d(widths[0]));
      stem->push_back(ReLU());
    }
    register_module("stem", stem);
    stages.clear();
    std::int64_t in = widths[0];
    for (std::size_t s = 0; s < blocks.size(); ++s) {
      TORCH_CHECK(blocks[s] > 0 && widths[s] > 0, "ResNetBranch: stage ", s, " has ",
                  blocks[s], " blocks of width ", widths[s]);
      Sequential stage;
      for (std::int64_t b = 0; b < blocks[s]; ++b) {
        stage->push_back(BasicBlock(b == 0 ? in : widths[s], widths[s], (b == 0 && s > 0) ? 2 : 1));
      }
      stages.push_back(register_module("layer" + std::to_string(s + 1), stage));
      in = widths[s];
    }
    classifier = register_module("classifier", Linear(in, options.num_classes()));
  }

  std::size_t num_stages() const { return stages.size(); }

  std::int64_t stage_channels(std::size_t i) const {
    TORCH_CHECK(i < stages.size(), "ResNetBranch: stage ", i, " out of range (", stages.size(),
                " stages)");
    return options.widths()[i];
  }

  at::Tensor forward_stage(std::size_t i, const at::Tensor& x) {
    TORCH_CHECK(i < stages.size(), "ResNetBranch: stage ", i, " out of range (", stages.size(),
                " stages)");
    if (i == 0) {
      TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(),
                  "ResNetBranch: expected input (batch, ", options.in_channels(),
                  ", height, width), got ", detail::shape_string(x));
      return stages[0]->forward(stem->forward(x));
    }
    return stages[i]->forward(x);
  }

  at::Tensor head(const at::Tensor& x) { return classifier->forward(x.mean({2, 3})); }

  at::Tensor forward(at::Tensor x) {
    for (std::size_t i = 0; i < stages.size(); ++i) x = forward_stage(i, x);
    return head(x);
  }

  ResNetBranchOptions options;
  torch::nn::Sequential stem{nullptr};
  std::vector<torch::nn::Sequential> stages;
  torch::nn::Linear classifier{nullptr};
};

/// A `ModuleHolder` for `ResNetBranchImpl`.
TORCH_MODULE(ResNetBranch);

static_assert(Branch<ResNetBranch>);

}  // namespace mmbalance
