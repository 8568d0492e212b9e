// Policies that declare a hook in a form the Balancer would not call. Each must fail to
// compile with the message on its `// expect(Policy):` line, reported for that policy
// (tests/compile_fail/check.cmake builds this file and looks for every one); without the
// check most of them compiled and the hook was silently skipped.
#include <cstdint>
#include <memory>

#include <mmbalance/mmbalance.h>

using namespace mmbalance;

// expect(NoPlan): the policy has no plan: declare `StepPlan next_plan()`
struct NoPlan {};
static_assert(sizeof(Balancer<NoPlan>) > 0);

// expect(PlanAsNumber): the policy's next_plan is not `StepPlan next_plan()`
struct PlanAsNumber {
  int next_plan() { return 0; }
};
static_assert(sizeof(Balancer<PlanAsNumber>) > 0);

// The two-branch plan hook of earlier versions: never called now.
// expect(ChoosesStepKinds): declares next_step, which the balancer no longer calls: declare `StepPlan next_plan()` instead (StepKind values convert
struct ChoosesStepKinds {
  StepKind next_step() { return StepKind::regular; }
};
static_assert(sizeof(Balancer<ChoosesStepKinds>) > 0);

// expect(StepKindAsNumber): declares next_step, which the balancer no longer calls
struct StepKindAsNumber {
  int next_step() { return 0; }
};
static_assert(sizeof(Balancer<StepKindAsNumber>) > 0);

// balancer.next_plan() would call VanillaPolicy's next_plan, never this next_step.
// expect(OverridesOnlyNextStep): declares next_step, which the balancer no longer calls
struct OverridesOnlyNextStep : VanillaPolicy {
  StepKind next_step() { return StepKind::rebalance_m0; }
};
static_assert(sizeof(Balancer<OverridesOnlyNextStep>) > 0);

// expect(BranchCountAsInt): set_branches would never be called, or get the count narrowed: declare `void set_branches(std::size_t)`
struct BranchCountAsInt : VanillaPolicy {
  void set_branches(int) {}
};
static_assert(sizeof(Balancer<BranchCountAsInt>) > 0);

// expect(BranchCountWithoutNumber): set_branches would never be called, or get the count narrowed: declare `void set_branches(std::size_t)`
struct BranchCountWithoutNumber : VanillaPolicy {
  void set_branches() {}
};
static_assert(sizeof(Balancer<BranchCountWithoutNumber>) > 0);

// expect(NotCopyable): the policy must be copyable
struct NotCopyable : VanillaPolicy {
  std::unique_ptr<int> state;
};
static_assert(sizeof(Balancer<NotCopyable>) > 0);

// A non-const reference: the balancer hands a const summary.
// expect(SpeedsByReference): observe_speeds would never be called: declare `void observe_speeds(const SpeedSummary&)`
struct SpeedsByReference : VanillaPolicy {
  void observe_speeds(SpeedSummary&) {}
};
static_assert(sizeof(Balancer<SpeedsByReference>) > 0);

// The two-branch speed hook of earlier versions: never called now.
// expect(ObservesDSpeed): declares observe_d_speed, which the balancer no longer calls: declare `void observe_speeds(const SpeedSummary&)` and read `speeds.d_speed`
struct ObservesDSpeed : VanillaPolicy {
  void observe_d_speed(double) {}
};
static_assert(sizeof(Balancer<ObservesDSpeed>) > 0);

// expect(BothSpeedHooks): declares observe_d_speed, which the balancer no longer calls
struct BothSpeedHooks : VanillaPolicy {
  void observe_speeds(const SpeedSummary&) {}
  void observe_d_speed(double) {}
};
static_assert(sizeof(Balancer<BothSpeedHooks>) > 0);

// expect(EpochWithoutNumber): start_epoch would never be called: declare `void start_epoch(std::int64_t)`
struct EpochWithoutNumber : VanillaPolicy {
  void start_epoch() {}
};
static_assert(sizeof(Balancer<EpochWithoutNumber>) > 0);

