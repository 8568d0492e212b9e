// Policies that declare a hook in a form the Balancer would not call. Each must fail to
// compile with the message on its `// expect:` line (tests/compile_fail/check.cmake
// builds this file and looks for every one); without the check each compiled and the
// hook was silently skipped.
#include <cstdint>
#include <memory>

#include <mmbalance/mmbalance.h>

using namespace mmbalance;

// expect: the policy has no plan: declare `StepPlan next_plan()`
struct NoPlan {};
static_assert(sizeof(Balancer<NoPlan>) > 0);

// expect: the policy's next_plan is not `StepPlan next_plan()`
struct PlanAsNumber {
  int next_plan() { return 0; }
};
static_assert(sizeof(Balancer<PlanAsNumber>) > 0);

// expect: the policy must be copyable
struct NotCopyable : VanillaPolicy {
  std::unique_ptr<int> state;
};
static_assert(sizeof(Balancer<NotCopyable>) > 0);

// A non-const reference: the balancer hands a const summary.
// expect: observe_speeds would never be called: declare `void observe_speeds(const NWaySpeedSummary&)`
struct SpeedsByReference : VanillaPolicy {
  void observe_speeds(NWaySpeedSummary&) {}
};
static_assert(sizeof(Balancer<SpeedsByReference>) > 0);

// expect: observe_d_speed would never be called: declare `void observe_d_speed(double)`
struct SpeedAsFloatReference : VanillaPolicy {
  void observe_d_speed(float&) {}
};
static_assert(sizeof(Balancer<SpeedAsFloatReference>) > 0);

// expect: start_epoch would never be called: declare `void start_epoch(std::int64_t)`
struct EpochWithoutNumber : VanillaPolicy {
  void start_epoch() {}
};
static_assert(sizeof(Balancer<EpochWithoutNumber>) > 0);

// A save that is not const: the policy would resume from a reset state.
// expect: the policy's state would be left out of every checkpoint
struct NonConstSave : VanillaPolicy {
  void save(torch::serialize::OutputArchive&) {}
  void load(torch::serialize::InputArchive&) {}
};
static_assert(sizeof(Balancer<NonConstSave>) > 0);

// expect: modulate_gradients would never be called: declare `void modulate_gradients(const StepGradients&)`
struct GradientsByReference : VanillaPolicy {
  void modulate_gradients(StepGradients&) {}
};
static_assert(sizeof(Balancer<GradientsByReference>) > 0);

// expect: loss_weights would go unused: declare `LossWeights loss_weights() const`
struct NonConstWeights : VanillaPolicy {
  LossWeights loss_weights() { return {{1.0, 1.0}, 0.0}; }
};
static_assert(sizeof(Balancer<NonConstWeights>) > 0);

// The two-branch output where the N-branch one is expected.
// expect: auxiliary_loss would go unused: declare `at::Tensor auxiliary_loss(const NWayOutput&, const at::Tensor&) const`
struct TwoBranchTerm : VanillaPolicy {
  at::Tensor auxiliary_loss(const ModelOutput& out, const at::Tensor&) const { return out.y.mean(); }
};
static_assert(sizeof(Balancer<TwoBranchTerm>) > 0);

// expect: epoch-loss hooks would never be called
struct EpochLossesByReference : VanillaPolicy {
  bool wants_epoch_losses(std::int64_t) const { return true; }
  void observe_epoch_losses(EpochLosses&) {}
};
static_assert(sizeof(Balancer<EpochLossesByReference>) > 0);

// expect: hand their tensors to modulate_gradients, which the policy lacks
struct MaskedOutputsWithoutHook : VanillaPolicy {
  static constexpr bool needs_masked_outputs = true;
};
static_assert(sizeof(Balancer<MaskedOutputsWithoutHook>) > 0);
