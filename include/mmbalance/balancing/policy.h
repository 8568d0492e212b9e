#pragma once
/// \file
/// The `BalancingPolicy` concept and its optional hooks.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Decides the plan of each training step after the warm-up epochs (the `Balancer`
/// handles warm-up), for any number of branches. Required: `StepPlan next_plan()` (a
/// `StepKind` converts: `return StepKind::rebalance_m0;`). Optional hooks, detected at
/// compile time:
/// - `set_branches(std::size_t)`: called once by the `Balancer`'s constructor, before any
///   other hook, with the network's number of branches; it may throw to refuse it.
/// - `observe_speeds(const SpeedSummary&)`: called after every regular step whose speeds
///   are defined (for two branches `speeds.d_speed` is the paper's d_speed). A policy with
///   this hook makes the balancer read the speeds from the device once per regular step; a
///   policy without it costs no read.
/// - `start_epoch(std::int64_t)`: called by `end_epoch` when an epoch after warm-up begins,
///   numbered from the end of warm-up (0 for the first; with no warm-up, epoch 0 begins at
///   construction unannounced and the first call is 1). If it throws, `end_epoch` changes
///   nothing: the epoch that was ending goes on.
/// - `save(OutputArchive&) const` / `load(InputArchive&)`: the policy's own state.
/// - `static constexpr bool holds_fusion_gates = true`: the policy chooses re-balancing
///   steps, which hold fusion modules' gates; a `Balancer` refuses it at construction on a
///   network without fusion modules (late fusion), where such a step is a regular one.
///   (Any policy's re-balancing plan on such a network is refused when it is chosen.)
/// - `static constexpr Objective objective` (balancing/loss_weighting.h): the loss the
///   policy's method trains (without it, the sum of the heads' losses).
/// - `modulate_gradients(const StepGradients&)` (balancing/gradient_modulation.h; its
///   masked passes in balancing/masked_outputs.h), `loss_weights()`,
///   `auxiliary_loss(out, target)`, `sample_weights(out, target)`
///   (balancing/loss_weighting.h) and `wants_epoch_losses` / `observe_epoch_losses`
///   (balancing/epoch_losses.h): policies that change gradients, weight the losses or
///   samples, add a term of their own or measure generalization.
/// - `wants_epoch_features` / `observe_epoch_features` (balancing/epoch_features.h): the
///   branches' features on training and held-out data at epoch boundaries.
/// - `reinitialization(std::int64_t)` (balancing/reinitialization.h): re-initializes
///   branches at epoch boundaries (after the measurement, for a policy that measures).
/// - `static constexpr bool copy_is_snapshot = true` (balancing/policy_transaction.h): a
///   copy shares nothing the policy changes in place, so the balancer keeps a copy rather
///   than the policy's record to roll back to.
/// Policies must be copyable: the balancer keeps one to restore when it rejects a step.
template <class P>
concept BalancingPolicy = std::copyable<P> && requires(P& p) {
  { p.next_plan() } -> std::same_as<StepPlan>;
};

template <class P>
concept TakesBranchCount = requires(P& p, std::size_t n) { p.set_branches(n); };

template <class P>
concept ObservesSpeeds = requires(P& p, const SpeedSummary& s) { p.observe_speeds(s); };

template <class P>
concept HasEpochHook = requires(P& p, std::int64_t e) { p.start_epoch(e); };

template <class P>
concept HoldsFusionGates = requires { requires bool(P::holds_fusion_gates); };

template <class P>
concept HasState = requires(const P& cp, P& p, torch::serialize::OutputArchive& out,
                            torch::serialize::InputArchive& in) {
  cp.save(out);
  p.load(in);
};

namespace detail {
/// A policy's `set_branches`: 2 or more, and the count it was made for if it was given one.
inline void take_branch_count(std::size_t& held, std::size_t given, const char* policy) {
  TORCH_CHECK(given >= 2, policy, ": needs at least 2 branches, got ", given);
  TORCH_CHECK(held == 0 || held == given, policy, ": the policy was made for ", held,
              " branches, the network has ", given);
  held = given;
}
}  // namespace detail

}  // namespace mmbalance
