// OGM-GE as a gradient-modulating policy: the loss it trains (the fused output's, as the
// original's main.py), its coefficients against the paper's rule computed by hand, its
// effect on each branch's gradients against an unmodulated twin, the noise, warm-up,
// resume and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <stdexcept>

#include <unistd.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;
namespace fs = std::filesystem;

namespace {

// s = Σ_i softmax(logits_i / n)[y_i], written out: the score of a branch whose head gives
// `logits`, from its share of y = Σ_k h_k / n (the original's out_a = W_a·a + b/2, its half
// of the fused output of two branches).
double score(const std::vector<std::vector<double>>& logits, const std::vector<int>& y, double n) {
  double s = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    double z = 0;
    for (double v : logits[i]) z += std::exp(v / n);
    s += std::exp(logits[i][static_cast<std::size_t>(y[i])] / n) / z;
  }
  return s;
}

// The loss the original trains: CE of the fused output, written out from the heads (the
// mean over n branches, log-sum-exp by hand), averaged over the batch.
double fused_cross_entropy(const std::vector<at::Tensor>& heads, const at::Tensor& target) {
  const std::int64_t rows = heads[0].size(0), classes = heads[0].size(1);
  double total = 0;
  for (std::int64_t i = 0; i < rows; ++i) {
    std::vector<double> y(static_cast<std::size_t>(classes), 0.0);
    for (const at::Tensor& h : heads) {
      for (std::int64_t c = 0; c < classes; ++c) y[static_cast<std::size_t>(c)] += h[i][c].item<double>() / static_cast<double>(heads.size());
    }
    double z = 0;
    for (double v : y) z += std::exp(v);
    total += std::log(z) - y[static_cast<std::size_t>(target[i].item<std::int64_t>())];
  }
  return total / static_cast<double>(rows);
}

at::Tensor as_tensor(const std::vector<std::vector<double>>& rows) {
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return at::tensor(flat).view({static_cast<std::int64_t>(rows.size()), -1});
}

// The unmodulated gradients of `net` on batch b: a twin with the same state, no balancer,
// trained on CE(y) as the original.
std::vector<at::Tensor> plain_gradients(const Net& net, const MultiModalBatch& b) {
  Net twin = small_net(99);
  copy_state(net, twin);
  twin->zero_grad();
  at::cross_entropy_loss(twin->forward(b.x0, b.x1).y, b.target).backward();
  std::vector<at::Tensor> g;
  for (const auto& p : twin->parameters()) g.push_back(p.grad().clone());
  return g;
}

// One step of the balancer's loop with the loss formed by the balancer.
template <class BalancerT>
ModelOutput step(Net& net, BalancerT& balancer, const MultiModalBatch& b) {
  const StepPlan plan = balancer.next_plan();
  const ModelOutput out = net->forward(b.x0, b.x1, to_step_kind(plan));
  const at::Tensor loss = balancer.loss(out, b.target);
  net->zero_grad();
  loss.backward();
  balancer.observe(loss);
  return out;
}

