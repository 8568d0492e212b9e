// MMPareto as a gradient-modulating policy: its combination of each branch's multimodal
// and uni-modal gradients against hand-computed numbers and against the original code's
// rule written out on plain numbers, through the Balancer on MMTM, late-fusion and
// three-branch networks, its edges, resume and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <sstream>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

using Grads = std::vector<std::vector<double>>;  // one branch: each parameter's elements

// The original's rule (MMPareto.py and min_norm_solvers.py) on plain numbers: m, u are one
// branch's multimodal and uni-modal gradients; returns its new gradients and the weight c.
std::pair<Grads, double> reference(const Grads& m, const Grads& u, double gamma) {
  double v11 = 0, v12 = 0, v22 = 0;
  for (std::size_t p = 0; p < m.size(); ++p) {
    for (std::size_t e = 0; e < m[p].size(); ++e) {
      v11 += m[p][e] * m[p][e];
      v12 += m[p][e] * u[p][e];
      v22 += u[p][e] * u[p][e];
    }
  }
  double c = 0.5;  // cos > 0: equal weights
  if (!(v12 > 0)) {
    if (v12 >= v11) {
      c = 0.999;
    } else if (v12 >= v22) {
      c = 0.001;
    } else {
      c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12));
    }
  }
  Grads out;
  for (std::size_t p = 0; p < m.size(); ++p) {
    std::vector<double> combined;
    double whole = 0, fresh = 0;
    for (std::size_t e = 0; e < m[p].size(); ++e) {
      combined.push_back(2 * c * m[p][e] + 2 * (1 - c) * u[p][e]);
      whole += (m[p][e] + u[p][e]) * (m[p][e] + u[p][e]);
      fresh += combined.back() * combined.back();
    }
    const double diff = std::sqrt(whole) / std::sqrt(fresh);
    for (double& v : combined) v *= (diff > 1 ? diff : 1.0) * gamma;
    out.push_back(combined);
  }
  return {out, c};
}

at::Tensor tensor_of(const std::vector<double>& v) { return at::tensor(v, at::kDouble); }

// Parameters whose .grad() holds m + u, and the fused gradients m, as the balancer hands them.
struct HookInput {
  std::vector<std::vector<at::Tensor>> params, fused;
};
HookInput hook_input(const std::vector<Grads>& m, const std::vector<Grads>& u) {
  HookInput in;
  for (std::size_t k = 0; k < m.size(); ++k) {
    in.params.emplace_back();
    in.fused.emplace_back();
    for (std::size_t p = 0; p < m[k].size(); ++p) {
      at::Tensor param = at::ones({static_cast<std::int64_t>(m[k][p].size())}, at::kDouble).requires_grad_();
      param.mutable_grad() = tensor_of(m[k][p]) + tensor_of(u[k][p]);
      in.params[k].push_back(param);
      in.fused[k].push_back(tensor_of(m[k][p]));
    }
  }
  return in;
}

void run_hook(MMParetoPolicy& policy, const HookInput& in) {
  const std::vector<at::Tensor> heads;
  const at::Tensor target = at::zeros({4}, at::kLong);
  const std::function<void(at::Tensor&)> one_process;
  policy.modulate_gradients(StepGradients{heads, target, in.params, one_process, 1, in.fused});
}

// What MMPareto should make of one step of `net` on `b`, from a twin with the same state:
// per branch, the original's rule applied to m = ∂CE(y)/∂θ_k and u = (∂(CE(y) + Σ CE_k)/∂θ_k) − m.
template <class NetT>
std::vector<std::pair<Grads, double>> expected_step(const NetT& net, NetT twin, const Batch& b, double gamma) {
  copy_state(net, twin);
  const auto grads_of = [&](bool whole) {
    twin->zero_grad();
    const NetOutput out = forward_heads(twin, b.inputs);
    at::Tensor loss = at::cross_entropy_loss(out.y, b.target);
    if (whole) loss = loss + modality_specific_loss(out, b.target);
    loss.backward();
    std::vector<Grads> g;
    for (const auto& branch : branches_of(twin)) {
      g.emplace_back();
      for (const auto& p : branch) g.back().push_back(as_doubles(p.grad()));
    }
    return g;
  };
  const std::vector<Grads> m = grads_of(false), whole = grads_of(true);
  std::vector<std::pair<Grads, double>> expected;
  for (std::size_t k = 0; k < m.size(); ++k) {
    Grads u = whole[k];
    for (std::size_t p = 0; p < u.size(); ++p) {
      for (std::size_t e = 0; e < u[p].size(); ++e) u[p][e] -= m[k][p][e];
    }
    expected.push_back(reference(m[k], u, gamma));
  }
  return expected;
}

