// OPM as a forward-side policy: its drop probabilities against the original's calcu_q
// written out, its plans (which branch, keep and scale) from scores computed by hand, the
// per-step draw's rate, the loss it trains, resume and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// The original's calcu_q (code/models/Classifier.py), two modalities, on plain numbers:
// ratio_1 = tanh(relu(p1 / p2 - 1)); q[0] = q_base (1 + lam ratio_1) if ratio_1 > 0 else 0;
// the same for q[1]; then clipped to [0, 1].
std::vector<double> calcu_q(double p1, double p2, double q_base, double lam) {
  const double r1 = std::tanh(std::max(p1 / p2 - 1, 0.0)), r2 = std::tanh(std::max(p2 / p1 - 1, 0.0));
  const auto clip = [](double q) { return std::min(std::max(q, 0.0), 1.0); };
  return {clip(r1 > 0 ? q_base * (1 + lam * r1) : 0), clip(r2 > 0 ? q_base * (1 + lam * r2) : 0)};
}

// s = Σ_i softmax(h_i / n)[y_i] written out (the original's performance_k from its slice
// of the concatenation head).
double score(const at::Tensor& head, const at::Tensor& target, double n) {
  double s = 0;
  for (std::int64_t i = 0; i < head.size(0); ++i) {
    double z = 0;
    for (std::int64_t c = 0; c < head.size(1); ++c) z += std::exp(head[i][c].item<double>() / n);
    s += std::exp(head[i][target[i].item<std::int64_t>()].item<double>() / n) / z;
  }
  return s;
}

// Hands `policy` the heads of one step (its gradient hook, which scores them).
void show_heads(OPMPolicy& policy, const std::vector<at::Tensor>& heads, const at::Tensor& target) {
  const std::vector<std::vector<at::Tensor>> no_parameters(heads.size());
  const std::function<void(at::Tensor&)> one_process;
  policy.modulate_gradients(StepGradients{heads, target, no_parameters, one_process, 0});
}

OPMPolicy two_branch(const OPMOptions& options) {
  OPMPolicy policy(options);
  policy.set_branches(2);
  return policy;
}

}  // namespace

TEST_CASE("OPM's drop probabilities are the original's calcu_q", "[opm]") {
  struct Row {
    double s0, s1, q_base, lambda;
  };
  for (const Row& r : {Row{3, 1, 0.5, 0.5}, Row{1, 4, 0.5, 0.5}, Row{2, 2, 0.5, 0.5}, Row{1.2, 1, 0.3, 2.0},
                       Row{5, 1, 0.9, 0.5} /* clipped at 1 */, Row{3, 1, 0.5, 0.0}}) {
    const std::vector<double> want = calcu_q(r.s0, r.s1, r.q_base, r.lambda);
    const std::vector<double> got = OPMPolicy::drop_probabilities({r.s0, r.s1}, r.q_base, r.lambda);
    CHECK(got[0] == Approx(want[0]).epsilon(1e-12));
    CHECK(got[1] == Approx(want[1]).epsilon(1e-12));
  }
  // By hand: scores 3 and 1 give q_0 = 0.5 (1 + 0.5 tanh 2) = 0.741007, q_1 = 0.
  CHECK(OPMPolicy::drop_probabilities({3, 1}, 0.5, 0.5)[0] == Approx(0.741007).epsilon(1e-6));
  CHECK(OPMPolicy::drop_probabilities({5, 1}, 0.9, 0.5)[0] == 1.0);
  // Three branches: each against the mean of the others, 4 / 1 and 1 / 2.5.
  const std::vector<double> three = OPMPolicy::drop_probabilities({4, 1, 1}, 0.5, 0.5);
  CHECK(three[0] == Approx(0.5 * (1 + 0.5 * std::tanh(3.0))).epsilon(1e-12));
  CHECK(three[1] == 0.0);
  CHECK(three[2] == 0.0);
}

