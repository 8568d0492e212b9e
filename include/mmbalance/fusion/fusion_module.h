#pragma once
/// \file
/// The `FusionModule` concept: what `MultiModalNet` needs from an intermediate-fusion
/// module placed between the two branches.

#include <concepts>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "mmbalance/fusion/fusion_context.h"

namespace mmbalance {

/// A fusion module handle (a `torch::nn::ModuleHolder`, e.g. `MMTM`) whose module:
/// - `forward(a, b, ctx)` returns the rescaled activations of branch 0 and branch 1;
/// - `channels(side)` gives the channel count it expects from `side` (0 or 1);
/// - `side_parameters(side)` lists the parameters on the path into `side`, which is how
///   θ0' and θ1' are derived from structure (algorithm.md §3); parameters shared by both
///   paths appear in both lists;
/// - `reset_squeeze_average()` / `squeeze_average_samples()` manage the training-set
///   squeeze averages the utilization probe records;
/// - `discard_last_gate_update()` undoes the running-average update of the last regular
///   step (the balancer calls it when it rejects a step);
/// - `clone()` deep-copies it, as for any `torch::nn::Cloneable`.
template <class F>
concept FusionModule = requires(F& f, const at::Tensor& a, const at::Tensor& b,
                                const FusionContext& ctx, int side) {
  typename F::ContainedType;
  { f->forward(a, b, ctx) } -> std::same_as<std::pair<at::Tensor, at::Tensor>>;
  { f->channels(side) } -> std::convertible_to<std::int64_t>;
  { f->side_parameters(side) } -> std::same_as<std::vector<at::Tensor>>;
  { f->reset_squeeze_average() };
  { f->squeeze_average_samples() } -> std::convertible_to<std::int64_t>;
  { f->discard_last_gate_update() };
  { f->clone() };
};

/// A `FusionModule` whose running averages can be combined across data-parallel ranks:
/// - `take_pending_gate_sums()` returns (and clears) the gate sums of the regular steps
///   run with `FusionContext::defer_gate_update`, zeros if none, always of one size;
/// - `fold_gate_sums(sums)` folds such sums (added up over ranks) into the gate averages;
/// - `squeeze_sums()` / `set_squeeze_sums(sums)` read and write the squeeze averages as
///   sums that add up over ranks.
template <class F>
concept DistributedFusionModule = FusionModule<F> && requires(F& f, const at::Tensor& t) {
  { f->take_pending_gate_sums() } -> std::same_as<at::Tensor>;
  { f->fold_gate_sums(t) };
  { f->squeeze_sums() } -> std::same_as<at::Tensor>;
  { f->set_squeeze_sums(t) };
};

}  // namespace mmbalance
