#pragma once
/// \file
/// Every member a `Balancer` looks for on a policy, in one list, and the compile-time
/// check that refuses a policy declaring one of them so that the balancer could not call
/// it as written (which would otherwise compile and silently skip the hook).
///
/// | member | exact form | concept |
/// |---|---|---|
/// | plan (required) | `StepPlan next_plan()` (a `StepKind` converts; `StepPlan::modulating` for the forward side) | `BalancingPolicy` |
/// | branch count | `void set_branches(std::size_t)` (called once, first) | `TakesBranchCount` |
/// | speeds | `void observe_speeds(const SpeedSummary&)` | `ObservesSpeeds` |
/// | epoch start | `void start_epoch(std::int64_t)` | `HasEpochHook` |
/// | state | `void save(torch::serialize::OutputArchive&) const` and `void load(torch::serialize::InputArchive&)`, with `static constexpr PolicyIdentity checkpoint_identity` | `HasState`, `DeclaresCheckpointIdentity` |
/// | earlier formats | `void load(torch::serialize::InputArchive&, std::int64_t version)` | `ReadsEarlierVersions` |
/// | gradients | `void modulate_gradients(const StepGradients&)` | `ModulatesGradients` |
/// | objective | `static constexpr Objective objective` (the loss trained where the policy does not weight it) | `DeclaresObjective` |
/// | loss weights | `LossWeights loss_weights() const` | `WeighsLosses` |
/// | loss term | `at::Tensor auxiliary_loss(const NetOutput&, const at::Tensor&) const` | `AddsAuxiliaryLoss` |
/// | sample weights | `at::Tensor sample_weights(const NetOutput&, const at::Tensor&) const` | `WeighsSamples` |
/// | re-initialization | `std::vector<double> reinitialization(std::int64_t)` | `ReinitializesBranches` |
/// | epoch losses | `bool wants_epoch_losses(std::int64_t) const` and `void observe_epoch_losses(const EpochLosses&)` | `ObservesEpochLosses` |
/// | epoch features | `bool wants_epoch_features(std::int64_t) const` and `void observe_epoch_features(const EpochFeatures&)` | `ObservesEpochFeatures` |
/// | flags | `static constexpr bool holds_fusion_gates` / `needs_fused_gradients` / `needs_masked_outputs` / `copy_is_snapshot` | `HoldsFusionGates` / `NeedsFusedGradients` / `NeedsMaskedOutputs` / `CopyIsSnapshot` |
///
/// These names are the hooks': a member of one of them in any form (overloaded, a
/// template, private, inherited from two bases) must be the form above. The hooks of
/// earlier versions, `next_step` and `observe_d_speed`, are refused by name, pointing to
/// the hook that replaced them.
/// docs/policies.md ("The hooks") says when each is called and what it may change.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <torch/serialize/archive.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/epoch_features.h"
#include "mmbalance/balancing/epoch_losses.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/masked_outputs.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy_transaction.h"
#include "mmbalance/balancing/reinitialization.h"

