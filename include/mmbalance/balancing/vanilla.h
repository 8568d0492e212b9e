#pragma once
/// \file
/// Vanilla training: regular steps only (d_speed is still measured), for any number of
/// branches.

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"

namespace mmbalance {

struct VanillaPolicy {
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.vanilla", 1};
  StepPlan next_plan() const { return StepPlan::regular(); }
};
template <>
inline constexpr bool detail::kLibraryPolicy<VanillaPolicy> = true;

static_assert(BalancingPolicy<VanillaPolicy> && !HoldsFusionGates<VanillaPolicy>);

}  // namespace mmbalance
