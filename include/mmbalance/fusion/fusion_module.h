#pragma once
/// \file
/// The `FusionModule` concept: what `MultiModalNet` needs from an intermediate-fusion
/// module placed between its branches.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/running_mean.h"

namespace mmbalance {

/// A fusion module handle (a `torch::nn::ModuleHolder`, e.g. `MMTM`) whose module has:
/// - `forward(inputs, ctx)`: the rescaled activations of every branch, in branch order,
///   with side k fed as `ctx.side(k)` says (`SideMode`), staging its gates into
///   `gate_mean` when `ctx.stage_gates` and its squeeze vectors into `squeeze_mean` when
///   `ctx.record_squeeze`; a side in `SideMode::absent` (a missing modality,
///   `MultiModalNet::forward_missing`) gets an undefined input, whose place in the other
///   sides' gates the module fills (MMTM: the training-set average squeeze), and gives an
///   undefined output;
/// - `num_inputs()`: how many branches it joins;
/// - `channels(k)`: the channel count it expects from branch k;
/// - `side_parameters(k)`: the parameters on the path into branch k, which is how θ_k' is
///   derived from structure (docs/algorithm.md §3); parameters shared by several paths
///   appear in each of their lists;
/// - `gate_mean`, `squeeze_mean`: its two `RunningMean`s (registered submodules);
/// - `clone()`, as any `torch::nn::Cloneable` has.
/// Optional: `static constexpr bool handles_live_rows = true` if it honours
/// `FusionContext::live_rows` (the probe then needs one stacked pass instead of two).
/// docs/concepts.md shows a complete user-written fusion module.
template <class F>
concept FusionModule = requires(F& f, const std::vector<at::Tensor>& inputs,
                                const FusionContext& ctx, std::size_t side) {
  typename F::ContainedType;
  { f->forward(inputs, ctx) } -> std::same_as<std::vector<at::Tensor>>;
  { f->num_inputs() } -> std::convertible_to<std::size_t>;
  { f->channels(side) } -> std::convertible_to<std::int64_t>;
  { f->side_parameters(side) } -> std::same_as<std::vector<at::Tensor>>;
  { f->gate_mean } -> std::convertible_to<RunningMean>;
  { f->squeeze_mean } -> std::convertible_to<RunningMean>;
  { f->clone() };
};

namespace detail {
/// The running mean `pick(module)` of every tap's fusion module, in tap order.
template <class Taps, class Pick>
std::vector<RunningMean> tap_means(const Taps& taps, Pick pick) {
  std::vector<RunningMean> out;
  for (const auto& tap : taps) out.push_back(pick(*tap.module));
  return out;
}
}  // namespace detail

/// Whether fusion module `F` declares that it honours `FusionContext::live_rows`.
template <class F>
constexpr bool handles_live_rows() {
  if constexpr (requires { F::ContainedType::handles_live_rows; }) {
    return F::ContainedType::handles_live_rows;
  } else {
    return false;
  }
}

}  // namespace mmbalance