template <class NetT>
void check_step_through_balancer(NetT net, NetT twin, const Batch& b, double gamma) {
  const std::size_t n = branches_of(net).size();
  const auto expected = expected_step(net, twin, b, gamma);
  Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(MMParetoOptions().gamma(gamma)),
                                    BalancerOptions().warmup_epochs(0));
  balancer.next_plan();
  const NetOutput out = forward_heads(net, b.inputs);
  const at::Tensor loss = balancer.loss(out, b.target);
  // The loss: the multimodal CE plus every uni-modal CE, each with weight 1.
  double by_hand = at::cross_entropy_loss(out.y, b.target).item<double>();
  for (const auto& h : out.heads) by_hand += at::cross_entropy_loss(h, b.target).item<double>();
  CHECK(loss.item<double>() == Approx(by_hand).epsilon(1e-6));
  net->zero_grad();
  loss.backward();
  balancer.observe(loss);
  const auto branches = branches_of(net);
  double conflicts = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const auto& [grads, c] = expected[k];
    CHECK(balancer.policy().last_fused_weights()[static_cast<std::int64_t>(k)].item<double>() ==
          Approx(c).epsilon(1e-4));
    conflicts += c != 0.5;
    for (std::size_t p = 0; p < branches[k].size(); ++p) {
      const std::vector<double> got = as_doubles(branches[k][p].grad());
      double scale = 1e-12;
      for (double v : grads[p]) scale = std::max(scale, std::abs(v));
      for (std::size_t e = 0; e < got.size(); ++e) CHECK(got[e] == Approx(grads[p][e]).margin(1e-4 * scale));
    }
  }
  CHECK(balancer.policy().conflict_steps().sum().item<double>() == conflicts);
}

}  // namespace

TEST_CASE("MMPareto combines conflicting gradients with the min-norm weights (the public "
          "collection keeps them at [0, 0]), agreeing ones equally, by hand", "[mmpareto]") {
  // Branch 0 conflicts: m·u = (1·-1 + 0·1) + (1·-2) = -3 over its two parameters, with
  // ‖m‖² = 2 and ‖u‖² = 6, so c = (6 + 3) / (2 + 6 + 6) = 9/14 on m, 5/14 on u.
  // Parameter a: new = 2(9/14·(1, 0) + 5/14·(-1, 1)) = (8, 10)/14, whole gradient (0, 1) of
  // norm 1 > ‖new‖, so stretched to norm 1, times γ. Parameter b: new = 2(9/14 - 10/14) =
  // -1/7, whole |1 - 2| = 1, stretched to -1, times γ.
  // Branch 1 agrees: m·u = 1 > 0, weights ½: new = m + u = the whole gradient, times γ.
  const std::vector<Grads> m = {{{1, 0}, {1}}, {{1, 1}}}, u = {{{-1, 1}, {-2}}, {{1, 0}}};
  auto policy = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 2);
  const HookInput in = hook_input(m, u);
  run_hook(policy, in);
  const double norm_a = std::sqrt(8.0 * 8.0 + 10.0 * 10.0);
  const std::vector<double> a = as_doubles(in.params[0][0].grad()), b = as_doubles(in.params[0][1].grad()),
                            c = as_doubles(in.params[1][0].grad());
  CHECK(a[0] == Approx(1.5 * 8 / norm_a).epsilon(1e-12));
  CHECK(a[1] == Approx(1.5 * 10 / norm_a).epsilon(1e-12));
  CHECK(b[0] == Approx(-1.5).epsilon(1e-12));
  CHECK(c[0] == Approx(1.5 * 2).epsilon(1e-12));
  CHECK(c[1] == Approx(1.5 * 1).epsilon(1e-12));
  CHECK(policy.last_fused_weights()[0].item<double>() == Approx(9.0 / 14).epsilon(1e-12));
  CHECK(policy.last_fused_weights()[1].item<double>() == 0.5);
  CHECK((as_doubles(policy.conflict_steps()) == std::vector<double>{1, 0}));
  // The written-out original gives the same numbers (so the later tests may trust it).
  const auto [ref, weight] = reference(m[0], u[0], 1.5);
  CHECK(weight == Approx(9.0 / 14));
  CHECK(ref[0][0] == Approx(a[0]));
  CHECK(ref[1][0] == Approx(b[0]));
  // c·m + (1 - c)·u is the point of the segment nearest 0: orthogonal to m - u.
  const double cm = 9.0 / 14, p0 = cm * 1 + (1 - cm) * -1, p1 = (1 - cm) * 1, p2 = cm * 1 + (1 - cm) * -2;
  CHECK(p0 * 2 + p1 * -1 + p2 * 3 == Approx(0).margin(1e-12));
}