// Whether p is a parameter of branch `k` of the two-branch test net.
bool in_branch(const Net& net, const at::Tensor& p, int k) {
  const auto groups = net->parameter_groups();
  for (const auto& q : k == 0 ? groups.branch[0] : groups.branch[1]) {
    if (q.is_same(p)) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("OGM-GE coefficients follow the paper's rule, for two and three branches", "[ogm-ge]") {
  const std::vector<int> y = {0, 1};
  const std::vector<std::vector<double>> strong = {{2, 0, 0}, {0, 2, 0}}, weak = {{0, 0, 0}, {0.5, 0, 0}},
                                         middle = {{1, 0, 0}, {0, 1, 0}};
  const at::Tensor target = at::tensor({0, 1}, at::kLong);
  // Two branches: ρ_0 = s_0 / s_1 > 1, so k_0 = 1 - tanh(α ρ_0) and k_1 = 1.
  const double rho = score(strong, y, 2) / score(weak, y, 2);
  REQUIRE(rho > 1);
  const at::Tensor k = OGMGEPolicy::coefficients({as_tensor(strong), as_tensor(weak)}, target, 0.3);
  CHECK(k[0].item<double>() == Approx(1 - std::tanh(0.3 * rho)).epsilon(1e-6));
  CHECK(k[1].item<double>() == 1.0);
  // Swapped heads: the coefficient moves with the dominant branch.
  const at::Tensor swapped = OGMGEPolicy::coefficients({as_tensor(weak), as_tensor(strong)}, target, 0.3);
  CHECK(swapped[1].item<double>() == Approx(1 - std::tanh(0.3 * rho)).epsilon(1e-6));
  CHECK(swapped[0].item<double>() == 1.0);
  // Equal modalities (ρ = 1): no modulation; α = 0: none either.
  const at::Tensor equal = OGMGEPolicy::coefficients({as_tensor(middle), as_tensor(middle)}, target, 0.3);
  CHECK(equal[0].item<double>() == 1.0);
  CHECK(equal[1].item<double>() == 1.0);
  const at::Tensor off = OGMGEPolicy::coefficients({as_tensor(strong), as_tensor(weak)}, target, 0.0);
  CHECK(off[0].item<double>() == 1.0);
  // Three branches: ρ_k = s_k / mean of the others' scores.
  const double s0 = score(strong, y, 3), s1 = score(middle, y, 3), s2 = score(weak, y, 3);
  const double r0 = s0 / ((s1 + s2) / 2), r1 = s1 / ((s0 + s2) / 2), r2 = s2 / ((s0 + s1) / 2);
  const at::Tensor three = OGMGEPolicy::coefficients(
      {as_tensor(strong), as_tensor(middle), as_tensor(weak)}, target, 0.5);
  const double expected[] = {r0 > 1 ? 1 - std::tanh(0.5 * r0) : 1.0, r1 > 1 ? 1 - std::tanh(0.5 * r1) : 1.0,
                             r2 > 1 ? 1 - std::tanh(0.5 * r2) : 1.0};
  REQUIRE(r0 > 1);
  REQUIRE(r2 < 1);
  for (int j = 0; j < 3; ++j) CHECK(three[j].item<double>() == Approx(expected[j]).epsilon(1e-6));
}

TEST_CASE("OGM-GE at the edges: a perfect branch against one whose score underflows, and two "
          "that score 0", "[ogm-ge]") {
  const at::Tensor target = at::tensor({0, 1}, at::kLong);
  // Logits 400 apart, shares (halves) 200 apart: the true class's softmax is 1 for the
  // perfect head and exactly 0 (in float) for the hopeless one.
  const at::Tensor perfect = at::tensor({400.0, 0.0, 0.0, 400.0}).reshape({2, 2});
  const at::Tensor hopeless = at::tensor({0.0, 400.0, 400.0, 0.0}).reshape({2, 2});
  // ρ_0 = 2 / 0 = inf: k_0 = 1 - tanh(inf) = 0, the dominant branch stops (as in the
  // original); ρ_1 = 0 / 2: k_1 = 1.
  const at::Tensor k = OGMGEPolicy::coefficients({perfect, hopeless}, target, 0.1);
  CHECK(k[0].item<double>() == 0.0);
  CHECK(k[1].item<double>() == 1.0);
  // Both score 0: ρ = 0 / 0 is not > 1, so nothing is modulated.
  const at::Tensor none = OGMGEPolicy::coefficients({hopeless, hopeless}, target, 0.1);
  CHECK(none[0].item<double>() == 1.0);
  CHECK(none[1].item<double>() == 1.0);
}

TEST_CASE("OGM scales the conv-weight gradients of each branch by its coefficient and nothing else",
          "[ogm-ge]") {
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7).noise(false)),
                                 BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 11);
  const std::vector<at::Tensor> plain = plain_gradients(net, b);
  const ModelOutput out = step(net, balancer, b);
  // The coefficients from the step's heads, by the paper's rule written out.
  std::vector<std::vector<double>> h0, h1;
  std::vector<int> y;
  for (std::int64_t i = 0; i < 8; ++i) {
    h0.push_back({}); h1.push_back({});
    for (std::int64_t c = 0; c < 3; ++c) {
      h0.back().push_back(out.y0[i][c].item<double>());
      h1.back().push_back(out.y1[i][c].item<double>());
    }
    y.push_back(static_cast<int>(b.target[i].item<std::int64_t>()));
  }
  const double s0 = score(h0, y, 2), s1 = score(h1, y, 2);
  const double k0 = s0 > s1 ? 1 - std::tanh(0.7 * s0 / s1) : 1.0, k1 = s1 > s0 ? 1 - std::tanh(0.7 * s1 / s0) : 1.0;
  REQUIRE(std::min(k0, k1) < 0.9);  // this batch modulates something
  const auto params = net->parameters();
  int scaled = 0;
  for (std::size_t j = 0; j < params.size(); ++j) {
    const at::Tensor& p = params[j];
    double k = 1.0;
    if (p.dim() >= 3 && in_branch(net, p, 0)) k = k0;
    if (p.dim() >= 3 && in_branch(net, p, 1)) k = k1;
    if (k != 1.0) ++scaled;
    CHECK(at::allclose(p.grad(), plain[j] * k, 1e-5, 1e-7));
  }
  CHECK(scaled == 2);  // the two conv kernels of the modulated branch
  CHECK(balancer.policy().last_coefficients()[0].item<double>() == Approx(k0).epsilon(1e-5));
}

