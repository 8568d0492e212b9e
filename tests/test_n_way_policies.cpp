#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support.h"

using namespace mmbalance;
using mmbalance::testing::for_branches;

namespace {

// The speeds s_k as the meter would report them: M(θ_k) = 1, M(θ_k') = 10^{s_k}.
SpeedSummary speeds_of(const std::vector<double>& s) {
  std::vector<double> m(s.size(), 1.0);
  for (double v : s) m.push_back(std::pow(10.0, v));
  return SpeedSummary::from_accumulators(m);
}

// The paper's two-branch guided rule (Algorithm 1) as the two-branch GuidedPolicy wrote
// it: regular while |d_speed| <= alpha; once a regular step leaves |d_speed| > alpha, the
// next Q steps re-balance m0 if that d_speed > 0, else m1.
struct TwoBranchGuidedRule {
  double alpha;
  std::int64_t q;
  bool rebalancing = false;
  std::int64_t window_step = 0;
  double last_d_speed = 0.0;

  StepKind next_step() {
    if (!rebalancing) return StepKind::regular;
    if (++window_step >= q) rebalancing = false;
    return last_d_speed > 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1;
  }
  void observe_d_speed(double d_speed) {
    last_d_speed = d_speed;
    if (std::abs(d_speed) > alpha) {
      window_step = 0;
      rebalancing = true;
    }
  }
};

template <class Policy>
void load_from(Policy& p, const std::string& bytes) {
  std::istringstream in(bytes);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  p.load(archive);
}

}  // namespace

TEST_CASE("GuidedPolicy with two branches follows the paper's two-branch rule step for step",
          "[n-way-policy]") {
  for (const auto& [alpha, q] : std::vector<std::pair<double, std::int64_t>>{{0.1, 5}, {0.3, 2}, {0.0, 1}}) {
    TwoBranchGuidedRule rule{alpha, q};
    auto policy = for_branches(GuidedPolicy(GuidedOptions().alpha(alpha).Q(q)), 2);
    std::mt19937_64 gen(static_cast<std::uint64_t>(q));
    std::uniform_real_distribution<double> speed(-0.5, 0.5);
    for (int step = 0; step < 400; ++step) {
      const StepKind kind = rule.next_step();
      REQUIRE(policy.next_plan() == kind);
      if (kind == StepKind::regular) {  // as the balancer does: speeds after regular steps
        const SpeedSummary s = speeds_of({speed(gen), speed(gen)});
        rule.observe_d_speed(s.d_speed);
        policy.observe_speeds(s);
      }
    }
  }
}

TEST_CASE("GuidedPolicy with three branches holds the fastest branch for Q steps",
          "[n-way-policy]") {
  // alpha 0.5, Q 2. Each row: the speeds observed after a regular step, then the plans
  // expected until the next regular step (R regular, h<k> hold k), written by hand.
  auto p = for_branches(GuidedPolicy(GuidedOptions().alpha(0.5).Q(2)), 3);
  struct Row {
    std::vector<double> speeds;
    std::string plans;
  };
  const std::vector<Row> table = {
      {{0.1, 0.2, 0.3}, "R"},             // spread 0.2 <= 0.5: regular
      {{0.0, 0.9, 0.1}, "h1 h1 R"},       // spread 0.9: hold branch 1, twice
      {{-0.4, 0.0, 0.6}, "h2 h2 R"},      // spread 1.0: hold branch 2
      {{0.3, 0.3, -0.1}, "R"},            // spread 0.4
      {{0.7, NAN, 0.0}, "R"},             // undefined speed: nothing changes
      {{0.8, 0.0, -0.1}, "h0 h0 R"},
  };
  CHECK(to_string(p.next_plan()) == "regular");  // before any speed
  // Exactly alpha is not more than alpha (a summary made by hand: no rounding).
  SpeedSummary at_alpha;
  at_alpha.speeds = {0.5, 0.0, 0.0};
  at_alpha.spread = 0.5;
  at_alpha.fastest = 0;
  p.observe_speeds(at_alpha);
  CHECK(to_string(p.next_plan()) == "regular");
  for (const auto& row : table) {
    CAPTURE(row.plans);
    p.observe_speeds(speeds_of(row.speeds));
    std::istringstream expected(row.plans);
    for (std::string want; expected >> want;) {
      const std::string got = to_string(p.next_plan());
      CHECK(got == (want == "R" ? std::string("regular") : "rebalance_m" + want.substr(1)));
    }
  }
}

