#pragma once
/// \file
/// Plain training, for any number of branches: regular steps only (d_speed is still
/// measured), on the modality-specific loss (`VanillaPolicy`, the greedy-learning paper's
/// baseline) or on the fused output's loss (`JointTrainingPolicy`, the field's).

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/model/loss.h"

namespace mmbalance {

/// Σ_k CE(head_k), every step regular: the greedy-learning paper's vanilla training (a
/// loop may form the loss itself with `modality_specific_loss`).
struct VanillaPolicy {
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.vanilla", 1};
  StepPlan next_plan() const { return StepPlan::regular(); }
};

/// CE(y) of the fused output alone, every step regular: joint training, the baseline the
/// field's other methods were designed against. Form the loss with `balancer.loss(out,
/// target)` (`observe` refuses one that was not).
struct JointTrainingPolicy {
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.joint_training", 1};
  static constexpr Objective objective = Objective::fused;
  StepPlan next_plan() const { return StepPlan::regular(); }
};

template <>
inline constexpr bool detail::kLibraryPolicy<VanillaPolicy> = true;
template <>
inline constexpr bool detail::kLibraryPolicy<JointTrainingPolicy> = true;

static_assert(BalancingPolicy<VanillaPolicy> && !HoldsFusionGates<VanillaPolicy> &&
              BalancingPolicy<JointTrainingPolicy>);

}  // namespace mmbalance