TEST_CASE("MMPareto at the edges: agreeing gradients are only scaled by gamma, zero ones stay "
          "zero, a missing multimodal gradient leaves the uni-modal one", "[mmpareto]") {
  auto policy = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.25)), 2);
  // Parallel gradients (equal directions): exactly γ times the whole gradient.
  const HookInput parallel = hook_input({{{1, 2}}, {{0.5, -1}}}, {{{2, 4}}, {{1, -2}}});
  run_hook(policy, parallel);
  CHECK((as_doubles(parallel.params[0][0].grad()) == std::vector<double>{1.25 * 3, 1.25 * 6}));
  CHECK((as_doubles(parallel.params[1][0].grad()) == std::vector<double>{1.25 * 1.5, 1.25 * -3}));
  // All zero: zero, not NaN (the original divides 0 by 0 here).
  const HookInput zero = hook_input({{{0, 0}}, {{0, 0}}}, {{{0, 0}}, {{0, 0}}});
  run_hook(policy, zero);
  CHECK((as_doubles(zero.params[0][0].grad()) == std::vector<double>{0, 0}));
  // m = 0: g_m·g_u = 0, no conflict (the original's solver would put c = 0.999 on the
  // zero m and stretch 0.002·u back: the same γ·u).
  const HookInput no_fused = hook_input({{{0, 0}}, {{1, 0}}}, {{{3, -4}}, {{0, 1}}});
  run_hook(policy, no_fused);
  const std::vector<double> g = as_doubles(no_fused.params[0][0].grad());
  CHECK(g[0] == Approx(1.25 * 3).epsilon(1e-9));
  CHECK(g[1] == Approx(1.25 * -4).epsilon(1e-9));
  CHECK(policy.last_fused_weights()[0].item<double>() == 0.5);
  // u = 0: no conflict either (the original's c = 0.001 gives the same γ·m).
  const HookInput no_unimodal = hook_input({{{3, 4}}, {{1, 1}}}, {{{0, 0}}, {{1, 1}}});
  run_hook(policy, no_unimodal);
  CHECK(policy.last_fused_weights()[0].item<double>() == 0.5);
  const std::vector<double> h = as_doubles(no_unimodal.params[0][0].grad());
  CHECK(h[0] == Approx(1.25 * 3).epsilon(1e-9));
  CHECK(h[1] == Approx(1.25 * 4).epsilon(1e-9));
  // Exactly opposite with equal norms: the min-norm point is 0, and the update is 0.
  const HookInput opposite = hook_input({{{1, 0}}, {{1, 0}}}, {{{-1, 0}}, {{1, 0}}});
  run_hook(policy, opposite);
  CHECK((as_doubles(opposite.params[0][0].grad()) == std::vector<double>{0, 0}));
  // Only `opposite` conflicts; branch 1's orthogonal m, u of no_fused (cos = 0) are no
  // conflict: its g_m·g_u = 0 lies within rounding.
  CHECK((as_doubles(policy.conflict_steps()) == std::vector<double>{1, 0}));
  // A parameter whose combination is exactly 0 while its gradient is not (the original
  // divides ‖g_p‖ by 0 and writes NaN): its gradient becomes 0. Branch 0: a = (1, 0)/(1, 0)
  // and b = (3)/(-1): ‖m‖² = 10, m·u = 1 - 3 = -2, ‖u‖² = 2, so c = (2 + 2) / (10 + 2 + 4) = ¼;
  // b's combination 2(¾ - ¾) = 0 with g_b = 2; a's 2(¼ + ¾, 0) = (2, 0) = g_a: γ·g_a.
  auto fresh = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.25)), 2);
  const HookInput vanishing = hook_input({{{1, 0}, {3}}, {{1, 0}}}, {{{1, 0}, {-1}}, {{1, 0}}});
  run_hook(fresh, vanishing);
  CHECK(fresh.last_fused_weights()[0].item<double>() == 0.25);
  CHECK(as_doubles(vanishing.params[0][1].grad())[0] == 0);
  CHECK((as_doubles(vanishing.params[0][0].grad()) == std::vector<double>{1.25 * 2, 0}));
}

TEST_CASE("MMPareto's parameter filter: unselected parameters keep their gradient and do not "
          "enter the weights", "[mmpareto]") {
  // Branch 0: a 1-d parameter that would make the branch conflict, and a 2-d one that
  // agrees; non_bias combines the 2-d one only: agreeing, so γ·g, and the 1-d one untouched.
  HookInput in = hook_input({{{1}, {1, 1}}, {{1, 1}}}, {{{-5}, {1, 1}}, {{1, 1}}});
  for (auto& branch : in.params) {
    for (auto& p : branch) {
      if (p.numel() == 2) {
        at::Tensor g = p.grad();
        p = p.detach().view({1, 2}).requires_grad_();
        p.mutable_grad() = g.view({1, 2});
      }
    }
  }
  for (auto& branch : in.fused) {
    for (auto& f : branch) {
      if (f.numel() == 2) f = f.view({1, 2});
    }
  }
  auto policy = for_branches(MMParetoPolicy(MMParetoOptions().gamma(2).parameters(ModulatedParameters::non_bias)), 2);
  run_hook(policy, in);
  CHECK((as_doubles(in.params[0][0].grad()) == std::vector<double>{-4}));
  CHECK((as_doubles(in.params[0][1].grad()) == std::vector<double>{4, 4}));
  CHECK(policy.last_fused_weights()[0].item<double>() == 0.5);
  // With every parameter the same branch conflicts: m·u = -5 + 2 = -3.
  HookInput all = hook_input({{{1}, {1, 1}}, {{1, 1}}}, {{{-5}, {1, 1}}, {{1, 1}}});
  auto every = for_branches(MMParetoPolicy(MMParetoOptions().gamma(2)), 2);
  run_hook(every, all);
  CHECK(every.last_fused_weights()[0].item<double>() != 0.5);
}