TEST_CASE("OGM-GE adds seeded noise with the gradient's own std, none in warm-up", "[ogm-ge]") {
  const auto b = small_batch(8, 11);
  const auto run = [&](std::uint64_t seed, std::int64_t warmup) {
    Net net = small_net(3);
    Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7).seed(seed)),
                                   BalancerOptions().warmup_epochs(warmup));
    const std::vector<at::Tensor> plain = plain_gradients(net, b);
    step(net, balancer, b);
    const at::Tensor k = balancer.policy().last_coefficients();
    std::vector<at::Tensor> grads, expected_scaled;
    const auto params = net->parameters();
    for (std::size_t j = 0; j < params.size(); ++j) {
      grads.push_back(params[j].grad().clone());
      double c = 1.0;
      if (k.defined() && params[j].dim() >= 3) c = k[in_branch(net, params[j], 0) ? 0 : 1].item<double>();
      expected_scaled.push_back(plain[j] * c);
    }
    return std::tuple{grads, expected_scaled, plain, params, k};
  };
  const auto [grads, scaled, plain, params, k] = run(5, 0);
  // A branch scaled to below 0.6: its noise then tells std(g) (the rule) from std(k g).
  REQUIRE(std::min(k[0].item<double>(), k[1].item<double>()) < 0.6);
  for (std::size_t j = 0; j < params.size(); ++j) {
    if (params[j].dim() < 3) {
      CHECK(at::allclose(grads[j], scaled[j], 1e-5, 1e-7));  // not selected: untouched
      continue;
    }
    // noise = g' - k g has the std of the unscaled g (the original's fixed code), within
    // 30 % (a sample std over >= 108 values)
    const double noise_std = (grads[j] - scaled[j]).std().item<double>();
    const double own_std = plain[j].std().item<double>();
    CHECK(noise_std > 0.7 * own_std);
    CHECK(noise_std < 1.3 * own_std);
  }
  const auto [same_seed, s1, q1, p1, k1] = run(5, 0);
  const auto [other_seed, s2, q2, p2, k2] = run(6, 0);
  bool all_equal = true, any_differs = false;
  for (std::size_t j = 0; j < grads.size(); ++j) {
    all_equal = all_equal && at::equal(grads[j], same_seed[j]);
    any_differs = any_differs || !at::equal(grads[j], other_seed[j]);
  }
  CHECK(all_equal);
  CHECK(any_differs);
  // In a warm-up epoch the policy is not consulted: the plain gradients.
  const auto [warm, warm_expected, q3, p3, k3] = run(5, 1);
  for (std::size_t j = 0; j < warm.size(); ++j) CHECK(at::allclose(warm[j], warm_expected[j], 1e-5, 1e-7));
}

TEST_CASE("OGM-GE on three branches scales each branch by its own coefficient", "[ogm-ge]") {
  ThreeWay net = small_three_way(4);
  ThreeWay twin = small_three_way(9);
  copy_state(net, twin);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(2.0).noise(false)),
                                 BalancerOptions().warmup_epochs(0));
  const Batch b = n_way_batch(3, 8, 21);
  at::cross_entropy_loss(twin->forward(b.inputs).y, b.target).backward();
  const StepPlan plan = balancer.next_plan();
  const NetOutput out = net->forward(b.inputs, plan);
  const at::Tensor loss = balancer.loss(out, b.target);
  CHECK(loss.item<double>() == Approx(fused_cross_entropy(out.heads, b.target)).epsilon(1e-5));
  loss.backward();
  balancer.observe(loss);
  std::vector<double> s;
  for (const auto& h : out.heads) {
    const at::Tensor p = at::softmax(h.detach().to(at::kDouble) / 3.0, 1);  // its share of y
    double sum = 0;
    for (std::int64_t i = 0; i < 8; ++i) sum += p[i][b.target[i].item<std::int64_t>()].item<double>();
    s.push_back(sum);
  }
  const auto twin_groups = twin->parameter_groups().branch;
  const auto groups = net->parameter_groups().branch;
  for (std::size_t k = 0; k < 3; ++k) {
    const double rho = s[k] / ((s[0] + s[1] + s[2] - s[k]) / 2);
    const double c = rho > 1 ? 1 - std::tanh(2.0 * rho) : 1.0;
    for (std::size_t j = 0; j < groups[k].size(); ++j) {
      const double expected = groups[k][j].dim() >= 3 ? c : 1.0;
      CHECK(at::allclose(groups[k][j].grad(), twin_groups[k][j].grad() * expected, 1e-5, 1e-7));
    }
  }
}

