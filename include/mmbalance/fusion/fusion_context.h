#pragma once
/// \file
/// How a fusion module treats each side in one forward pass.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mmbalance {

/// What feeds the gate a fusion module applies to one branch.
enum class SideMode : std::uint8_t {
  /// The gate is computed from every branch's current activations.
  live,
  /// Re-balancing step: the gate is replaced by its running average over the samples of
  /// earlier regular training steps, so this branch gets no information from the other
  /// modality (docs/algorithm.md §5).
  held_gate,
  /// Utilization probe: the gate is computed from this branch's own squeeze vector and
  /// every *other* branch's training-set average squeeze vector (docs/algorithm.md §7).
  averaged_squeeze,
  /// Missing modality: this side has no input and no
  /// output; every other side's gate reads this side's training-set average squeeze
  /// vector in its place (a sensor that dropped out at inference).
  absent,
};

/// Passed by the network to every fusion module in one forward pass.
struct FusionContext {
  /// The mode of each side, in branch order; empty means every side is live.
  std::vector<SideMode> sides;
  /// Only for modules that declare `static constexpr bool handles_live_rows = true`: the
  /// leading `live_rows` rows of the batch run live on every side whatever the side modes
  /// say (the probe stacks [x; x] and gets the normal and the cut network from one pass).
  /// Always 0 for other modules.
  std::int64_t live_rows = 0;
  /// A regular step in training mode (every side live): stage this batch's gates into the
  /// gate mean (the balancer commits them if it accepts the step).
  bool stage_gates = false;
  /// The probe's pass over the training set: stage this batch's squeeze vectors into the
  /// squeeze mean (the probe commits them).
  bool record_squeeze = false;

  /// The mode of side `k` (live when `sides` is empty).
  SideMode side(std::size_t k) const { return sides.empty() ? SideMode::live : sides.at(k); }
};

using NWayFusionContext [[deprecated("use FusionContext")]] = FusionContext;

}  // namespace mmbalance
