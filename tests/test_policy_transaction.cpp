// The state a Balancer rolls a policy back to (balancing/policy_transaction.h): a policy
// that changes its state tensors in place is restored as exactly as one that assigns new
// ones, and the library's policies, which declare copy_is_snapshot, never change a state
// tensor in place.
#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// Counts in tensors it changes in place (as PyTorch code would write a running count):
// plans made, speeds seen and their spreads summed. `refuse_at` (shared with the test)
// makes observe_speeds throw after counting the speeds of that number, as a hook that
// fails half-way.
struct InPlaceCounts {
  static constexpr PolicyIdentity checkpoint_identity{"test.in_place_counts", 1};
  at::Tensor plans = at::zeros({}, at::kLong);
  at::Tensor speeds_seen = at::zeros({}, at::kLong);
  at::Tensor spread_sum = at::zeros({}, at::kDouble);
  std::shared_ptr<std::int64_t> refuse_at = std::make_shared<std::int64_t>(-1);

  StepPlan next_plan() {
    plans.add_(1);
    return StepPlan::regular();
  }
  void observe_speeds(const SpeedSummary& speeds) {
    speeds_seen.add_(1);
    spread_sum.add_(speeds.spread);
    TORCH_CHECK(speeds_seen.item<std::int64_t>() != *refuse_at, "InPlaceCounts: refused");
  }
  void start_epoch(std::int64_t) {
    plans.add_(100);
    TORCH_CHECK(*refuse_at != -2, "InPlaceCounts: refused the epoch");
  }
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("plans", plans);
    archive.write("speeds_seen", speeds_seen);
    archive.write("spread_sum", spread_sum);
  }
  void load(torch::serialize::InputArchive& archive) {
    archive.read("plans", plans);
    archive.read("speeds_seen", speeds_seen);
    archive.read("spread_sum", spread_sum);
  }
};

// The same policy declaring, wrongly, that a copy of it is a snapshot.
struct InPlaceCountsClaimingCopies : InPlaceCounts {
  static constexpr bool copy_is_snapshot = true;
};

// Loads into its tensors in place (`archive.read` on a defined tensor), then refuses.
struct LoadsInPlaceThenRefuses : InPlaceCounts {
  void load(torch::serialize::InputArchive& archive) {
    archive.read("plans", plans);
    archive.read("speeds_seen", speeds_seen);
    TORCH_CHECK(false, "LoadsInPlaceThenRefuses: refused");
  }
};

std::int64_t count(const at::Tensor& t) { return t.item<std::int64_t>(); }

// Step `seed` of train_steps' run up to observe(), which the policy refuses.
template <class BalancerT>
void refused_step(Net& net, torch::optim::Optimizer& opt, BalancerT& balancer, std::uint64_t seed) {
  const StepKind kind = balancer.next_step();
  const auto b = small_batch(8, seed);
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
  opt.zero_grad();
  loss.backward();
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("InPlaceCounts: refused"));
}

}  // namespace

TEST_CASE("abandon_step restores a policy's state tensors changed in place", "[policy_transaction]") {
  auto net = small_net(5);
  Balancer<InPlaceCounts> balancer(net, InPlaceCounts{}, BalancerOptions().warmup_epochs(0));
  for (int i = 0; i < 3; ++i) {
    balancer.next_plan();  // counts a plan, in place
    balancer.abandon_step();
    CHECK(count(balancer.policy().plans) == 0);
  }
  auto opt = make_sgd(net);
  train_steps(net, opt, balancer, 0, 2, 100);
  CHECK(count(balancer.policy().plans) == 2);
  CHECK(count(balancer.policy().speeds_seen) == 2);
}

TEST_CASE("A policy that declares copy_is_snapshot wrongly is rolled back to its copy, which "
          "shares the tensors it changed in place",
          "[policy_transaction]") {
  // What the record-based snapshot above is for: the C++ copy shares the tensors.
  auto net = small_net(5);
  Balancer<InPlaceCountsClaimingCopies> balancer(net, InPlaceCountsClaimingCopies{},
                                                 BalancerOptions().warmup_epochs(0));
  balancer.next_plan();
  balancer.abandon_step();
  CHECK(count(balancer.policy().plans) == 1);
}

