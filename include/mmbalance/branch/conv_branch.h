#pragma once
/// \file
/// A configurable convolutional branch: blocks of Conv -> (BatchNorm) -> ReLU, then a
/// global-average-pool + linear head.

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
#include <torch/nn/modules/activation.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/branch/branch.h"
#include "mmbalance/detail/check.h"

namespace mmbalance {

/// Options for `ConvBranch`.
///
/// Example (a colored-MNIST branch for 3-channel input):
/// ```
/// ConvBranch branch(ConvBranchOptions(3, 10)
///                       .channels({32, 64, 128, 128})
///                       .strides({1, 2, 2, 2}));
/// ```
struct ConvBranchOptions {
  ConvBranchOptions(std::int64_t in_channels, std::int64_t num_classes)
      : in_channels_(in_channels), num_classes_(num_classes) {}
  TORCH_ARG(std::int64_t, in_channels);
  TORCH_ARG(std::int64_t, num_classes);
  /// Output channels of each stage; one stage per entry.
  TORCH_ARG(std::vector<std::int64_t>, channels) = std::vector<std::int64_t>{32, 64, 128, 128};
  /// Stride of each stage's convolution; same length as `channels`.
  TORCH_ARG(std::vector<std::int64_t>, strides) = std::vector<std::int64_t>{1, 2, 2, 2};
  /// Odd kernel size; padding keeps the spatial size (before the stride).
  TORCH_ARG(std::int64_t, kernel_size) = 3;
  /// BatchNorm after each convolution (the Colored-MNIST network does not train without it
  /// at lr 0.01; an independent reimplementation of the paper found the same).
  TORCH_ARG(bool, batch_norm) = true;
  /// 2: images (batch, channels, height, width); 3: clips (batch, channels, time, height,
  /// width) with 3-d convolutions, strides applying to time as well.
  TORCH_ARG(std::int64_t, spatial_dims) = 2;
};

/// A stack of 2-d (or 3-d) convolution stages and a classifier head; satisfies `Branch`.
class ConvBranchImpl : public torch::nn::Cloneable<ConvBranchImpl> {
 public:
  explicit ConvBranchImpl(const ConvBranchOptions& options) : options(options) { reset(); }

  void reset() override {
    const auto& ch = options.channels();
    TORCH_CHECK(!ch.empty(), "ConvBranch: needs at least one stage (channels is empty)");
    TORCH_CHECK(options.strides().size() == ch.size(), "ConvBranch: ", ch.size(),
                " stage channel counts but ", options.strides().size(), " strides");
    TORCH_CHECK(options.kernel_size() > 0 && options.kernel_size() % 2 == 1,
                "ConvBranch: kernel_size must be odd and positive, got ", options.kernel_size());
    TORCH_CHECK(options.spatial_dims() == 2 || options.spatial_dims() == 3,
                "ConvBranch: spatial_dims must be 2 (images) or 3 (clips), got ",
                options.spatial_dims());
    TORCH_CHECK(options.in_channels() > 0 && options.num_classes() > 0,
                "ConvBranch: in_channels and num_classes must be positive, got ",
                options.in_channels(), " and ", options.num_classes());
    stages.clear();
    std::int64_t in = options.in_channels();
    for (std::size_t i = 0; i < ch.size(); ++i) {
      TORCH_CHECK(ch[i] > 0 && options.strides()[i] > 0, "ConvBranch: stage ", i,
                  " has channels=", ch[i], " stride=", options.strides()[i]);
      torch::nn::Sequential stage;
      const std::int64_t k = options.kernel_size(), stride = options.strides()[i];
      if (options.spatial_dims() == 2) {
        stage->push_back(torch::nn::Conv2d(
            torch::nn::Conv2dOptions(in, ch[i], k).stride(stride).padding(k / 2)));
        if (options.batch_norm()) stage->push_back(torch::nn::BatchNorm2d(ch[i]));
      } else {
        stage->push_back(torch::nn::Conv3d(
            torch::nn::Conv3dOptions(in, ch[i], k).stride(stride).padding(k / 2)));
        if (options.batch_norm()) stage->push_back(torch::nn::BatchNorm3d(ch[i]));
      }
      stage->push_back(torch::nn::ReLU());
      stages.push_back(register_module("stage" + std::to_string(i), stage));
      in = ch[i];
    }
    classifier = register_module("classifier", torch::nn::Linear(in, options.num_classes()));
  }

  std::size_t num_stages() const { return stages.size(); }

  std::int64_t stage_channels(std::size_t i) const {
    TORCH_CHECK(i < stages.size(), "ConvBranch: stage ", i, " out of range (", stages.size(),
                " stages)");
    return options.channels()[i];
  }

  at::Tensor forward_stage(std::size_t i, const at::Tensor& x) {
    TORCH_CHECK(i < stages.size(), "ConvBranch: stage ", i, " out of range (", stages.size(),
                " stages)");
    if (i == 0) {
      TORCH_CHECK(x.dim() == 2 + options.spatial_dims() && x.size(1) == options.in_channels(),
                  "ConvBranch: expected input (batch, ", options.in_channels(),
                  options.spatial_dims() == 3 ? ", time" : "", ", height, width), got ",
                  detail::shape_string(x));
    }
    return stages[i]->forward(x);
  }

  /// Global average pool (over space, and time for clips) and linear classifier.
  at::Tensor head(const at::Tensor& x) { return classifier->forward(x.flatten(2).mean(-1)); }

  /// The whole branch on its own (no fusion).
  at::Tensor forward(at::Tensor x) {
    for (std::size_t i = 0; i < stages.size(); ++i) x = forward_stage(i, x);
    return head(x);
  }

  ConvBranchOptions options;
  std::vector<torch::nn::Sequential> stages;
  torch::nn::Linear classifier{nullptr};
};

/// A `ModuleHolder` for `ConvBranchImpl`.
TORCH_MODULE(ConvBranch);

static_assert(Branch<ConvBranch>);

}  // namespace mmbalance