TEST_CASE("OGM-GE resumes bit for bit mid-run", "[ogm-ge][checkpoint]") {
  const fs::path dir = fs::temp_directory_path() / ("mmbalance_ogm_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "ogm.pt").string();
  const auto make = [] {
    Net net = small_net(2);
    auto opt = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    auto bal = std::make_shared<Balancer<OGMGEPolicy>>(net, OGMGEPolicy(OGMGEOptions().alpha(0.8).seed(3)),
                                                       BalancerOptions().warmup_epochs(1));
    return std::tuple{net, opt, bal};
  };
  const auto train = [](Net& net, torch::optim::SGD& opt, Balancer<OGMGEPolicy>& bal, int first, int last) {
    for (int i = first; i < last; ++i) {
      step(net, bal, small_batch(8, static_cast<std::uint64_t>(100 + i)));
      opt.step();
      if ((i + 1) % 3 == 0) bal.end_epoch();
    }
  };
  auto [a, opt_a, bal_a] = make();
  train(a, *opt_a, *bal_a, 0, 5);
  save_checkpoint(path, a, *opt_a, *bal_a);
  train(a, *opt_a, *bal_a, 5, 10);
  auto [b, opt_b, bal_b] = make();
  load_checkpoint(path, b, *opt_b, *bal_b);
  train(b, *opt_b, *bal_b, 5, 10);
  CHECK(same_state(*a, *b));
  // A checkpoint of another alpha is refused.
  Net c = small_net(2);
  torch::optim::SGD opt_c(c->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  Balancer<OGMGEPolicy> bal_c(c, OGMGEPolicy(OGMGEOptions().alpha(0.5).seed(3)), BalancerOptions().warmup_epochs(1));
  CHECK_THROWS_WITH(load_checkpoint(path, c, opt_c, bal_c),
                    Catch::Contains("made with alpha 0.8, this policy has alpha 0.5"));
  fs::remove_all(dir);
}

TEST_CASE("OGM-GE refuses bad options and a loss not formed by the balancer", "[ogm-ge][bad-input]") {
  CHECK_THROWS_WITH(OGMGEPolicy(OGMGEOptions().alpha(-1)), Catch::Contains("alpha must be a finite number >= 0, got -1"));
  CHECK_THROWS_WITH(OGMGEPolicy(OGMGEOptions().alpha(NAN)), Catch::Contains("alpha must be a finite number"));
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(), BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 1);
  const StepKind kind = to_step_kind(balancer.next_plan());
  const at::Tensor loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
  loss.backward();
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("form the loss with balancer.loss(out, target)"));
  CHECK(balancer.step() == 0);  // the step was abandoned
  CHECK_THROWS_WITH(balancer.loss(net->forward(b.x0, b.x1), b.target),
                    Catch::Contains("call next_step() or next_plan() before the forward pass"));
}

TEST_CASE("OGM-GE: a non-finite gradient is refused by name before any gradient is modulated",
          "[ogm-ge][bad-input]") {
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7)), BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 11);
  const StepPlan plan = balancer.next_plan();
  const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, to_step_kind(plan)), b.target);
  loss.backward();
  for (const auto& p : net->branch0->parameters()) {
    if (p.dim() == 4) {  // the first conv kernel of branch 0
      p.grad()[0][0][0][0] = NAN;
      break;
    }
  }
  std::vector<at::Tensor> before;
  for (const auto& p : net->parameters()) before.push_back(p.grad().clone());
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite gradient in group theta0"));
  const auto params = net->parameters();
  for (std::size_t j = 0; j < params.size(); ++j) {
    CHECK(at::allclose(params[j].grad(), before[j], 0, 0, /*equal_nan=*/true));  // untouched
  }
  CHECK_FALSE(balancer.policy().last_coefficients().defined());  // the policy never ran
  CHECK(balancer.step() == 0);
}

TEST_CASE("OGM-GE with an all-zero branch gradient: refused by name with checks on, finite "
          "with them off", "[ogm-ge][bad-input]") {
  const auto b = small_batch(8, 12);
  // A step's forward and backward passes, then branch 0's gradients zeroed; the loss.
  const auto zeroed_step = [&b](Net& net, Balancer<OGMGEPolicy>& balancer) {
    const StepPlan plan = balancer.next_plan();
    const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, to_step_kind(plan)), b.target);
    loss.backward();
    for (const auto& p : net->branch0->parameters()) {
      if (p.grad().defined()) p.grad().zero_();
    }
    return loss;
  };
  SECTION("checks on: a branch that never had a gradient is named, nothing is modulated") {
    Net net = small_net(4);
    Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7)), BalancerOptions().warmup_epochs(0));
    const at::Tensor loss = zeroed_step(net, balancer);
    std::vector<at::Tensor> before;
    for (const auto& p : net->parameters()) before.push_back(p.grad().clone());
    CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("group theta0") &&
                                                  Catch::Contains("zero gradient in every regular step"));
    const auto params = net->parameters();
    for (std::size_t j = 0; j < params.size(); ++j) CHECK(at::equal(params[j].grad(), before[j]));
    CHECK_FALSE(balancer.policy().last_coefficients().defined());
    CHECK(balancer.step() == 0);
  }
  SECTION("checks off: the zero gradient gets only the noise floor N(0, 1e-8), no NaN") {
    Net net = small_net(4);
    Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7)),
                                   BalancerOptions().warmup_epochs(0).check_every_step(false));
    balancer.observe(zeroed_step(net, balancer));
    CHECK(at::isfinite(balancer.policy().last_coefficients()).all().item<bool>());
    for (const auto& p : net->branch0->parameters()) {
      const at::Tensor g = p.grad();
      REQUIRE(at::isfinite(g).all().item<bool>());
      // std(0) = 0: the noise is N(0, 1e-8) on the conv kernels (|draw| < 10 sigma), the
      // others stay exactly 0.
      if (p.dim() >= 3) {
        CHECK(g.abs().max().item<double>() < 1e-7);
        CHECK(g.abs().max().item<double>() > 0);
      } else {
        CHECK(g.abs().max().item<double>() == 0);
      }
    }
  }
}