TEST_CASE("A hook that throws half-way through observe leaves the balancer's record as it was, "
          "and the run goes on as one without the step",
          "[policy_transaction]") {
  for (const bool checks : {true, false}) {
    CAPTURE(checks);
    auto net = small_net(6);
    auto opt = make_sgd(net);
    InPlaceCounts policy;
    const auto options = BalancerOptions().warmup_epochs(0).check_every_step(checks);
    Balancer<InPlaceCounts> balancer(net, policy, options);
    train_steps(net, opt, balancer, 0, 2, 100);
    const std::string before = saved_bytes(balancer);
    *policy.refuse_at = 3;  // the third speeds: counted in place, then refused
    refused_step(net, opt, balancer, 2);
    // Policy (plans 2, speeds 2), meter and counters: the record written before the step.
    CHECK(count(balancer.policy().plans) == 2);
    CHECK(count(balancer.policy().speeds_seen) == 2);
    CHECK(saved_bytes(balancer) == before);
    // Retried, the step is taken as by a run that never saw the refusal.
    *policy.refuse_at = -1;
    auto twin = small_net(6);
    auto twin_opt = make_sgd(twin);
    Balancer<InPlaceCounts> twin_balancer(twin, InPlaceCounts{}, options);
    train_steps(twin, twin_opt, twin_balancer, 0, 2, 100);
    train_steps(twin, twin_opt, twin_balancer, 2, 3, 100);
    opt.zero_grad();  // the same step again, on the parameters before it
    train_steps(net, opt, balancer, 2, 3, 100);
    CHECK(saved_bytes(balancer) == saved_bytes(twin_balancer));
  }
}

TEST_CASE("SpeedRead::previous_step: speeds handed over in a step that is refused are handed "
          "over again when it is retried",
          "[policy_transaction]") {
  auto net = small_net(7);
  auto opt = make_sgd(net);
  InPlaceCounts policy;
  const auto options =
      BalancerOptions().warmup_epochs(0).check_every_step(false).speed_read(SpeedRead::previous_step);
  Balancer<InPlaceCounts> balancer(net, policy, options);
  train_steps(net, opt, balancer, 0, 3, 100);  // steps 1 and 2 deliver the speeds of 0 and 1
  REQUIRE(count(balancer.policy().speeds_seen) == 2);
  const std::string before = saved_bytes(balancer);
  const double spreads_before = balancer.policy().spread_sum.item<double>();
  *policy.refuse_at = 3;  // step 3 delivers step 2's speeds first: refused
  refused_step(net, opt, balancer, 3);
  CHECK(count(balancer.policy().speeds_seen) == 2);
  CHECK(balancer.policy().spread_sum.item<double>() == spreads_before);
  CHECK(saved_bytes(balancer) == before);  // the last speeds and the pending read too
  *policy.refuse_at = -1;
  train_steps(net, opt, balancer, 3, 4, 100);
  CHECK(count(balancer.policy().speeds_seen) == 3);  // step 2's speeds, not lost
}

TEST_CASE("A start_epoch hook that throws after changing a tensor in place leaves the policy "
          "as it was",
          "[policy_transaction]") {
  auto net = small_net(8);
  auto opt = make_sgd(net);
  InPlaceCounts policy;
  Balancer<InPlaceCounts> balancer(net, policy, BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 2, 100);
  const std::string before = saved_bytes(balancer);
  *policy.refuse_at = -2;
  CHECK_THROWS_WITH(balancer.end_epoch(), Catch::Contains("refused the epoch"));
  CHECK(count(balancer.policy().plans) == 2);
  CHECK(saved_bytes(balancer) == before);
  *policy.refuse_at = -1;
  balancer.end_epoch();
  CHECK(count(balancer.policy().plans) == 102);
}

