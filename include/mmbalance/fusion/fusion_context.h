#pragma once
/// \file
/// How a fusion module treats each side in one forward pass.

#include <cstdint>

namespace mmbalance {

/// What feeds the gate a fusion module applies to one branch.
enum class SideMode : std::uint8_t {
  /// The gate is computed from both branches' current activations.
  live,
  /// Re-balancing step: the gate is replaced by its running average over the samples of
  /// earlier regular training steps, so this branch gets no information from the other
  /// modality (algorithm.md §5).
  held_gate,
  /// Utilization probe: the gate is computed from this branch's own squeeze vector and
  /// the *other* branch's training-set average squeeze vector (algorithm.md §7).
  averaged_squeeze,
};

/// Passed by `MultiModalNet` to every fusion module in one forward pass.
struct FusionContext {
  SideMode side0 = SideMode::live;
  SideMode side1 = SideMode::live;
  /// The leading `live_rows` rows of the batch run live on both sides whatever the
  /// side modes say: the probe stacks [x; x] and gets the normal and the cut network
  /// from one pass.
  std::int64_t live_rows = 0;
  /// Regular step in training mode: fold this batch's gates into the running averages.
  bool update_gate_average = false;
  /// With `update_gate_average`: keep this batch's gate sums pending instead of folding
  /// them in (distributed training folds the sums of all ranks after the step).
  bool defer_gate_update = false;
  /// Utilization probe's pass over the training set: fold this batch's squeeze vectors
  /// into the squeeze averages.
  bool record_squeeze = false;
};

}  // namespace mmbalance