TEST_CASE("OGM-GE: a hook that fails leaves the balancer and the gradients as they were",
          "[ogm-ge][bad-input]") {
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7)), BalancerOptions().warmup_epochs(0));
  step(net, balancer, small_batch(8, 1));  // one accepted step: the meter has something
  const std::string before = saved_bytes(balancer);
  const auto b = small_batch(8, 2);
  const StepPlan plan = balancer.next_plan();
  const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, to_step_kind(plan)), b.target);
  net->zero_grad();
  loss.backward();
  std::vector<at::Tensor> grads;
  for (const auto& p : net->parameters()) grads.push_back(p.grad().clone());
  const std::function<void(at::Tensor&)> failing_sum = [](at::Tensor&) {
    throw std::runtime_error("all-reduce failed: rank 1 is gone");
  };
  CHECK_THROWS_WITH(balancer.observe(loss, failing_sum), Catch::Contains("rank 1 is gone"));
  CHECK(saved_bytes(balancer) == before);  // meter, counters, policy's generator
  CHECK(balancer.step() == 1);
  const auto params = net->parameters();
  for (std::size_t j = 0; j < params.size(); ++j) CHECK(at::equal(params[j].grad(), grads[j]));
  // The same step again draws the same noise as a balancer that never failed.
  Net twin = small_net(3);
  copy_state(net, twin);
  Balancer<OGMGEPolicy> fresh(twin, OGMGEPolicy(OGMGEOptions().alpha(0.7)), BalancerOptions().warmup_epochs(0));
  step(twin, fresh, small_batch(8, 1));
  copy_state(net, twin);
  step(net, balancer, b);
  step(twin, fresh, b);
  const auto tp = twin->parameters();
  for (std::size_t j = 0; j < params.size(); ++j) CHECK(at::equal(params[j].grad(), tp[j].grad()));
}

TEST_CASE("OGM-GE: a loss not formed by the balancer is refused in warm-up already", "[ogm-ge][bad-input]") {
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(), BalancerOptions().warmup_epochs(1));
  const auto b = small_batch(8, 1);
  const StepKind kind = balancer.next_step();
  const at::Tensor loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
  loss.backward();
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("form the loss with balancer.loss(out, target)"));
}

TEST_CASE("OGM's parameter filter: conv kernels, every weight, or every parameter of a branch",
          "[ogm-ge]") {
  // The filters as the original and BalanceMM define them, by tensor rank: conv kernels
  // have 4 dimensions, linear weights 2, biases and BatchNorm scales 1.
  const std::vector<std::pair<ModulatedParameters, std::int64_t>> table = {
      {ModulatedParameters::conv_weights, 3}, {ModulatedParameters::non_bias, 2},
      {ModulatedParameters::all, 0}};
  for (const auto& [which, min_dim] : table) {
    Net net = small_net(3);
    Balancer<OGMGEPolicy> balancer(
        net, OGMGEPolicy(OGMGEOptions().alpha(0.7).noise(false).parameters(which)),
        BalancerOptions().warmup_epochs(0));
    const auto b = small_batch(8, 11);
    const std::vector<at::Tensor> plain = plain_gradients(net, b);
    step(net, balancer, b);
    const at::Tensor k = balancer.policy().last_coefficients();
    const int dominant = k[0].item<double>() < 1.0 ? 0 : 1;
    const double kd = k[dominant].item<double>();
    REQUIRE(kd < 0.9);
    const auto params = net->parameters();
    int selected_count = 0, scaled = 0, expected_scaled = 0;
    for (std::size_t j = 0; j < params.size(); ++j) {
      const bool selected = in_branch(net, params[j], dominant) && params[j].dim() >= min_dim;
      selected_count += selected ? 1 : 0;
      CHECK(at::allclose(params[j].grad(), plain[j] * (selected ? kd : 1.0), 1e-5, 1e-7));
      // A conv bias before BatchNorm has a zero gradient: scaled or not, it looks the same.
      if (plain[j].abs().max().item<double>() > 1e-4) {
        expected_scaled += selected ? 1 : 0;
        scaled += at::allclose(params[j].grad(), plain[j], 1e-5, 1e-7) ? 0 : 1;
      }
    }
    // small_net's branch: 2 conv kernels, 1 linear weight, and 2 + 2 + 2 + 1 vectors
    // (conv biases, BatchNorm scales and shifts, the head's bias)
    CHECK(selected_count == (min_dim == 3 ? 2 : min_dim == 2 ? 3 : 10));
    CHECK(scaled == expected_scaled);
    CHECK(expected_scaled >= (min_dim == 0 ? 8 : selected_count));
  }
}