TEST_CASE("OPM drops the leading branch with probability q, scales by 1 / (1 - theta), scores undropped steps",
          "[opm]") {
  OPMPolicy policy = two_branch(OPMOptions().p_exe(0.99).seed(1));
  CHECK_FALSE(policy.next_plan().modulated_branch());  // nothing scored yet
  // Branch 1 ahead: its head favours the targets.
  const at::Tensor target = at::tensor({0L, 1L, 2L, 0L});
  const at::Tensor h0 = at::tensor({0.1f, 0.0f, 0.2f, 0.3f, 0.1f, 0.0f, 0.0f, 0.2f, 0.1f, 0.0f, 0.0f, 0.4f}).view({4, 3});
  const at::Tensor h1 = at::tensor({3.0f, 0.0f, 0.0f, 0.0f, 2.0f, 0.5f, 0.0f, 0.0f, 4.0f, 2.5f, 1.0f, 0.0f}).view({4, 3});
  show_heads(policy, {h0, h1}, target);
  const double s0 = score(h0, target, 2), s1 = score(h1, target, 2);
  REQUIRE(policy.scores().size() == 2);
  CHECK(policy.scores()[0] == Approx(s0).epsilon(1e-6));
  CHECK(policy.scores()[1] == Approx(s1).epsilon(1e-6));
  const std::vector<double> q = calcu_q(s0, s1, 0.5, 0.5);
  REQUIRE(q[0] == 0.0);
  REQUIRE(q[1] > 0.5);
  const StepPlan plan = policy.next_plan();
  REQUIRE(plan.modulated_branch());
  CHECK(*plan.modulated_branch() == 1);
  CHECK(plan.keep_probability() == Approx(1 - q[1]).epsilon(1e-6));
  CHECK(plan.feature_scale() == Approx(1 / (1 - q[1] / 2)).epsilon(1e-6));  // theta = (d q_0 + d q_1) / 2d
  // A step that dropped a branch does not score it: the scores stay.
  show_heads(policy, {h1, h0}, target);
  CHECK(policy.scores()[1] == Approx(s1).epsilon(1e-6));
  // With p_exe 0 no step drops, and every step is scored.
  OPMPolicy never = two_branch(OPMOptions().p_exe(0.0));
  for (int i = 0; i < 3; ++i) {
    CHECK_FALSE(never.next_plan().modulated_branch());
    show_heads(never, i % 2 ? std::vector<at::Tensor>{h1, h0} : std::vector<at::Tensor>{h0, h1}, target);
    CHECK(never.scores()[0] == Approx(i % 2 ? s1 : s0).epsilon(1e-6));
  }
}

TEST_CASE("OPM keeps every step regular and scored while no branch leads; with three branches it drops the leader",
          "[opm]") {
  const at::Tensor target = at::tensor({0L, 1L});
  const at::Tensor same = at::tensor({1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f}).view({2, 3});
  OPMPolicy tied = two_branch(OPMOptions().p_exe(0.99).seed(1));
  tied.next_plan();
  show_heads(tied, {same, same}, target);
  for (int i = 0; i < 5; ++i) {
    CHECK_FALSE(tied.next_plan().modulated_branch());  // q = 0 for both: nothing to drop
    const at::Tensor lead = same * (2.0 + i);
    show_heads(tied, {lead, same}, target);  // scored, since nothing was dropped
    CHECK(tied.scores()[0] == Approx(score(lead, target, 2)).epsilon(1e-6));
    show_heads(tied, {same, same}, target);
  }
  // Three branches, branch 0 ahead: keep 1 - q_0, scale 1 / (1 - q_0 / 3).
  OPMPolicy three(OPMOptions().p_exe(0.99).seed(1));
  three.set_branches(3);
  three.next_plan();
  const at::Tensor strong = same * 4.0;
  show_heads(three, {strong, same, same}, target);
  const double s0 = score(strong, target, 3), s1 = score(same, target, 3);
  const double q0 = 0.5 * (1 + 0.5 * std::tanh(s0 / s1 - 1));
  const StepPlan plan = three.next_plan();
  REQUIRE(plan.modulated_branch());
  CHECK(*plan.modulated_branch() == 0);
  CHECK(plan.keep_probability() == Approx(1 - q0).epsilon(1e-6));
  CHECK(plan.feature_scale() == Approx(1 / (1 - q0 / 3)).epsilon(1e-6));
  // Two leaders tied (4, 4, 1): the lower index drops, and theta counts only what it drops.
  OPMPolicy tied_three(OPMOptions().p_exe(0.5).seed(2));
  tied_three.set_branches(3);
  tied_three.next_plan();
  show_heads(tied_three, {strong, strong, same}, target);
  const double s_lead = score(strong, target, 3);
  const double q_tied = 0.5 * (1 + 0.5 * std::tanh(s_lead / ((s_lead + s1) / 2) - 1));
  StepPlan tie = tied_three.next_plan();
  while (!tie.modulated_branch()) tie = tied_three.next_plan();  // past the draws that keep a step regular
  CHECK(*tie.modulated_branch() == 0);
  CHECK(tie.keep_probability() == Approx(1 - q_tied).epsilon(1e-6));
  CHECK(tie.feature_scale() == Approx(1 / (1 - q_tied / 3)).epsilon(1e-6));
}

