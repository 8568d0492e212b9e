#pragma once
/// \file
/// The `Branch` concept: one uni-modal network, split into stages so that fusion modules
/// can be tapped in after any stage.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace mmbalance {

/// A branch handle (a `torch::nn::ModuleHolder`) whose module:
/// - `num_stages()` is the number of stages;
/// - `forward_stage(i, x)` runs stage `i` on the output of stage `i - 1` (or the input);
/// - `stage_channels(i)` is the channel count (dimension 1) of stage `i`'s output;
/// - `head(x)` maps the last stage's output to class logits;
/// - `clone()` deep-copies it.
/// Every parameter of the module belongs to the branch's group θ (docs/algorithm.md §3).
/// A ResNet, say, satisfies it by exposing its residual stages.
template <class B>
concept Branch = requires(B& b, const at::Tensor& x, std::size_t i) {
  typename B::ContainedType;
  { b->num_stages() } -> std::convertible_to<std::size_t>;
  { b->stage_channels(i) } -> std::convertible_to<std::int64_t>;
  { b->forward_stage(i, x) } -> std::same_as<at::Tensor>;
  { b->head(x) } -> std::same_as<at::Tensor>;
  { b->parameters() };
  { b->clone() };
};

}  // namespace mmbalance