TEST_CASE("OGM-GE state from other options, or damaged, is refused and changes nothing",
          "[ogm-ge][bad-input][checkpoint]") {
  const auto saved = [](const OGMGEOptions& o) {
    torch::serialize::OutputArchive out;
    OGMGEPolicy(o).save(out);
    std::stringstream bytes;
    out.save_to(bytes);
    return bytes.str();
  };
  const OGMGEOptions base = OGMGEOptions().alpha(0.5).seed(3);
  const std::string record = saved(base);
  OGMGEPolicy other_noise(OGMGEOptions(base).noise(false));
  CHECK_THROWS_WITH(load_saved(other_noise, record),
                    Catch::Contains("made with noise on, this policy has it off"));
  OGMGEPolicy other_seed(OGMGEOptions(base).seed(4));
  CHECK_THROWS_WITH(load_saved(other_seed, record),
                    Catch::Contains("made with seed 3, this policy has seed 4"));
  OGMGEPolicy other_parameters(OGMGEOptions(base).parameters(ModulatedParameters::all));
  CHECK_THROWS_WITH(load_saved(other_parameters, record),
                    Catch::Contains("this policy modulates all"));
  OGMGEPolicy other_end(OGMGEOptions(base).modulation_ends(50));
  CHECK_THROWS_WITH(load_saved(other_end, record),
                    Catch::Contains("made with modulation_ends never (the default), this policy has 50"));
  OGMGEPolicy ends_50(OGMGEOptions(base).modulation_ends(50));
  OGMGEPolicy default_end(base);
  CHECK_THROWS_WITH(load_saved(default_end, saved(OGMGEOptions(base).modulation_ends(50))),
                    Catch::Contains("made with modulation_ends 50, this policy has never (the default)"));

  // Records written field by field: a generator state that is not one or not text, one
  // from before modulation_ends existed, one whose modulation_ends is not a number.
  const auto record_with = [&](const c10::IValue& engine, const c10::optional<c10::IValue>& ends) {
    torch::serialize::OutputArchive out;
    out.write("engine", engine);
    out.write("alpha", 0.5);
    out.write("noise", std::int64_t{1});
    out.write("parameters", static_cast<std::int64_t>(ModulatedParameters::conv_weights));
    out.write("seed", std::int64_t{3});
    if (ends) out.write("modulation_ends", *ends);
    std::stringstream bytes;
    out.save_to(bytes);
    return bytes.str();
  };
  const c10::IValue never(std::numeric_limits<std::int64_t>::max());
  OGMGEPolicy policy(base);
  const std::string before = saved_bytes(policy);
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(std::string("12 x 7")), never)),
                    Catch::Contains("corrupt generator state"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(c10::IValue(std::int64_t{5}), never)),
                    Catch::Contains("damaged state in checkpoint"));
  std::ostringstream seeded;  // the standard's text form of an engine seeded with 3
  seeded << std::mt19937_64(3);
  const c10::IValue engine_state(seeded.str());
  CHECK_THROWS_WITH(load_saved(policy, record_with(engine_state, c10::IValue(std::string("50")))),
                    Catch::Contains("damaged state in checkpoint"));
  CHECK(saved_bytes(policy) == before);

  // An older record (no modulation_ends) is one that never ends: a default policy takes
  // it, one with an end refuses it.
  const std::string older = record_with(engine_state, c10::nullopt);
  OGMGEPolicy never_ends(base);
  CHECK_NOTHROW(load_saved(never_ends, older));
  CHECK(saved_bytes(never_ends) == saved(base));
  CHECK_THROWS_WITH(load_saved(ends_50, older),
                    Catch::Contains("made with modulation_ends never (the default), this policy has 50"));
}