TEST_CASE("The library's tensor-holding policies replace their tensors, never change them in "
          "place, as copy_is_snapshot declares",
          "[policy_transaction]") {
  // A handle taken before a step keeps its values through the step: a copy of the policy
  // from before it would too.
  auto net = small_late_net(9);
  auto opt = make_sgd(net);
  SECTION("PMR") {
    Balancer<PMRPolicy> balancer(net, PMRPolicy(), BalancerOptions().warmup_epochs(0));
    for (int i = 0; i < 2; ++i) balanced_step(net, opt, balancer, small_batch(8, i));
    balancer.end_epoch();
    balanced_step(net, opt, balancer, small_batch(8, 2));
    const at::Tensor prototype = balancer.policy().prototypes()[0], prototype_values = prototype.clone();
    const at::Tensor coefficients = balancer.policy().coefficients(), coefficients_values = coefficients.clone();
    balanced_step(net, opt, balancer, small_batch(8, 3));
    balancer.end_epoch();  // new prototypes
    balanced_step(net, opt, balancer, small_batch(8, 4));
    CHECK(at::equal(prototype, prototype_values));
    CHECK(at::equal(coefficients, coefficients_values));
    CHECK_FALSE(at::equal(balancer.policy().prototypes()[0], prototype_values));
  }
  SECTION("MMPareto") {
    Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
    for (int i = 0; i < 2; ++i) balanced_step(net, opt, balancer, small_batch(8, i));
    const at::Tensor conflicts = balancer.policy().conflict_steps(), conflicts_values = conflicts.clone();
    const at::Tensor weights = balancer.policy().last_fused_weights(), weights_values = weights.clone();
    balanced_step(net, opt, balancer, small_batch(8, 2));
    CHECK(at::equal(conflicts, conflicts_values));
    CHECK(at::equal(weights, weights_values));
  }
  SECTION("OGM-GE") {
    Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().parameters(ModulatedParameters::all)),
                                   BalancerOptions().warmup_epochs(0));
    balanced_step(net, opt, balancer, small_batch(8, 0));
    const at::Tensor coefficients = balancer.policy().last_coefficients(), values = coefficients.clone();
    balanced_step(net, opt, balancer, small_batch(8, 1));
    CHECK(at::equal(coefficients, values));
  }
  SECTION("AGM") {
    Balancer<AGMPolicy> balancer(net, AGMPolicy(), BalancerOptions().warmup_epochs(0));
    const auto step = [&](int seed) {
      const MultiModalBatch b = small_batch(8, static_cast<std::uint64_t>(seed));
      balancer.next_step();
      const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, StepKind::regular), b.target, {b.x0, b.x1});
      opt.zero_grad();
      loss.backward();
      balancer.observe(loss);
      opt.step();
    };
    step(0);
    step(1);
    const at::Tensor scores = balancer.policy().running_scores(), scores_values = scores.clone();
    const at::Tensor coefficients = balancer.policy().last_coefficients(), values = coefficients.clone();
    step(2);
    CHECK(at::equal(scores, scores_values));
    CHECK(at::equal(coefficients, values));
  }
}

TEST_CASE("Balancer::load puts back a policy whose load changed its tensors in place, then threw",
          "[policy_transaction]") {
  auto net = small_net(10);
  auto opt = make_sgd(net);
  Balancer<InPlaceCounts> saved(net, InPlaceCounts{}, BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, saved, 0, 3, 100);
  const std::string record = saved_bytes(saved);
  auto other = small_net(10);
  auto other_opt = make_sgd(other);
  Balancer<LoadsInPlaceThenRefuses> balancer(other, LoadsInPlaceThenRefuses{}, BalancerOptions().warmup_epochs(0));
  train_steps(other, other_opt, balancer, 0, 1, 100);
  const std::string before = saved_bytes(balancer);
  CHECK_THROWS_WITH(load_saved(balancer, record), Catch::Contains("LoadsInPlaceThenRefuses: refused"));
  CHECK(count(balancer.policy().plans) == 1);  // not the record's 3
  CHECK(saved_bytes(balancer) == before);
}