// A save that is not const: the policy would resume from a reset state.
// expect(NonConstSave): the policy's state would be left out of every checkpoint
struct NonConstSave : VanillaPolicy {
  void save(torch::serialize::OutputArchive&) {}
  void load(torch::serialize::InputArchive&) {}
};
static_assert(sizeof(Balancer<NonConstSave>) > 0);

// save and load inherited from two policies: ambiguous, so neither would be called.
// expect(TwoStates): the policy's state would be left out of every checkpoint
struct TwoStates : GuidedPolicy, RandomPolicy {
  using GuidedPolicy::next_plan;
};
static_assert(sizeof(Balancer<TwoStates>) > 0);

// expect(GradientsByReference): modulate_gradients would never be called: declare `void modulate_gradients(const StepGradients&)`
struct GradientsByReference : VanillaPolicy {
  void modulate_gradients(StepGradients&) {}
};
static_assert(sizeof(Balancer<GradientsByReference>) > 0);

// expect(NonConstWeights): loss_weights would go unused: declare `LossWeights loss_weights() const`
struct NonConstWeights : VanillaPolicy {
  LossWeights loss_weights() { return {{1.0, 1.0}, 0.0}; }
};
static_assert(sizeof(Balancer<NonConstWeights>) > 0);

// The two-branch output where the N-branch one is expected.
// expect(TwoBranchTerm): auxiliary_loss would go unused: declare `at::Tensor auxiliary_loss(const NetOutput&, const at::Tensor&) const`
struct TwoBranchTerm : VanillaPolicy {
  at::Tensor auxiliary_loss(const ModelOutput& out, const at::Tensor&) const { return out.y.mean(); }
};
static_assert(sizeof(Balancer<TwoBranchTerm>) > 0);

// expect(EpochLossesByReference): epoch-loss hooks would never be called
struct EpochLossesByReference : VanillaPolicy {
  bool wants_epoch_losses(std::int64_t) const { return true; }
  void observe_epoch_losses(EpochLosses&) {}
};
static_assert(sizeof(Balancer<EpochLossesByReference>) > 0);

// Not constexpr: the balancer would read it as absent.
// expect(FlagNotConstant): cannot be read at compile time: declare it `static constexpr bool`
struct FlagNotConstant : VanillaPolicy {
  static inline bool holds_fusion_gates = true;
};
static_assert(sizeof(Balancer<FlagNotConstant>) > 0);

// A promise read at run time would be no promise: the balancer would keep the record.
// expect(SnapshotFlagNotConstant): cannot be read at compile time: declare it `static constexpr bool`
struct SnapshotFlagNotConstant : VanillaPolicy {
  bool copy_is_snapshot = true;
};
static_assert(sizeof(Balancer<SnapshotFlagNotConstant>) > 0);

// An objective read at run time, or of another type, would leave the loss the default one.
// expect(ObjectiveNotConstant): the policy's objective cannot be read at compile time
struct ObjectiveNotConstant : VanillaPolicy {
  Objective objective = Objective::fused;
};
static_assert(sizeof(Balancer<ObjectiveNotConstant>) > 0);
// expect(ObjectiveAsText): the policy's objective cannot be read at compile time
struct ObjectiveAsText : VanillaPolicy {
  static constexpr const char* objective = "fused";
};
static_assert(sizeof(Balancer<ObjectiveAsText>) > 0);

// expect(MaskedOutputsWithoutHook): hand their tensors to modulate_gradients, which the policy lacks
struct MaskedOutputsWithoutHook : VanillaPolicy {
  static constexpr bool needs_masked_outputs = true;
};
static_assert(sizeof(Balancer<MaskedOutputsWithoutHook>) > 0);

// State without a name for it in checkpoints (it used to be the compiler's type name).
// expect(StateWithoutIdentity): the policy has state (save/load) but no checkpoint identity
struct StateWithoutIdentity {
  StepPlan next_plan() { return StepPlan::regular(); }
  void save(torch::serialize::OutputArchive&) const {}
  void load(torch::serialize::InputArchive&) {}
};
static_assert(sizeof(Balancer<StateWithoutIdentity>) > 0);