TEST_CASE("OGM-GE modulates up to modulation_ends, then leaves the gradients alone", "[ogm-ge]") {
  Net net = small_net(3);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.7).modulation_ends(1)),
                                 BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(OGMGEPolicy(OGMGEOptions().modulation_ends(-1)),
                    Catch::Contains("modulation_ends must be an epoch >= 0, got -1"));
  const auto b = small_batch(8, 11);
  for (const std::int64_t epoch : {0, 1, 2, 3}) {
    REQUIRE(balancer.epoch() == epoch);
    const std::vector<at::Tensor> plain = plain_gradients(net, b);
    const std::string policy_before = saved_bytes(balancer.policy());  // holds the generator
    step(net, balancer, b);
    const bool drew = saved_bytes(balancer.policy()) != policy_before;
    const at::Tensor k = balancer.policy().last_coefficients();
    const auto params = net->parameters();
    bool changed = false;
    for (std::size_t j = 0; j < params.size(); ++j) changed |= !at::equal(params[j].grad(), plain[j]);
    if (epoch <= 1) {  // epochs 0 and 1 modulate: scaled and noisy
      CHECK(k.min().item<double>() < 1.0);
      CHECK(changed);
      CHECK(drew);
    } else {  // afterwards plain gradients, bit for bit: no scale, no noise, no draw
      CHECK(k.min().item<double>() == 1.0);
      CHECK_FALSE(changed);
      CHECK_FALSE(drew);
    }
    balancer.end_epoch();
  }
}

TEST_CASE("OGM-GE with gradient accumulation scores every micro-batch of the step", "[ogm-ge]") {
  // Two micro-batches of 4 rows, each through balancer.loss, one observe: the coefficients
  // of their heads and targets joined, not of the last micro-batch alone.
  Net net = small_net(12);
  Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.9).noise(false)),
                                 BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(8, 13);
  const StepKind kind = to_step_kind(balancer.next_plan());
  std::vector<at::Tensor> h0, h1, targets;
  at::Tensor last;
  for (std::int64_t part = 0; part < 2; ++part) {
    const at::Tensor x0 = b.x0.narrow(0, 4 * part, 4), x1 = b.x1.narrow(0, 4 * part, 4),
                     y = b.target.narrow(0, 4 * part, 4);
    const ModelOutput out = net->forward(x0, x1, kind);
    h0.push_back(out.y0.detach());
    h1.push_back(out.y1.detach());
    targets.push_back(y);
    last = balancer.loss(out, y);
    last.backward();
  }
  balancer.observe(last);
  const at::Tensor joined = OGMGEPolicy::coefficients({at::cat(h0), at::cat(h1)}, at::cat(targets), 0.9);
  const at::Tensor only_last = OGMGEPolicy::coefficients({h0[1], h1[1]}, targets[1], 0.9);
  REQUIRE_FALSE(at::allclose(joined, only_last));  // the two readings differ here
  CHECK(at::allclose(balancer.policy().last_coefficients(), joined));
}

TEST_CASE("OGM-GE refuses by name a branch with no parameter its filter selects, before "
          "modulating any",
          "[ogm-ge][bad-input]") {
  // Branch 0 a convolution kernel; branch 1 only a linear layer (2-d weight, bias): under
  // conv_weights nothing of branch 1 would ever be scaled.
  const auto with_grad = [](std::vector<std::int64_t> shape) {
    at::Tensor p = at::randn(shape).requires_grad_();
    p.mutable_grad() = at::ones(shape);
    return p;
  };
  const std::vector<std::vector<at::Tensor>> params{{with_grad({4, 3, 3, 3})}, {with_grad({5, 4}), with_grad({5})}};
  const std::vector<at::Tensor> heads{as_tensor({{4.0, 0.0}, {4.0, 0.0}}), as_tensor({{0.0, 0.0}, {0.0, 0.0}})};
  const at::Tensor target = at::tensor({0L, 0L});
  const std::function<void(at::Tensor&)> one_process;
  const StepGradients step{heads, target, params, one_process, 0};
  OGMGEPolicy conv(OGMGEOptions().noise(false));
  CHECK_THROWS_WITH(conv.modulate_gradients(step),
                    Catch::Contains("OGMGEPolicy: branch 1 has no conv_weights parameter to modulate"));
  for (const auto& group : params) {
    for (const auto& p : group) CHECK(at::equal(p.grad(), at::ones_like(p)));  // untouched
  }
  // Every weight: branch 0, the dominant one, is scaled; the refusal is the filter's.
  OGMGEPolicy weights(OGMGEOptions().noise(false).parameters(ModulatedParameters::non_bias));
  weights.modulate_gradients(step);
  CHECK(params[0][0].grad().max().item<double>() < 1.0);
  CHECK(at::equal(params[1][0].grad(), at::ones({5, 4})));
}