TEST_CASE("MMPareto through the Balancer: the loss is CE(y) + Σ CE_k and each branch's gradient "
          "is the original's combination, on MMTM, late-fusion and three-branch networks",
          "[mmpareto][n-way]") {
  const MultiModalBatch b = small_batch(8, 21);
  const Batch two{{b.x0, b.x1}, b.target};
  check_step_through_balancer(small_net(4), small_net(99), two, 1.5);
  check_step_through_balancer(small_late_net(4), small_late_net(99), two, 1.5);
  check_step_through_balancer(small_three_way(4), small_three_way(99), n_way_batch(3, 8, 22), 0.7);
  // A step built to conflict on branch 0 of a late-fusion network: its input is the same
  // in every row (so every row has the same features), its head leans to class 1, branch
  // 1's head strongly to class 0 (leaning_late_net). Rows of class 0: y is right, head 0 wrong (g_u pulls
  // towards 0, g_m barely); rows of class 1: head 0 right, y wrong because of branch 1
  // (g_m pulls towards class 1, g_u barely): opposite directions on the shared features.
  Net late = leaning_late_net(8);
  const MultiModalBatch c = small_batch(8, 23);
  const Batch conflicting{{c.x0[0].expand_as(c.x0).contiguous(), c.x1}, at::tensor({0, 1, 0, 1, 0, 1, 0, 1}, at::kLong)};
  const double c0 = expected_step(late, small_late_net(99), conflicting, 1.5)[0].second;
  CHECK(c0 != 0.5);  // the min-norm weights, not the equal ones
  check_step_through_balancer(late, small_late_net(99), conflicting, 1.5);
}

TEST_CASE("MMPareto in late fusion: the uni-modal gradient on a branch is its own head's CE "
          "gradient, and fusion parameters keep their gradient", "[mmpareto]") {
  // g - ∂CE(y)/∂θ_0 = ∂CE(y0)/∂θ_0 when nothing joins the branches before the heads. In
  // double: the subtraction cancels, and in float its rounding (about 1e-7 of |g|) depends
  // on the CPU's kernels.
  Net net = small_late_net(5);
  net->to(at::kDouble);
  const MultiModalBatch b = small_batch(8, 5);
  const ModelOutput out = net->forward(b.x0.to(at::kDouble), b.x1.to(at::kDouble));
  const auto theta0 = net->parameter_groups().branch[0];
  const auto grads = [&](const at::Tensor& loss) {
    return torch::autograd::grad({loss}, theta0, {}, /*retain_graph=*/true);
  };
  const auto whole = grads(at::cross_entropy_loss(out.y, b.target) + modality_specific_loss(out, b.target));
  const auto fused = grads(at::cross_entropy_loss(out.y, b.target));
  const auto own = grads(at::cross_entropy_loss(out.y0, b.target));
  for (std::size_t p = 0; p < theta0.size(); ++p) CHECK(at::allclose(whole[p] - fused[p], own[p], 1e-10, 1e-12));

  // On the MMTM network the fusion modules' parameters are not a branch's: untouched.
  Net mmtm = small_net(6);
  Net twin = small_net(99);
  copy_state(mmtm, twin);
  const ModelOutput twin_out = twin->forward(b.x0, b.x1);
  (at::cross_entropy_loss(twin_out.y, b.target) + modality_specific_loss(twin_out, b.target)).backward();
  Balancer<MMParetoPolicy> balancer(mmtm, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  balancer.next_plan();
  const at::Tensor loss = balancer.loss(mmtm->forward(b.x0, b.x1), b.target);
  loss.backward();
  balancer.observe(loss);
  const auto fusion = mmtm->taps[0].module->parameters(), twin_fusion = twin->taps[0].module->parameters();
  REQUIRE(!fusion.empty());
  for (std::size_t p = 0; p < fusion.size(); ++p) CHECK(at::allclose(fusion[p].grad(), twin_fusion[p].grad()));
}

TEST_CASE("MMPareto in warm-up: its losses summed (the multimodal and every uni-modal one), plain "
          "gradients, no fused gradients computed", "[mmpareto]") {
  Net net = small_net(7), twin = small_net(99);
  copy_state(net, twin);
  const MultiModalBatch b = small_batch(8, 7);
  const ModelOutput twin_out = twin->forward(b.x0, b.x1);
  (at::cross_entropy_loss(twin_out.y, b.target) + at::cross_entropy_loss(twin_out.y0, b.target) +
   at::cross_entropy_loss(twin_out.y1, b.target)).backward();
  Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(1));
  balancer.next_plan();
  const ModelOutput out = net->forward(b.x0, b.x1);
  const at::Tensor loss = balancer.loss(out, b.target);
  CHECK(loss.item<double>() == Approx((at::cross_entropy_loss(out.y, b.target) + at::cross_entropy_loss(out.y0, b.target) +
                                       at::cross_entropy_loss(out.y1, b.target)).item<double>()));
  loss.backward();
  balancer.observe(loss);
  const auto p = net->parameters(), q = twin->parameters();
  for (std::size_t j = 0; j < p.size(); ++j) CHECK(at::allclose(p[j].grad(), q[j].grad(), 1e-5, 1e-7));
  CHECK_FALSE(balancer.policy().last_fused_weights().defined());
}