TEST_CASE("GuidedPolicy resumes from its saved state and refuses other options",
          "[n-way-policy][bad-input]") {
  auto p = for_branches(GuidedPolicy(GuidedOptions().alpha(0.2).Q(4)), 3);
  p.next_plan();
  p.observe_speeds(speeds_of({0.0, 0.1, 0.9}));
  p.next_plan();  // one step into a window holding branch 2
  const std::string state = testing::saved_bytes(p);
  auto q = for_branches(GuidedPolicy(GuidedOptions().alpha(0.2).Q(4)), 3);
  load_from(q, state);
  for (int i = 0; i < 6; ++i) CHECK(q.next_plan() == p.next_plan());

  auto other_q = for_branches(GuidedPolicy(GuidedOptions().alpha(0.2).Q(2)), 3);
  CHECK_THROWS_WITH(load_from(other_q, state), Catch::Contains("made with Q 4") &&
                                                   Catch::Contains("this policy has Q 2"));
  auto four = for_branches(GuidedPolicy(GuidedOptions().alpha(0.2).Q(4)), 4);
  CHECK_THROWS_WITH(load_from(four, state), Catch::Contains("made for 3 branches") &&
                                                Catch::Contains("balances 4"));
  CHECK(four.next_plan() == StepPlan::regular());  // unchanged
  GuidedPolicy unset;
  CHECK_THROWS_WITH(unset.set_branches(1), Catch::Contains("at least 2 branches, got 1"));
  CHECK_THROWS_WITH(GuidedPolicy(GuidedOptions().Q(0)), Catch::Contains("Q must be >= 1"));
  CHECK_THROWS_WITH(p.observe_speeds(speeds_of({0.1, 0.2})),
                    Catch::Contains("speeds of 2 branches, the policy balances 3"));
  CHECK_THROWS_WITH(p.set_branches(2), Catch::Contains("made for 3 branches, the network has 2"));
}

TEST_CASE("RandomPolicy: the two-branch draws (engine % 3 as StepKind) for two branches, uniform "
          "over N + 1 plans", "[n-way-policy]") {
  // The two-branch RandomPolicy's rule: each draw of mt19937_64 modulo 3 is a StepKind.
  std::mt19937_64 engine(17);
  auto two = for_branches(RandomPolicy(RandomOptions().seed(17)), 2);
  for (int i = 0; i < 1000; ++i) REQUIRE(two.next_plan() == static_cast<StepKind>(engine() % 3));

  auto four = for_branches(RandomPolicy(RandomOptions().seed(3)), 4);
  std::array<int, 5> counts{};  // regular, hold 0..3
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const StepPlan plan = four.next_plan();
    ++counts[plan.is_regular() ? 0 : 1 + *plan.held_branch()];
  }
  // Each plan 1/5 of the draws: a binomial standard deviation is 0.0028, allow 5 of them.
  for (int c : counts) CHECK(std::abs(c / double(draws) - 0.2) < 0.014);

  const std::string state = testing::saved_bytes(four);
  auto again = for_branches(RandomPolicy(RandomOptions().seed(3)), 4);
  load_from(again, state);
  for (int i = 0; i < 50; ++i) CHECK(again.next_plan() == four.next_plan());
  auto other_seed = for_branches(RandomPolicy(RandomOptions().seed(4)), 4);
  CHECK_THROWS_WITH(load_from(other_seed, state), Catch::Contains("made with seed 3"));
  auto three = for_branches(RandomPolicy(RandomOptions().seed(3)), 3);
  CHECK_THROWS_WITH(load_from(three, state), Catch::Contains("made for 4 branches"));
  RandomPolicy unset;
  CHECK_THROWS_WITH(unset.next_plan(), Catch::Contains("no branch count"));
}

TEST_CASE("The deprecated N-branch names build the merged policies, the count checked against the "
          "network's", "[n-way-policy][bad-input]") {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  NWayGuidedPolicy guided(3, GuidedOptions().alpha(0.2).Q(4));
  NWayRandomPolicy random(3, RandomOptions().seed(3));
  static_assert(std::is_same_v<NWayGuidedPolicy, GuidedPolicy> && std::is_same_v<NWayRandomPolicy, RandomPolicy>);
#pragma GCC diagnostic pop
  CHECK_NOTHROW(GuidedPolicy(guided).set_branches(3));
  CHECK_THROWS_WITH(GuidedPolicy(guided).set_branches(2), Catch::Contains("made for 3 branches, the network has 2"));
  CHECK_THROWS_WITH(RandomPolicy(random).set_branches(4), Catch::Contains("made for 3 branches, the network has 4"));
  CHECK(random.next_plan() == for_branches(RandomPolicy(RandomOptions().seed(3)), 3).next_plan());
}