TEST_CASE("OGM-GE trains the fused output's loss, warm-up included: on the late-fusion twin a "
          "branch's gradient depends on the other branch, as through the original's shared head",
          "[ogm-ge]") {
  const auto b = small_batch(8, 13);
  // Branch 0's gradients after one warm-up step (nothing modulated) of policy P, with
  // branch 1's parameters shifted by `shift`.
  const auto branch0_gradients = [&](auto policy, double shift, double* loss_value, double* expected) {
    Net net = small_late_net(5);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : net->branch1->parameters()) p.add_(shift);
    }
    Balancer<decltype(policy)> balancer(net, policy, BalancerOptions().warmup_epochs(1));
    const StepPlan plan = balancer.next_plan();
    const ModelOutput out = net->forward(b.x0, b.x1, to_step_kind(plan));
    const at::Tensor loss = balancer.loss(out, b.target);
    if (loss_value) *loss_value = loss.item<double>();
    if (expected) *expected = fused_cross_entropy(out.heads, b.target);
    loss.backward();
    balancer.observe(loss);
    std::vector<at::Tensor> g;
    for (const auto& p : net->branch0->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  double loss = 0, expected = 0;
  const auto g = branch0_gradients(OGMGEPolicy(), 0.0, &loss, &expected);
  CHECK(loss == Approx(expected).epsilon(1e-5));  // CE(y), y the mean of the heads
  const auto shifted = branch0_gradients(OGMGEPolicy(), 0.05, nullptr, nullptr);
  bool any_differs = false;
  for (std::size_t j = 0; j < g.size(); ++j) any_differs = any_differs || !at::allclose(g[j], shifted[j], 1e-4, 1e-7);
  CHECK(any_differs);
  // The control: the sum of the heads' losses leaves branch 0's gradient as it was.
  const auto apart = branch0_gradients(VanillaPolicy(), 0.0, nullptr, nullptr);
  const auto apart_shifted = branch0_gradients(VanillaPolicy(), 0.05, nullptr, nullptr);
  for (std::size_t j = 0; j < apart.size(); ++j) CHECK(at::equal(apart[j], apart_shifted[j]));
}

TEST_CASE("OGM-GE with half and bfloat16 gradients: scaled and noised as in float, from the same "
          "draws, rounded once into the gradient", "[ogm-ge]") {
  // One conv kernel per branch; branch 0 dominant. The float run's gradients are the low-
  // precision ones widened, so both runs see the same numbers and the same seed.
  for (const at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    CAPTURE(dtype);
    const at::Tensor base = (at::randn({8, 4, 3, 3}, at::TensorOptions().dtype(at::kFloat)) * 0.01).to(dtype);
    const auto with_grad = [&](at::ScalarType type, double scale) {
      at::Tensor p = at::zeros({8, 4, 3, 3}, type).requires_grad_();
      p.mutable_grad() = (base.to(at::kFloat) * scale).to(type);
      return p;
    };
    const std::vector<std::vector<at::Tensor>> low{{with_grad(dtype, 1)}, {with_grad(dtype, 2)}};
    const std::vector<std::vector<at::Tensor>> wide{{with_grad(at::kFloat, 1)}, {with_grad(at::kFloat, 2)}};
    REQUIRE(at::equal(low[1][0].grad().to(at::kFloat), wide[1][0].grad()));
    const std::vector<at::Tensor> heads{as_tensor({{6.0, 0.0}, {6.0, 0.0}}), as_tensor({{0.0, 0.0}, {0.0, 0.0}})};
    const at::Tensor target = at::tensor({0L, 0L});
    const std::function<void(at::Tensor&)> one_process;
    OGMGEPolicy in_low(OGMGEOptions().alpha(0.5).seed(9)), in_wide(OGMGEOptions().alpha(0.5).seed(9));
    in_low.modulate_gradients(StepGradients{heads, target, low, one_process, 0});
    in_wide.modulate_gradients(StepGradients{heads, target, wide, one_process, 0});
    REQUIRE(in_wide.last_coefficients()[0].item<double>() < 0.9);
    for (std::size_t k = 0; k < 2; ++k) {
      // The float result rounded once: the same draws, the same float arithmetic.
      const at::Tensor want = wide[k][0].grad();
      CHECK(low[k][0].grad().scalar_type() == dtype);
      CHECK(at::equal(low[k][0].grad(), want.to(dtype)));
      // The noise is there, with about the unscaled gradient's std.
      const double noise_std = (want - base.to(at::kFloat) * static_cast<double>(k + 1) *
                                           in_wide.last_coefficients()[static_cast<std::int64_t>(k)].item<double>())
                                   .std()
                                   .item<double>();
      CHECK(noise_std == Approx((base.to(at::kFloat) * static_cast<double>(k + 1)).std().item<double>()).epsilon(0.3));
    }
  }
}