TEST_CASE("MMPareto resumes bit for bit mid-run, conflict counts included", "[mmpareto][checkpoint]") {
  const auto make = [] {
    Net net = leaning_late_net(2);
    auto opt = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    auto bal = std::make_shared<Balancer<MMParetoPolicy>>(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(1));
    return std::tuple{net, opt, bal};
  };
  const auto loss_of = [](Net& net, Balancer<MMParetoPolicy>& bal, int i) {
    const auto b = small_batch(8, static_cast<std::uint64_t>(100 + i));
    return bal.loss(net->forward(b.x0, b.x1), b.target);
  };
  const auto [a, b] = runs_resumed_mid_run("mmpareto", make, loss_of, [](const Balancer<MMParetoPolicy>& bal) {
    REQUIRE(bal.policy().conflict_steps().sum().item<std::int64_t>() > 0);  // the counts are state
  });
  CHECK(same_state(*std::get<0>(a), *std::get<0>(b)));
  const MMParetoPolicy &ended_a = std::get<2>(a)->policy(), &ended_b = std::get<2>(b)->policy();
  CHECK(at::equal(ended_a.conflict_steps(), ended_b.conflict_steps()));
  CHECK(saved_bytes(ended_a) == saved_bytes(ended_b));
}

TEST_CASE("MMPareto refuses bad options, networks and losses by name", "[mmpareto][bad-input]") {
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(MMParetoOptions().gamma(0)), 2), Catch::Contains("gamma must be a finite number > 0, got 0"));
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(MMParetoOptions().gamma(-1)), 2), Catch::Contains("gamma must be a finite number > 0, got -1"));
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(MMParetoOptions().gamma(INFINITY)), 2), Catch::Contains("gamma must be a finite number"));
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(MMParetoOptions().gamma(NAN)), 2), Catch::Contains("gamma must be a finite number"));
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(), 1), Catch::Contains("needs 2 or more branches, got 1"));
  CHECK_THROWS_WITH(for_branches(MMParetoPolicy(MMParetoOptions().parameters(static_cast<ModulatedParameters>(7))), 2),
                    Catch::Contains("parameters must be conv_weights, non_bias or all, got the value 7"));
  Net net = small_net(3);
  CHECK_THROWS_WITH(Balancer<MMParetoPolicy>(net, for_branches(MMParetoPolicy(), 3)),
                    Catch::Contains("the policy was made for 3 branches, the network has 2"));

  Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 1);
  // A loss formed without the balancer: refused, the step abandoned.
  balancer.next_plan();
  const at::Tensor plain = modality_specific_loss(net->forward(b.x0, b.x1), b.target);
  plain.backward();
  CHECK_THROWS_WITH(balancer.observe(plain), Catch::Contains("form the loss with balancer.loss(out, target)"));
  CHECK(balancer.step() == 0);
  // An output without a graph: the fused gradient cannot be taken.
  balancer.next_plan();
  ModelOutput detached;
  {
    torch::NoGradGuard no_grad;
    detached = net->forward(b.x0, b.x1);
  }
  CHECK_THROWS_WITH(balancer.loss(detached, b.target), Catch::Contains("does not require a gradient"));
  // Targets for other rows: the weighted loss names both sizes.
  CHECK_THROWS_WITH(balancer.loss(net->forward(b.x0, b.x1), b.target.narrow(0, 0, 4)),
                    Catch::Contains("Balancer::loss: target must be (batch) class indices with batch 8, got [4]"));
  balancer.abandon_step();
  // A non-finite gradient is refused by the balancer before the policy runs.
  balancer.next_plan();
  const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1), b.target);
  net->zero_grad();
  loss.backward();
  net->parameter_groups().branch[1].front().grad().view({-1})[0] = NAN;
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite gradient in group theta1"));
  CHECK_FALSE(balancer.policy().last_fused_weights().defined());
  CHECK(balancer.step() == 0);
}

