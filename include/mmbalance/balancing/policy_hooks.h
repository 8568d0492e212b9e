#pragma once
/// \file
/// Every member a `Balancer` looks for on a policy, in one list, and the compile-time
/// check that refuses a policy declaring one of them so that the balancer could not call
/// it as written (which would otherwise compile and silently skip the hook).
///
/// | member | exact form | concept |
/// |---|---|---|
/// | plan (required, one of two) | `StepPlan next_plan()` / `StepKind next_step()` (two branches) | `NWayBalancingPolicy` / `BalancingPolicy` |
/// | speeds | `void observe_speeds(const NWaySpeedSummary&)` / `void observe_d_speed(double)` | `ObservesBranchSpeeds` / `ObservesSpeed` |
/// | epoch start | `void start_epoch(std::int64_t)` | `HasEpochHook` |
/// | state | `void save(torch::serialize::OutputArchive&) const` and `void load(torch::serialize::InputArchive&)` | `HasState` |
/// | gradients | `void modulate_gradients(const StepGradients&)` | `ModulatesGradients` |
/// | loss weights | `LossWeights loss_weights() const` | `WeighsLosses` |
/// | loss term | `at::Tensor auxiliary_loss(const NWayOutput&, const at::Tensor&) const` | `AddsAuxiliaryLoss` |
/// | epoch losses | `bool wants_epoch_losses(std::int64_t) const` and `void observe_epoch_losses(const EpochLosses&)` | `ObservesEpochLosses` |
/// | flags | `static constexpr bool holds_fusion_gates` / `needs_fused_gradients` / `needs_masked_outputs` | `HoldsFusionGates` / `NeedsFusedGradients` / `NeedsMaskedOutputs` |
///
/// docs/policies.md ("The hooks") says when each is called and what it may change.

#include <concepts>
#include <cstdint>

#include <torch/serialize/archive.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/n_way_policy.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/n_way_multimodal_net.h"

namespace mmbalance::detail {

// "Declares a member of this name": its address can be taken (one, non-template
// overload), or a call of a near-miss form compiles (non-const object, non-const
// argument, two-branch output type), which also finds overloaded and template members.
template <class P>
concept DeclaresObserveSpeeds =
    requires { &P::observe_speeds; } || requires(P& p, NWaySpeedSummary& s) { p.observe_speeds(s); };
template <class P>
concept DeclaresObserveDSpeed = requires { &P::observe_d_speed; };
template <class P>
concept DeclaresStartEpoch = requires { &P::start_epoch; };
template <class P>
concept DeclaresState = requires { &P::save; } || requires { &P::load; } ||
    requires(P& p, torch::serialize::OutputArchive& out) { p.save(out); };
template <class P>
concept DeclaresModulateGradients = requires { &P::modulate_gradients; } ||
    requires(P& p, StepGradients& g) { p.modulate_gradients(g); };
template <class P>
concept DeclaresLossWeights = requires { &P::loss_weights; } || requires(P& p) { p.loss_weights(); };
template <class P>
concept DeclaresAuxiliaryLoss =
    requires { &P::auxiliary_loss; } ||
    requires(P& p, const NWayOutput& out, const at::Tensor& target) { p.auxiliary_loss(out, target); } ||
    requires(P& p, const ModelOutput& out, const at::Tensor& target) { p.auxiliary_loss(out, target); };
template <class P>
concept DeclaresEpochLosses = requires { &P::wants_epoch_losses; } || requires { &P::observe_epoch_losses; } ||
    requires(P& p, EpochLosses& l) { p.observe_epoch_losses(l); };
template <class P>
concept DeclaresNextPlan = requires { &P::next_plan; };
template <class P>
concept DeclaresNextStep = requires { &P::next_step; };

/// Instantiated by `Balancer<P>`: each assertion names the member and the form the
/// balancer calls. A policy passes when every member it declares has that form.
template <class P>
struct PolicyHooksCheck {
  static_assert(BalancingPolicy<P> || NWayBalancingPolicy<P> || DeclaresNextPlan<P> || DeclaresNextStep<P>,
                "Balancer: the policy has no plan: declare `StepPlan next_plan()` (any number of "
                "branches) or `StepKind next_step()` (two branches)");
  static_assert(!DeclaresNextPlan<P> || NWayBalancingPolicy<P>,
                "Balancer: the policy's next_plan is not `StepPlan next_plan()` (non-const, no "
                "parameters, returning StepPlan)");
  static_assert(!DeclaresNextStep<P> || DeclaresNextPlan<P> || BalancingPolicy<P>,
                "Balancer: the policy's next_step is not `StepKind next_step()` (non-const, no "
                "parameters, returning StepKind)");
  static_assert(std::copyable<P>, "Balancer: the policy must be copyable (the balancer keeps a "
                "copy to restore when it rejects a step)");
  static_assert(!DeclaresObserveSpeeds<P> || ObservesBranchSpeeds<P>,
                "Balancer: the policy's observe_speeds would never be called: declare `void "
                "observe_speeds(const NWaySpeedSummary&)`");
  static_assert(!DeclaresObserveDSpeed<P> || ObservesSpeed<P>,
                "Balancer: the policy's observe_d_speed would never be called: declare `void "
                "observe_d_speed(double)`");
  static_assert(!DeclaresStartEpoch<P> || HasEpochHook<P>,
                "Balancer: the policy's start_epoch would never be called: declare `void "
                "start_epoch(std::int64_t)`");
  static_assert(!DeclaresState<P> || HasState<P>,
                "Balancer: the policy's state would be left out of every checkpoint: declare "
                "both `void save(torch::serialize::OutputArchive&) const` and `void "
                "load(torch::serialize::InputArchive&)`");
  static_assert(!DeclaresModulateGradients<P> || ModulatesGradients<P>,
                "Balancer: the policy's modulate_gradients would never be called: declare `void "
                "modulate_gradients(const StepGradients&)`");
  static_assert(!DeclaresLossWeights<P> || WeighsLosses<P>,
                "Balancer: the policy's loss_weights would go unused: declare `LossWeights "
                "loss_weights() const`");
  static_assert(!DeclaresAuxiliaryLoss<P> || AddsAuxiliaryLoss<P>,
                "Balancer: the policy's auxiliary_loss would go unused: declare `at::Tensor "
                "auxiliary_loss(const NWayOutput&, const at::Tensor&) const`");
  static_assert(!DeclaresEpochLosses<P> || ObservesEpochLosses<P>,
                "Balancer: the policy's epoch-loss hooks would never be called: declare both "
                "`bool wants_epoch_losses(std::int64_t) const` and `void "
                "observe_epoch_losses(const EpochLosses&)`");
  static_assert(!(requires { P::needs_fused_gradients; } || requires { P::needs_masked_outputs; }) ||
                    ModulatesGradients<P>,
                "Balancer: needs_fused_gradients and needs_masked_outputs hand their tensors to "
                "modulate_gradients, which the policy lacks: declare `void "
                "modulate_gradients(const StepGradients&)`");
  static constexpr bool ok = true;
};

}  // namespace mmbalance::detail
