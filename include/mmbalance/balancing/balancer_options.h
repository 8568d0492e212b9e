#pragma once
/// \file
/// The options of a `Balancer`: warm-up, per-step checks and when the speeds are read.

#include <array>
#include <cstdint>

#include <torch/arg.h>

#include "mmbalance/model/step_kind.h"

namespace mmbalance {

/// When a policy that observes the learning speeds (`observe_speeds`: guided) gets them.
enum class SpeedRead : std::uint8_t {
  /// Right after each regular step, so it decides the very next step (the paper's
  /// algorithm). Costs one small host read per regular step.
  same_step,
  /// The accumulators are copied to the host without waiting; the policy receives a
  /// regular step's speeds when the following step is observed, so decisions lag by one
  /// step and no step waits for the device. A speed that arrives while the policy is
  /// already re-balancing (the following step was a re-balancing one) is dropped, so a
  /// guided window is always exactly Q steps in one direction. Needs
  /// check_every_step(false).
  previous_step,
};

/// Options for `Balancer`.
///
/// Example:
/// ```
/// Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(0.1).Q(5)),
///                                 BalancerOptions().warmup_epochs(1));
/// ```
struct BalancerOptions {
  /// Epochs of regular steps before the policy is consulted (the paper uses one).
  TORCH_ARG(std::int64_t, warmup_epochs) = 1;
  /// true: every step reads one small tensor (loss, squared norms, accumulators) to the
  /// host, and a non-finite loss or gradient (in any step), or a parameter group of norm
  /// zero or without a gradient so far (regular steps), is rejected with an exception
  /// that leaves the balancer and the model's gate means as they were. false: no host
  /// read except the one a policy with `observe_speeds` needs; a regular step whose μ is
  /// not finite is left out of the accumulators on the device and counted
  /// (`skipped_steps()`), and nothing is thrown.
  TORCH_ARG(bool, check_every_step) = true;
  /// When a policy with `observe_speeds` gets the speeds; see `SpeedRead`.
  TORCH_ARG(SpeedRead, speed_read) = SpeedRead::same_step;
  /// For a policy with masked passes (AGM): how many rows of masked copies of the batch one
  /// forward pass takes, >= 1 (as many copies as fit, at least one; 1: one pass per copy).
  /// On this project's 2-core CPU, stacking gained little and not reliably at batch 8
  /// (0.66-1.02x the time of one pass per copy, between runs) and lost from batch 32 on
  /// (up to 1.6x at 32 rows a copy, 2.3x for one pass of every copy at batch 128;
  /// docs/performance.md), so 32: small batches stacked, larger ones one copy a pass. On a
  /// GPU, where a step is launch-bound, larger passes may pay. The network must not mix
  /// rows in eval mode (BatchNorm without running statistics, attention across the batch):
  /// then pass 1.
  TORCH_ARG(std::int64_t, masked_rows_per_pass) = 32;
};

/// What the balancer has done so far, per step kind (two branches).
using StepCounts = std::array<std::int64_t, kNumStepKinds>;

}  // namespace mmbalance