TEST_CASE("OPM drops in a fraction p_exe of the steps", "[opm]") {
  const at::Tensor target = at::tensor({0L, 1L});
  const at::Tensor weak = at::zeros({2, 3}), strong = at::tensor({5.0f, 0.0f, 0.0f, 0.0f, 5.0f, 0.0f}).view({2, 3});
  for (const double p : {0.3, 0.7}) {
    OPMPolicy policy = two_branch(OPMOptions().p_exe(p).seed(5));
    policy.next_plan();
    show_heads(policy, {strong, weak}, target);  // branch 0 leads from now on
    int dropped = 0;
    const int steps = 4000;
    for (int i = 0; i < steps; ++i) {
      const StepPlan plan = policy.next_plan();
      if (plan.modulated_branch()) {
        CHECK(*plan.modulated_branch() == 0);
        ++dropped;
      }
    }
    // Binomial(4000, p): five standard deviations either side.
    const double sd = std::sqrt(steps * p * (1 - p));
    CHECK(std::abs(dropped - steps * p) < 5 * sd);
  }
}

TEST_CASE("OPM through the Balancer trains CE(y) and drops the branch its scores say", "[opm]") {
  Net net = small_late_net(4);
  auto opt = make_sgd(net);
  Balancer<OPMPolicy> balancer(net, OPMPolicy(OPMOptions().p_exe(0.99).seed(1)), BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 2);
  // Step 1: nothing scored, a regular step on CE(y).
  StepPlan plan = balancer.next_plan();
  REQUIRE(plan.is_regular());
  REQUIRE_FALSE(plan.modulated_branch());
  NetOutput out = net->forward({b.x0, b.x1}, plan);
  at::Tensor loss = balancer.loss(out, b.target);
  const at::Tensor y = (out.heads[0] + out.heads[1]) / 2;
  CHECK(loss.item<double>() == Approx(torch::nn::functional::cross_entropy(y.detach().to(at::kDouble), b.target).item<double>()).epsilon(1e-6));
  opt.zero_grad();
  loss.backward();
  balancer.observe(loss);
  opt.step();
  const double s0 = score(out.heads[0].detach(), b.target, 2), s1 = score(out.heads[1].detach(), b.target, 2);
  const std::vector<double> q = calcu_q(s0, s1, 0.5, 0.5);
  // Step 2: the branch with the larger q is dropped.
  plan = balancer.next_plan();
  REQUIRE(plan.modulated_branch());
  const std::size_t lead = q[0] > q[1] ? 0 : 1;
  CHECK(*plan.modulated_branch() == lead);
  CHECK(plan.keep_probability() == Approx(1 - q[lead]).epsilon(1e-5));
  out = net->forward({b.x0, b.x1}, plan);
  loss = balancer.loss(out, b.target);
  opt.zero_grad();
  loss.backward();
  balancer.observe(loss);
  opt.step();
  CHECK(balancer.policy().scores()[0] == Approx(s0).epsilon(1e-5));  // the dropping step scored nothing
}