namespace mmbalance::detail {

// HasMember_NAME<P>: P has a member NAME in any form (overloaded, a template, private,
// inherited from two bases, a data member): a class deriving from P and from one with a
// member NAME finds the name ambiguous exactly then. For a final P, only a member whose
// address can be taken is seen.
#define MMBALANCE_DETAIL_MEMBER_DETECTOR(name)                                               \
  struct WithMember_##name {                                                                 \
    void name();                                                                             \
  };                                                                                         \
  template <class P>                                                                         \
  struct MemberProbe_##name : P, WithMember_##name {};                                       \
  template <class P>                                                                         \
  concept HasMember_##name = (std::is_class_v<P> && !std::is_final_v<P> &&                   \
                              !requires { &MemberProbe_##name<P>::name; }) ||                \
                             requires { &P::name; };
MMBALANCE_DETAIL_MEMBER_DETECTOR(next_plan)
MMBALANCE_DETAIL_MEMBER_DETECTOR(next_step)
MMBALANCE_DETAIL_MEMBER_DETECTOR(set_branches)
MMBALANCE_DETAIL_MEMBER_DETECTOR(observe_speeds)
MMBALANCE_DETAIL_MEMBER_DETECTOR(observe_d_speed)
MMBALANCE_DETAIL_MEMBER_DETECTOR(start_epoch)
MMBALANCE_DETAIL_MEMBER_DETECTOR(save)
MMBALANCE_DETAIL_MEMBER_DETECTOR(load)
MMBALANCE_DETAIL_MEMBER_DETECTOR(modulate_gradients)
MMBALANCE_DETAIL_MEMBER_DETECTOR(objective)
MMBALANCE_DETAIL_MEMBER_DETECTOR(loss_weights)
MMBALANCE_DETAIL_MEMBER_DETECTOR(auxiliary_loss)
MMBALANCE_DETAIL_MEMBER_DETECTOR(sample_weights)
MMBALANCE_DETAIL_MEMBER_DETECTOR(reinitialization)
MMBALANCE_DETAIL_MEMBER_DETECTOR(wants_epoch_losses)
MMBALANCE_DETAIL_MEMBER_DETECTOR(observe_epoch_losses)
MMBALANCE_DETAIL_MEMBER_DETECTOR(wants_epoch_features)
MMBALANCE_DETAIL_MEMBER_DETECTOR(observe_epoch_features)
MMBALANCE_DETAIL_MEMBER_DETECTOR(holds_fusion_gates)
MMBALANCE_DETAIL_MEMBER_DETECTOR(needs_fused_gradients)
MMBALANCE_DETAIL_MEMBER_DETECTOR(needs_masked_outputs)
MMBALANCE_DETAIL_MEMBER_DETECTOR(copy_is_snapshot)
MMBALANCE_DETAIL_MEMBER_DETECTOR(checkpoint_identity)
#undef MMBALANCE_DETAIL_MEMBER_DETECTOR

// The plan hook's call form, without the copyability `BalancingPolicy` adds.
template <class P>
concept PlansSteps = requires(P& p) {
  { p.next_plan() } -> std::same_as<StepPlan>;
};

// Converts to `Exact` and nothing else: a hook taking another type (int for a count, a
// double for an epoch number) would receive a converted argument.
template <class Exact>
struct Exactly {
  template <class T>
    requires std::same_as<T, Exact>
  operator T() const {
    return T{};
  }
};
template <class P>
concept TakesBranchCountExactly = requires(P& p, Exactly<std::size_t> n) { p.set_branches(n); };
template <class P>
concept TakesEpochsAsInt64 = requires(P& p, Exactly<std::int64_t> e) { p.reinitialization(e); };

// The class that declares a member function whose address is `M`.
template <class M>
struct DeclaringClass;
template <class R, class C>
struct DeclaringClass<R C::*> {
  using type = C;
};

// A flag is read at compile time: declared, it must be a constant.
#define MMBALANCE_DETAIL_FLAG(name)                                                          \
  template <class P>                                                                         \
  concept ReadableFlag_##name = requires { typename std::bool_constant<bool(P::name)>; };    \
  template <class P>                                                                         \
  concept FlagSet_##name = ReadableFlag_##name<P> && bool(P::name);
MMBALANCE_DETAIL_FLAG(holds_fusion_gates)
MMBALANCE_DETAIL_FLAG(needs_fused_gradients)
MMBALANCE_DETAIL_FLAG(needs_masked_outputs)
MMBALANCE_DETAIL_FLAG(copy_is_snapshot)
#undef MMBALANCE_DETAIL_FLAG

// A declared identity has a name and a version from 1 (0 marks records without one).
template <class P>
constexpr bool identity_well_formed() {
  if constexpr (DeclaresCheckpointIdentity<P>) {
    constexpr PolicyIdentity id = P::checkpoint_identity;
    return !id.name.empty() && id.version >= 1;
  } else {
    return true;
  }
}
template <class P>
concept IdentityWellFormed = identity_well_formed<P>();

// A policy that saves a state of its own (declares save) under a library policy's name,
// inherited: a checkpoint of it would load into that library policy and back.
template <class P>
constexpr bool owns_state_under_library_name() {
  if constexpr (HasState<P> && DeclaresCheckpointIdentity<P> && requires { &P::save; }) {
    constexpr PolicyIdentity id = P::checkpoint_identity;
    return id.name.starts_with("mmbalance.") && !kLibraryPolicy<typename DeclaringClass<decltype(&P::save)>::type>;
  } else {
    return false;
  }
}

/// Instantiated by `Balancer<P>`: each assertion names the member and the form the
/// balancer calls. A policy passes when every hook name it has is in that form.
template <class P>
struct PolicyHooksCheck {
  static_assert(!HasMember_next_step<P>,
                "Balancer: the policy declares next_step, which the balancer no longer calls: "
                "declare `StepPlan next_plan()` instead (StepKind values convert to StepPlan)");
  static_assert(HasMember_next_plan<P> || HasMember_next_step<P>,
                "Balancer: the policy has no plan: declare `StepPlan next_plan()`");
  static_assert(!HasMember_next_plan<P> || PlansSteps<P>,
                "Balancer: the policy's next_plan is not `StepPlan next_plan()` (callable on a "
                "non-const policy, no parameters, returning StepPlan)");
  static_assert(std::copyable<P>, "Balancer: the policy must be copyable (the balancer keeps a "
                "copy to restore when it rejects a step)");
  static_assert(!HasMember_set_branches<P> || (TakesBranchCount<P> && TakesBranchCountExactly<P>),
                "Balancer: the policy's set_branches would never be called, or get the count "
                "narrowed: declare `void set_branches(std::size_t)`");
  static_assert(!HasMember_observe_speeds<P> || ObservesSpeeds<P>,
                "Balancer: the policy's observe_speeds would never be called: declare `void "
                "observe_speeds(const SpeedSummary&)`");
  static_assert(!HasMember_observe_d_speed<P>,
                "Balancer: the policy declares observe_d_speed, which the balancer no longer "
                "calls: declare `void observe_speeds(const SpeedSummary&)` and read "
                "`speeds.d_speed` (two branches) or `speeds.spread` (any number)");
  static_assert(!HasMember_start_epoch<P> || HasEpochHook<P>,
                "Balancer: the policy's start_epoch would never be called: declare `void "
                "start_epoch(std::int64_t)`");
  static_assert(!(HasMember_save<P> || HasMember_load<P>) || HasState<P>,
                "Balancer: the policy's state would be left out of every checkpoint: declare "
                "both `void save(torch::serialize::OutputArchive&) const` and `void "
                "load(torch::serialize::InputArchive&)`");
  static_assert(!HasMember_checkpoint_identity<P> || DeclaresCheckpointIdentity<P>,
                "Balancer: the policy's checkpoint_identity cannot be read at compile time: "
                "declare `static constexpr mmbalance::PolicyIdentity checkpoint_identity{\"name\", "
                "version}`");
  static_assert(!HasState<P> || DeclaresCheckpointIdentity<P>,
                "Balancer: the policy has state (save/load) but no checkpoint identity: declare "
                "`static constexpr mmbalance::PolicyIdentity checkpoint_identity{\"your.policy\", 1}` "
                "(a name kept across renames, the version of what save writes)");
  static_assert(IdentityWellFormed<P>,
                "Balancer: the policy's checkpoint_identity needs a non-empty name and a version "
                "of at least 1");
  static_assert(!owns_state_under_library_name<P>(),
                "Balancer: the policy saves a state of its own under a library policy's "
                "checkpoint_identity (\"mmbalance.\" names are the library's): declare its own, "
                "e.g. `static constexpr mmbalance::PolicyIdentity checkpoint_identity{\"acme.policy\", 1}`");
  static_assert(!HasMember_modulate_gradients<P> || ModulatesGradients<P>,
                "Balancer: the policy's modulate_gradients would never be called: declare `void "
                "modulate_gradients(const StepGradients&)`");
  static_assert(!HasMember_objective<P> || DeclaresObjective<P>,
                "Balancer: the policy's objective cannot be read at compile time: declare "
                "`static constexpr mmbalance::Objective objective = Objective::fused;` (or another "
                "Objective)");
  static_assert(!DeclaresObjective<P> || to_string(objective_of<P>()) != "invalid",
                "Balancer: the policy's objective is not one of Objective::modality_specific, fused "
                "or fused_and_modality_specific");
  static_assert(!HasMember_loss_weights<P> || WeighsLosses<P>,
                "Balancer: the policy's loss_weights would go unused: declare `LossWeights "
                "loss_weights() const`");
  static_assert(!HasMember_auxiliary_loss<P> || AddsAuxiliaryLoss<P>,
                "Balancer: the policy's auxiliary_loss would go unused: declare `at::Tensor "
                "auxiliary_loss(const NetOutput&, const at::Tensor&) const`");
  static_assert(!HasMember_sample_weights<P> || WeighsSamples<P>,
                "Balancer: the policy's sample_weights would go unused: declare `at::Tensor "
                "sample_weights(const NetOutput&, const at::Tensor&) const`");
  static_assert(!HasMember_reinitialization<P> || (ReinitializesBranches<P> && TakesEpochsAsInt64<P>),
                "Balancer: the policy's reinitialization would never be called: declare "
                "`std::vector<double> reinitialization(std::int64_t)`");
  static_assert(!(HasMember_wants_epoch_losses<P> || HasMember_observe_epoch_losses<P>) ||
                    ObservesEpochLosses<P>,
                "Balancer: the policy's epoch-loss hooks would never be called: declare both "
                "`bool wants_epoch_losses(std::int64_t) const` and `void "
                "observe_epoch_losses(const EpochLosses&)`");
  static_assert(!(HasMember_wants_epoch_features<P> || HasMember_observe_epoch_features<P>) ||
                    ObservesEpochFeatures<P>,
                "Balancer: the policy's epoch-feature hooks would never be called: declare both "
                "`bool wants_epoch_features(std::int64_t) const` and `void "
                "observe_epoch_features(const EpochFeatures&)`");
  static_assert((!HasMember_holds_fusion_gates<P> || ReadableFlag_holds_fusion_gates<P>) &&
                    (!HasMember_needs_fused_gradients<P> || ReadableFlag_needs_fused_gradients<P>) &&
                    (!HasMember_needs_masked_outputs<P> || ReadableFlag_needs_masked_outputs<P>) &&
                    (!HasMember_copy_is_snapshot<P> || ReadableFlag_copy_is_snapshot<P>),
                "Balancer: the policy's holds_fusion_gates, needs_fused_gradients, "
                "needs_masked_outputs or copy_is_snapshot cannot be read at compile time: "
                "declare it `static constexpr bool`");
  static_assert(!(FlagSet_needs_fused_gradients<P> || FlagSet_needs_masked_outputs<P>) ||
                    ModulatesGradients<P>,
                "Balancer: needs_fused_gradients and needs_masked_outputs hand their tensors to "
                "modulate_gradients, which the policy lacks: declare `void "
                "modulate_gradients(const StepGradients&)`");
  static constexpr bool ok = true;
};

}  // namespace mmbalance::detail
