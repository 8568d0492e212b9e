// The policy a user would write (examples/custom_policy.h), checked against its rule
// written out here, trained through the balancer, and resumed from a checkpoint.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <custom_policy.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

TEST_CASE("DutyCyclePolicy holds the fastest branch on every period-th step while the spread "
          "exceeds the threshold (a table by hand)", "[custom_policy]") {
  DutyCyclePolicy p(3, 0.2);
  const StepPlan regular = StepPlan::regular();
  // Steps 1-3: nothing measured yet, so step 3 (due) is regular too.
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);
  p.observe_speeds(SpeedSummary::from_speeds({0.5, 0.1}));  // spread 0.4 > 0.2, branch 0 fastest
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == StepPlan::hold(0));  // step 6
  p.observe_speeds(SpeedSummary::from_speeds({0.2, 0.1, 0.05}));  // spread 0.15: within
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);  // step 9, due
  p.observe_speeds(SpeedSummary::from_speeds({-0.3, 0.2}));  // d_speed -0.5: spread 0.5, branch 1
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == regular);
  CHECK(p.next_plan() == StepPlan::hold(1));  // step 12
  CHECK_THROWS_WITH(DutyCyclePolicy(0, 0.1), Catch::Contains("period must be >= 1, got 0"));
  CHECK_THROWS_WITH(DutyCyclePolicy(2, -1.0), Catch::Contains("threshold must be >= 0"));
}

TEST_CASE("DutyCyclePolicy runs in the README's two-branch loop (next_step) unchanged but for the "
          "balancer's type", "[custom_policy][balancer]") {
  Net net = small_net(4);
  auto opt = make_sgd(net);
  Balancer<DutyCyclePolicy> balancer(net, DutyCyclePolicy(2, 0.0), BalancerOptions().warmup_epochs(0));
  // Steps 2, 4, 6, 8 are due, each after a regular step whose speeds were measured (a
  // spread above 0): each holds the branch the balancer last reported fastest
  // (rebalance_m0 holds branch 0); the odd steps are regular.
  std::int64_t fastest = -1;
  for (int i = 0; i < 8; ++i) {
    INFO("step " << i + 1);
    const StepKind kind = train_steps(net, opt, balancer, i, i + 1, 1000).front();
    if ((i + 1) % 2 == 0) {
      REQUIRE(fastest >= 0);
      CHECK(kind == (fastest == 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1));
    } else {
      CHECK(kind == StepKind::regular);
      fastest = balancer.last_speeds().fastest;
    }
  }
}

TEST_CASE("DutyCyclePolicy trained through the balancer on three branches: each plan is its rule "
          "applied to the speeds the balancer measured; a resumed run continues exactly",
          "[custom_policy][balancer]") {
  const auto make = [](ThreeWay& net) {
    return Balancer<DutyCyclePolicy>(net, DutyCyclePolicy(2, 0.0), BalancerOptions().warmup_epochs(0));
  };
  ThreeWay net = small_three_way(5);
  auto opt = make_sgd(net);
  auto balancer = make(net);
  // The rule, written again here, fed what the balancer reports after each regular step.
  std::int64_t steps = 0, fastest = -1;
  double spread = 0.0;
  int holds = 0;
  std::vector<StepPlan> plans;
  for (int i = 0; i < 12; ++i) {
    const bool due = ++steps % 2 == 0;
    const StepPlan want = due && fastest >= 0 && spread > 0.0 ? StepPlan::hold(static_cast<std::size_t>(fastest))
                                                              : StepPlan::regular();
    const StepPlan plan = train_plans(net, opt, balancer, i, i + 1, 1000).front();
    CHECK(plan == want);
    holds += plan.is_regular() ? 0 : 1;
    plans.push_back(plan);
    if (plan.is_regular()) {
      const SpeedSummary& s = balancer.last_speeds();
      REQUIRE(std::isfinite(s.spread));
      spread = *std::max_element(s.speeds.begin(), s.speeds.end()) - *std::min_element(s.speeds.begin(), s.speeds.end());
      fastest = s.fastest;
    }
  }
  CHECK(holds >= 3);

  // Saved after 5 steps (an odd count: a policy that resumed from a reset state would be
  // due on other steps), resumed into fresh objects: the same plans and parameters.
  const auto dir = fresh_test_dir("custom_policy", "resume");
  const std::string path = (dir / "run.pt").string();
  ThreeWay first = small_three_way(5);
  auto first_opt = make_sgd(first);
  auto first_balancer = make(first);
  auto resumed_plans = train_plans(first, first_opt, first_balancer, 0, 5, 1000);
  save_checkpoint(path, first, first_opt, first_balancer);
  ThreeWay resumed = small_three_way(77);
  auto resumed_opt = make_sgd(resumed);
  auto resumed_balancer = make(resumed);
  load_checkpoint(path, resumed, resumed_opt, resumed_balancer);
  const auto rest = train_plans(resumed, resumed_opt, resumed_balancer, 5, 12, 1000);
  resumed_plans.insert(resumed_plans.end(), rest.begin(), rest.end());
  CHECK(resumed_plans == plans);
  CHECK(same_state(*resumed, *net));

  // Other options are refused, naming them, and change nothing.
  ThreeWay other = small_three_way(77);
  auto other_opt = make_sgd(other);
  Balancer<DutyCyclePolicy> other_period(other, DutyCyclePolicy(3, 0.0), BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(load_checkpoint(path, other, other_opt, other_period),
                    Catch::Contains("made with period 2 and threshold 0") && Catch::Contains(path));
  CHECK(other_period.step() == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("The docs show the example policy, branch and fusion module as the files hold them", "[custom_policy][docs]") {
  const auto read = [](const std::string& relative) {
    std::ifstream in(std::string(MMBALANCE_SOURCE_DIR) + "/" + relative);
    REQUIRE(in);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  CHECK(read("docs/policies.md").find("```cpp\n" + read("examples/custom_policy.h") + "```") != std::string::npos);
  CHECK(read("docs/concepts.md").find("```cpp\n" + read("examples/signal_branch.h") + "```") != std::string::npos);
  CHECK(read("docs/concepts.md").find("```cpp\n" + read("examples/concat_gate_fusion.h") + "```") != std::string::npos);
}

TEST_CASE("next_step() refuses a plan-only policy's plan that holds a branch a two-branch network "
          "lacks, the policy as it was", "[custom_policy][balancer][bad-input]") {
  struct HoldsBranchTwo {
    std::int64_t plans = 0;
    StepPlan next_plan() {
      ++plans;
      return StepPlan::hold(2);
    }
  };
  Net net = small_net(4);
  Balancer<HoldsBranchTwo> balancer(net, HoldsBranchTwo{}, BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(balancer.next_step(), Catch::Contains("the policy holds branch 2, the network has 2 branches"));
  CHECK(balancer.policy().plans == 0);
}