TEST_CASE("OPM resumes its draws and scores exactly and refuses other options", "[opm]") {
  const at::Tensor target = at::tensor({0L, 1L});
  const at::Tensor weak = at::zeros({2, 3}), strong = at::tensor({3.0f, 0.0f, 0.0f, 0.0f, 3.0f, 0.0f}).view({2, 3});
  OPMPolicy first = two_branch(OPMOptions().seed(3));
  for (int i = 0; i < 5; ++i) first.next_plan();
  show_heads(first, {weak, strong}, target);
  const std::string bytes = saved_bytes(first);
  OPMPolicy resumed = two_branch(OPMOptions().seed(3));
  load_saved(resumed, bytes);
  CHECK(resumed.scores() == first.scores());
  for (int i = 0; i < 50; ++i) {
    const StepPlan a = first.next_plan(), b = resumed.next_plan();
    CHECK(a.modulated_branch() == b.modulated_branch());
    CHECK(a.keep_probability() == b.keep_probability());
    CHECK(a.feature_scale() == b.feature_scale());
  }
  OPMPolicy other = two_branch(OPMOptions().seed(3).p_exe(0.5));
  CHECK_THROWS_WITH(load_saved(other, bytes), Catch::Contains("made with p_exe 0.7, this policy has 0.5"));
  OPMPolicy reseeded = two_branch(OPMOptions().seed(4));
  CHECK_THROWS_WITH(load_saved(reseeded, bytes), Catch::Contains("made with seed 3, this policy has seed 4"));
  CHECK(other.scores().empty());  // nothing changed
  OPMPolicy three(OPMOptions().seed(3));
  three.set_branches(3);
  CHECK_THROWS_WITH(load_saved(three, bytes), Catch::Contains("made for 2 branches, this policy balances 3"));
  torch::serialize::OutputArchive damaged;
  damaged.write("branches", std::int64_t{2});
  CHECK_THROWS_WITH(load_saved(other, [&] {
                      std::ostringstream s;
                      damaged.save_to(s);
                      return s.str();
                    }()),
                    Catch::Contains("OPMPolicy: damaged state in checkpoint"));
}

TEST_CASE("OPM refuses bad options and heads by name", "[opm]") {
  CHECK_THROWS_WITH(OPMPolicy(OPMOptions().q_base(1.5)), Catch::Contains("q_base must be in [0, 1], got 1.5"));
  CHECK_THROWS_WITH(OPMPolicy(OPMOptions().q_base(NAN)), Catch::Contains("q_base must be in [0, 1]"));
  CHECK_THROWS_WITH(OPMPolicy(OPMOptions().lambda(-1)), Catch::Contains("lambda must be a finite number >= 0"));
  CHECK_THROWS_WITH(OPMPolicy(OPMOptions().p_exe(2)), Catch::Contains("p_exe must be in [0, 1), got 2"));
  CHECK_THROWS_WITH(OPMPolicy(OPMOptions().p_exe(1)), Catch::Contains("at 1 they would freeze"));
  CHECK_THROWS_WITH(OPMPolicy().next_plan(), Catch::Contains("OPMPolicy: no branch count"));
  OPMPolicy policy = two_branch(OPMOptions());
  CHECK_THROWS_WITH(show_heads(policy, {at::zeros({2, 3}), at::zeros({2, 3}), at::zeros({2, 3})}, at::tensor({0L, 1L})),
                    Catch::Contains("OPMPolicy: 3 heads for 2 branches"));
  CHECK_THROWS_WITH(show_heads(policy, {at::zeros({2, 3}), at::zeros({3, 3})}, at::tensor({0L, 1L})),
                    Catch::Contains("OPMPolicy: every head must be (batch, classes) logits for the 2 targets"));
}