// expect(IdentityNotConstant): checkpoint_identity cannot be read at compile time
struct IdentityNotConstant : VanillaPolicy {
  static inline PolicyIdentity checkpoint_identity{"acme.not_constant", 1};
};
static_assert(sizeof(Balancer<IdentityNotConstant>) > 0);

// expect(IdentityVersionZero): checkpoint_identity needs a non-empty name and a version of at least 1
struct IdentityVersionZero : VanillaPolicy {
  static constexpr PolicyIdentity checkpoint_identity{"acme.version_zero", 0};
};
static_assert(sizeof(Balancer<IdentityVersionZero>) > 0);

// expect(IdentityNameEmpty): checkpoint_identity needs a non-empty name and a version of at least 1
struct IdentityNameEmpty : VanillaPolicy {
  static constexpr PolicyIdentity checkpoint_identity{"", 1};
};
static_assert(sizeof(Balancer<IdentityNameEmpty>) > 0);

// A state of its own saved under the identity inherited from a library policy: its
// checkpoints would load into VanillaPolicy and back.
// expect(OwnStateUnderLibraryName): saves a state of its own under a library policy's checkpoint_identity
struct OwnStateUnderLibraryName : VanillaPolicy {
  void save(torch::serialize::OutputArchive&) const {}
  void load(torch::serialize::InputArchive&) {}
};
static_assert(sizeof(Balancer<OwnStateUnderLibraryName>) > 0);

// expect(NonConstSampleWeights): sample_weights would go unused: declare `at::Tensor sample_weights(const NetOutput&, const at::Tensor&) const`
struct NonConstSampleWeights : VanillaPolicy {
  at::Tensor sample_weights(const NetOutput&, const at::Tensor& t) { return at::ones_like(t); }
};
static_assert(sizeof(Balancer<NonConstSampleWeights>) > 0);

// expect(TwoBranchSampleWeights): sample_weights would go unused: declare `at::Tensor sample_weights(const NetOutput&, const at::Tensor&) const`
struct TwoBranchSampleWeights : VanillaPolicy {
  at::Tensor sample_weights(const ModelOutput&, const at::Tensor& t) const { return at::ones_like(t); }
};
static_assert(sizeof(Balancer<TwoBranchSampleWeights>) > 0);

// expect(FloatStrengths): reinitialization would never be called: declare `std::vector<double> reinitialization(std::int64_t)`
struct FloatStrengths : VanillaPolicy {
  std::vector<float> reinitialization(std::int64_t) { return {0.0F, 0.0F}; }
};
static_assert(sizeof(Balancer<FloatStrengths>) > 0);

// expect(NonConstWantsFeatures): epoch-feature hooks would never be called: declare both `bool wants_epoch_features(std::int64_t) const` and `void observe_epoch_features(const EpochFeatures&)`
struct NonConstWantsFeatures : VanillaPolicy {
  bool wants_epoch_features(std::int64_t) { return true; }
  void observe_epoch_features(const EpochFeatures&) {}
};
static_assert(sizeof(Balancer<NonConstWantsFeatures>) > 0);

// expect(FeaturesByValueOfLosses): epoch-feature hooks would never be called
struct FeaturesByValueOfLosses : VanillaPolicy {
  bool wants_epoch_features(std::int64_t) const { return true; }
  void observe_epoch_features(const EpochLosses&) {}
};
static_assert(sizeof(Balancer<FeaturesByValueOfLosses>) > 0);

// expect(IntEpochs): reinitialization would never be called: declare `std::vector<double> reinitialization(std::int64_t)`
struct IntEpochs : VanillaPolicy {
  std::vector<double> reinitialization(int) { return {0.0, 0.0}; }
};
static_assert(sizeof(Balancer<IntEpochs>) > 0);
