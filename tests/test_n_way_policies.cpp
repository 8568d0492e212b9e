#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "support.h"

using namespace mmbalance;

namespace {

// The speeds s_k as the meter would report them: M(θ_k) = 1, M(θ_k') = 10^{s_k}.
NWaySpeedSummary speeds_of(const std::vector<double>& s) {
  std::vector<double> m(s.size(), 1.0);
  for (double v : s) m.push_back(std::pow(10.0, v));
  return NWaySpeedSummary::from_accumulators(m);
}

template <class Policy>
void load_from(Policy& p, const std::string& bytes) {
  std::istringstream in(bytes);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  p.load(archive);
}

}  // namespace

TEST_CASE("NWayGuidedPolicy with two branches is GuidedPolicy step for step", "[n-way-policy]") {
  for (const auto& [alpha, q] : std::vector<std::pair<double, std::int64_t>>{{0.1, 5}, {0.3, 2}, {0.0, 1}}) {
    GuidedPolicy pair(GuidedOptions().alpha(alpha).Q(q));
    NWayGuidedPolicy n_way(2, GuidedOptions().alpha(alpha).Q(q));
    std::mt19937_64 gen(static_cast<std::uint64_t>(q));
    std::uniform_real_distribution<double> speed(-0.5, 0.5);
    for (int step = 0; step < 400; ++step) {
      const StepKind kind = pair.next_step();
      const StepPlan plan = n_way.next_plan();
      REQUIRE(plan == StepPlan::from(kind));
      if (kind == StepKind::regular) {  // as the balancer does: speeds after regular steps
        const double s0 = speed(gen), s1 = speed(gen);
        const NWaySpeedSummary s = speeds_of({s0, s1});
        pair.observe_d_speed(s.imbalance);
        n_way.observe_speeds(s);
      }
    }
  }
}

TEST_CASE("NWayGuidedPolicy with three branches holds the fastest branch for Q steps",
          "[n-way-policy]") {
  // alpha 0.5, Q 2. Each row: the speeds observed after a regular step, then the plans
  // expected until the next regular step (R regular, h<k> hold k), written by hand.
  NWayGuidedPolicy p(3, GuidedOptions().alpha(0.5).Q(2));
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
  NWaySpeedSummary at_alpha;
  at_alpha.speeds = {0.5, 0.0, 0.0};
  at_alpha.imbalance = 0.5;
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

TEST_CASE("NWayGuidedPolicy resumes from its saved state and refuses other options",
          "[n-way-policy][bad-input]") {
  NWayGuidedPolicy p(3, GuidedOptions().alpha(0.2).Q(4));
  p.next_plan();
  p.observe_speeds(speeds_of({0.0, 0.1, 0.9}));
  p.next_plan();  // one step into a window holding branch 2
  const std::string state = testing::saved_bytes(p);
  NWayGuidedPolicy q(3, GuidedOptions().alpha(0.2).Q(4));
  load_from(q, state);
  for (int i = 0; i < 6; ++i) CHECK(q.next_plan() == p.next_plan());

  NWayGuidedPolicy other_q(3, GuidedOptions().alpha(0.2).Q(2));
  CHECK_THROWS_WITH(load_from(other_q, state), Catch::Contains("made with Q 4") &&
                                                   Catch::Contains("this policy has Q 2"));
  NWayGuidedPolicy four(4, GuidedOptions().alpha(0.2).Q(4));
  CHECK_THROWS_WITH(load_from(four, state), Catch::Contains("made for 3 branches") &&
                                                Catch::Contains("balances 4"));
  CHECK(four.next_plan() == StepPlan::regular());  // unchanged
  CHECK_THROWS_WITH(NWayGuidedPolicy(1), Catch::Contains("at least 2 branches, got 1"));
  CHECK_THROWS_WITH(NWayGuidedPolicy(3, GuidedOptions().Q(0)), Catch::Contains("Q must be >= 1"));
  CHECK_THROWS_WITH(p.observe_speeds(speeds_of({0.1, 0.2})),
                    Catch::Contains("speeds of 2 branches, the policy balances 3"));
}

TEST_CASE("NWayRandomPolicy: RandomPolicy's draws for two branches, uniform over N + 1 plans",
          "[n-way-policy]") {
  RandomPolicy pair(RandomOptions().seed(17));
  NWayRandomPolicy two(2, RandomOptions().seed(17));
  for (int i = 0; i < 1000; ++i) REQUIRE(two.next_plan() == StepPlan::from(pair.next_step()));

  NWayRandomPolicy four(4, RandomOptions().seed(3));
  std::array<int, 5> counts{};  // regular, hold 0..3
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const StepPlan plan = four.next_plan();
    ++counts[plan.is_regular() ? 0 : 1 + *plan.held_branch()];
  }
  // Each plan 1/5 of the draws: a binomial standard deviation is 0.0028, allow 5 of them.
  for (int c : counts) CHECK(std::abs(c / double(draws) - 0.2) < 0.014);

  const std::string state = testing::saved_bytes(four);
  NWayRandomPolicy again(4, RandomOptions().seed(3));
  load_from(again, state);
  for (int i = 0; i < 50; ++i) CHECK(again.next_plan() == four.next_plan());
  NWayRandomPolicy other_seed(4, RandomOptions().seed(4));
  CHECK_THROWS_WITH(load_from(other_seed, state), Catch::Contains("made with seed 3"));
  NWayRandomPolicy three(3, RandomOptions().seed(3));
  CHECK_THROWS_WITH(load_from(three, state), Catch::Contains("made for 4 branches"));
}