TEST_CASE("MMPareto state from other options, or damaged, is refused and changes nothing",
          "[mmpareto][bad-input][checkpoint]") {
  auto trained = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 2);
  run_hook(trained, hook_input({{{1, 0}}, {{1, 1}}}, {{{-1, 1}}, {{1, 0}}}));
  const std::string record = saved_bytes(trained);
  auto fresh = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 2);
  load_saved(fresh, record);
  CHECK((as_doubles(fresh.conflict_steps()) == std::vector<double>{1, 0}));

  auto other_gamma = for_branches(MMParetoPolicy(MMParetoOptions().gamma(2)), 2);
  CHECK_THROWS_WITH(load_saved(other_gamma, record), Catch::Contains("made with gamma 1.5, this policy has gamma 2"));
  auto other_parameters = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5).parameters(ModulatedParameters::conv_weights)), 2);
  CHECK_THROWS_WITH(load_saved(other_parameters, record), Catch::Contains("this policy combines conv_weights"));
  auto three = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 3);
  CHECK_THROWS_WITH(load_saved(three, record), Catch::Contains("counts conflicts of 2 branches, this policy has 3"));

  const auto record_with = [](const c10::IValue& gamma, const c10::optional<at::Tensor>& conflicts) {
    torch::serialize::OutputArchive out;
    out.write("gamma", gamma);
    out.write("parameters", static_cast<std::int64_t>(ModulatedParameters::all));
    if (conflicts) out.write("conflict_steps", *conflicts);
    std::stringstream bytes;
    out.save_to(bytes);
    return bytes.str();
  };
  auto policy = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 2);
  load_saved(policy, record);
  const std::string before = saved_bytes(policy);
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(std::string("1.5")), at::zeros({2}, at::kLong))),
                    Catch::Contains("damaged state in checkpoint"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(1.5), c10::nullopt)),
                    Catch::Contains("damaged state in checkpoint"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(1.5), at::zeros({2}, at::kFloat))),
                    Catch::Contains("damaged conflict counts"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(1.5), at::zeros({2, 1}, at::kLong))),
                    Catch::Contains("damaged conflict counts"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(1.5), at::tensor({3, -1}, at::kLong))),
                    Catch::Contains("negative or absurd conflict counts"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(1.5), at::tensor(std::vector<std::int64_t>{std::int64_t{1} << 62, 0}))),
                    Catch::Contains("negative or absurd conflict counts"));
  CHECK(saved_bytes(policy) == before);
}

