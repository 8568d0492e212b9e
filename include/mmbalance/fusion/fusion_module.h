#pragma once
/// \file
/// The `FusionModule` concept: what `MultiModalNet` needs from an intermediate-fusion
/// module placed between the two branches.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/running_mean.h"

namespace mmbalance {

/// A fusion module handle (a `torch::nn::ModuleHolder`, e.g. `MMTM`) whose module has:
/// - `forward(a, b, ctx)`: the rescaled activations of branch 0 and branch 1, with each
///   side fed as `ctx.side0` / `ctx.side1` say (`SideMode`), staging its gates into
///   `gate_mean` when `ctx.stage_gates` and its squeeze vectors into `squeeze_mean` when
///   `ctx.record_squeeze`;
/// - `channels(side)`: the channel count it expects from `side` (0 or 1);
/// - `side_parameters(side)`: the parameters on the path into `side`, which is how θ0'
///   and θ1' are derived from structure (docs/algorithm.md §3); parameters shared by both
///   paths appear in both lists;
/// - `gate_mean`, `squeeze_mean`: its two `RunningMean`s (registered submodules);
/// - `clone()`, as any `torch::nn::Cloneable` has.
/// Optional: `static constexpr bool handles_live_rows = true` if it honours
/// `FusionContext::live_rows` (the probe then needs one stacked pass instead of two).
/// docs/concepts.md shows a complete user-written fusion module.
template <class F>
concept FusionModule = requires(F& f, const at::Tensor& a, const at::Tensor& b,
                                const FusionContext& ctx, int side) {
  typename F::ContainedType;
  { f->forward(a, b, ctx) } -> std::same_as<std::pair<at::Tensor, at::Tensor>>;
  { f->channels(side) } -> std::convertible_to<std::int64_t>;
  { f->side_parameters(side) } -> std::same_as<std::vector<at::Tensor>>;
  { f->gate_mean } -> std::convertible_to<RunningMean>;
  { f->squeeze_mean } -> std::convertible_to<RunningMean>;
  { f->clone() };
};

/// An N-way fusion module handle (e.g. `NWayMMTM`): `FusionModule` for any number of
/// branches. Its module has:
/// - `forward(inputs, ctx)`: the rescaled activations of every branch, in branch order,
///   with side k fed as `ctx.side(k)` says (`NWayFusionContext`), staging gates and
///   squeeze vectors as a `FusionModule` does; a side in `SideMode::absent` (a missing
///   modality, `NWayMultiModalNet::forward_missing`) gets an undefined input, whose
///   place in the other sides' gates the module fills (NWayMMTM: the training-set average
///   squeeze), and gives an undefined output;
/// - `num_inputs()`: how many branches it joins;
/// - `channels(k)`, `side_parameters(k)`, `gate_mean`, `squeeze_mean`, `clone()`: as for
///   `FusionModule`, for side k in 0..num_inputs()-1.
/// Optional: `handles_live_rows`, as for `FusionModule`.
template <class F>
concept NWayFusionModule = requires(F& f, const std::vector<at::Tensor>& inputs,
                                    const NWayFusionContext& ctx, std::size_t side) {
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