TEST_CASE("MMPareto: loss(out, target, scale) scales the fused gradients with the loss, "
          "micro-batches add them up as backward() adds the gradients", "[mmpareto]") {
  // The conflicting construction of the test above: the same branch-0 input in every row.
  const MultiModalBatch r = small_batch(8, 31);
  const MultiModalBatch b{r.x0[0].expand_as(r.x0).contiguous(), r.x1, at::tensor({0, 1, 0, 1, 0, 1, 0, 1}, at::kLong)};
  // One step of `net`, the balancer's loss times `scale`, passed to loss() or not.
  const auto step_gradients = [&](double scale, bool tell_the_balancer) {
    Net net = leaning_late_net(3);
    Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
    balancer.next_plan();
    const ModelOutput out = net->forward(b.x0, b.x1);
    const at::Tensor loss = tell_the_balancer ? balancer.loss(out, b.target, scale)
                                              : balancer.loss(out, b.target) * scale;
    loss.backward();
    balancer.observe(loss);
    std::vector<at::Tensor> g;
    for (const auto& p : net->branch0->parameters()) g.push_back(p.grad().clone());
    return std::pair(g, balancer.policy().last_fused_weights()[0].item<double>());
  };
  // Scaling m and u alike keeps c and scales the result: exactly scale times.
  const auto [plain, c] = step_gradients(1.0, true);
  const auto [scaled, c_scaled] = step_gradients(2.5, true);
  CHECK(c_scaled == Approx(c).epsilon(1e-6));
  // (Within 1e-3 of the branch's largest gradient: where c·m and (1 - c)·u nearly cancel,
  // the magnitude rule stretches their rounding, as the original does.)
  double largest = 0, worst = 0;
  for (std::size_t i = 0; i < plain.size(); ++i) {
    largest = std::max(largest, plain[i].abs().max().item<double>() * 2.5);
    worst = std::max(worst, (scaled[i] - plain[i] * 2.5).abs().max().item<double>());
  }
  CHECK(worst <= 1e-3 * largest);
  // Scaled behind the balancer's back, g - g_m is no longer the uni-modal gradient.
  const auto [skewed, c_skewed] = step_gradients(2.5, false);
  REQUIRE(c != 0.5);  // a conflict, where the weights depend on g_m against g_u
  CHECK(c_skewed != Approx(c).epsilon(1e-3));
  Net net = small_late_net(3);
  Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  balancer.next_plan();
  CHECK_THROWS_WITH(balancer.loss(net->forward(b.x0, b.x1), b.target, 0.0),
                    Catch::Contains("scale must be a finite number > 0, got 0"));
  CHECK_THROWS_WITH(balancer.loss(net->forward(b.x0, b.x1), b.target, NAN),
                    Catch::Contains("scale must be a finite number > 0"));

  // Two micro-batches of 4 rows in one step: the same as the original's rule on the sums of
  // their gradients, computed on a twin.
  Net accumulating = leaning_late_net(4), twin = small_late_net(99);
  copy_state(accumulating, twin);
  const auto half = [&](int h) {
    return Batch{{b.x0.narrow(0, 4 * h, 4), b.x1.narrow(0, 4 * h, 4)}, b.target.narrow(0, 4 * h, 4)};
  };
  const auto grads_of = [&](bool whole) {
    twin->zero_grad();
    for (int h = 0; h < 2; ++h) {
      const NetOutput out = forward_heads(twin, half(h).inputs);
      at::Tensor loss = at::cross_entropy_loss(out.y, half(h).target);
      if (whole) loss = loss + modality_specific_loss(out, half(h).target);
      loss.backward();
    }
    Grads g;
    for (const auto& p : twin->branch0->parameters()) g.push_back(as_doubles(p.grad()));
    return g;
  };
  const Grads m = grads_of(false), whole = grads_of(true);
  Grads u = whole;
  for (std::size_t p = 0; p < u.size(); ++p) {
    for (std::size_t e = 0; e < u[p].size(); ++e) u[p][e] -= m[p][e];
  }
  const auto [expected, expected_c] = reference(m, u, 1.5);
  Balancer<MMParetoPolicy> accumulator(accumulating, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  accumulator.next_plan();
  at::Tensor last;
  for (int h = 0; h < 2; ++h) {
    last = accumulator.loss(forward_heads(accumulating, half(h).inputs), half(h).target);
    last.backward();
  }
  accumulator.observe(last);
  CHECK(accumulator.policy().last_fused_weights()[0].item<double>() == Approx(expected_c).epsilon(1e-4));
  const auto theta0 = accumulating->parameter_groups().branch[0];
  for (std::size_t p = 0; p < theta0.size(); ++p) {
    const std::vector<double> got = as_doubles(theta0[p].grad());
    double scale = 1e-12;
    for (double v : expected[p]) scale = std::max(scale, std::abs(v));
    for (std::size_t e = 0; e < got.size(); ++e) CHECK(got[e] == Approx(expected[p][e]).margin(1e-4 * scale));
  }
}

TEST_CASE("MMPareto: a loss() call that throws leaves what the step's earlier calls staged",
          "[mmpareto][bad-input]") {
  // A step with one good micro-batch and one whose output has no graph: the second call is
  // refused and the step goes on as if only the first had been made.
  const MultiModalBatch b = small_batch(8, 41);
  const auto gradients = [&](bool failed_second_call) {
    Net net = leaning_late_net(5);
    Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
    balancer.next_plan();
    const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1), b.target);
    loss.backward();
    if (failed_second_call) {
      ModelOutput detached;
      {
        torch::NoGradGuard no_grad;
        detached = net->forward(b.x0, b.x1);
      }
      CHECK_THROWS_WITH(balancer.loss(detached, b.target), Catch::Contains("does not require a gradient"));
    }
    balancer.observe(loss);
    std::vector<at::Tensor> g;
    for (const auto& p : net->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  const auto once = gradients(false), after_failure = gradients(true);
  for (std::size_t i = 0; i < once.size(); ++i) CHECK(at::equal(once[i], after_failure[i]));
}

TEST_CASE("MMPareto: g − g_m is the uni-modal gradient to within a few roundings, and a dot "
          "product inside that rounding is no conflict", "[mmpareto]") {
  // Measured: g_m·(g − g_m) as the balancer forms it (float: the whole loss's backward and
  // CE(y)'s) against g_m·g_u from a double twin (the uni-modal losses' gradient on its own),
  // on the late-fusion and MMTM networks over several batches, in units of
  // ε·(‖g_m‖² + ‖g_m‖‖g_u‖), the bound's unit (ε of float).
  const double eps = std::numeric_limits<float>::epsilon();
  double worst_dot = 0;
  for (const bool late : {true, false}) {
    for (std::uint64_t seed = 0; seed < 6; ++seed) {
      Net net = late ? small_late_net(seed) : small_net(seed);
      Net twin = late ? small_late_net(seed) : small_net(seed);
      twin->to(at::kDouble);
      const MultiModalBatch b = small_batch(16, 40 + seed);
      const ModelOutput out = net->forward(b.x0, b.x1);
      const ModelOutput exact = twin->forward(b.x0.to(at::kDouble), b.x1.to(at::kDouble));
      const at::Tensor fused = at::cross_entropy_loss(out.y, b.target);
      const at::Tensor unimodal = modality_specific_loss(out, b.target);
      const auto thetas = net->parameter_groups().branch, exact_thetas = twin->parameter_groups().branch;
      for (std::size_t k = 0; k < thetas.size(); ++k) {
        const auto whole = torch::autograd::grad({fused + unimodal}, thetas[k], {}, true);
        const auto m = torch::autograd::grad({fused}, thetas[k], {}, true);
        const auto u = torch::autograd::grad({modality_specific_loss(exact, b.target)}, exact_thetas[k], {}, true);
        double mm = 0, uu = 0, mu_formed = 0, mu_exact = 0;
        for (std::size_t p = 0; p < thetas[k].size(); ++p) {
          const at::Tensor md = m[p].to(at::kDouble), formed = (whole[p] - m[p]).to(at::kDouble);
          mm += (md * md).sum().item<double>();
          uu += (u[p] * u[p]).sum().item<double>();
          mu_formed += (md * formed).sum().item<double>();
          mu_exact += (md * u[p]).sum().item<double>();
        }
        worst_dot = std::max(worst_dot, std::abs(mu_formed - mu_exact) / (eps * (mm + std::sqrt(mm) * std::sqrt(uu))));
      }
    }
  }
  WARN("g_m.(g - g_m) against g_m.g_u in double: at most " << worst_dot
       << " units of eps (|g_m|^2 + |g_m| |g_u|)");
  CHECK(worst_dot < MMParetoOptions().rounding_bound() / 4);

  // The threshold: g_m = (1, 0), g_u = (−t, 1) in double, so g_m·g_u = −t and the bound is
  // b = 16·ε·(1 + √(1 + t²)) = 32·ε to within t² ≈ 1e-28: a conflict just beyond b, none
  // just inside it.
  const double eps64 = std::numeric_limits<double>::epsilon();
  const auto conflicts = [&](double bound, double t) {
    auto policy = for_branches(MMParetoPolicy(MMParetoOptions().rounding_bound(bound)), 2);
    run_hook(policy, hook_input({{{1, 0}}, {{1, 0}}}, {{{-t, 1}}, {{1, 0}}}));
    return policy.conflict_steps()[0].item<std::int64_t>() == 1;
  };
  const double b = 32 * eps64;
  CHECK(conflicts(16, 1.2 * b));
  CHECK_FALSE(conflicts(16, 0.8 * b));
  CHECK(conflicts(0, 0.8 * b));  // the sign alone
  CHECK_FALSE(conflicts(0, 0.0));  // exactly 0: none
  CHECK_THROWS_WITH(MMParetoPolicy(MMParetoOptions().rounding_bound(-1)),
                    Catch::Contains("rounding_bound must be a finite number >= 0, got -1"));

  // A uni-modal gradient below g_m's resolution: g is g_m moved one unit in the last place
  // toward zero in every element, so g − g_m = −ulp·sign(g_m), against g_m everywhere. As
  // plain numbers that is a conflict, of a g_u made of rounding alone; combined, the step
  // would follow −sign(g_m) stretched to ‖g‖. Inside the bound: no conflict, γ·g.
  const at::Tensor m = at::randn({64}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor g = at::nextafter(m, at::zeros_like(m));
  REQUIRE(((g - m) * m).sum().item<double>() < 0);
  at::Tensor param = at::zeros({64}).requires_grad_();
  param.mutable_grad() = g.clone();
  at::Tensor other = at::zeros({64}).requires_grad_();
  other.mutable_grad() = m.clone();  // branch 1: no uni-modal gradient at all
  const std::vector<std::vector<at::Tensor>> params{{param}, {other}}, fused{{m.clone()}, {m.clone()}};
  auto policy = for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.5)), 2);
  const std::vector<at::Tensor> heads;
  const at::Tensor target = at::zeros({4}, at::kLong);
  const std::function<void(at::Tensor&)> one_process;
  policy.modulate_gradients(StepGradients{heads, target, params, one_process, 1, fused});
  CHECK(policy.conflict_steps()[0].item<std::int64_t>() == 0);
  CHECK(policy.last_fused_weights()[0].item<double>() == 0.5);
  CHECK(at::allclose(param.grad(), g * 1.5, 1e-6, 0));
}
