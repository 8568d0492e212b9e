// AGM as a gradient-modulating policy: its mono-modal responses (Shapley values) against
// hand tables and a naive average over orderings, its coefficients on hand-computed
// steps written out as the original's two-modality code computes them, through the
// Balancer on MMTM, late-fusion and three-branch networks, its edges, resume and bad input.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <functional>
#include <numeric>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

const double kCap = -std::log(1e-8);  // the original's floor on a probability, as a loss

// Parameters whose gradients are all ones: a 2-d weight and a 1-d bias per branch.
std::vector<std::vector<at::Tensor>> ones_gradients(std::size_t branches) {
  std::vector<std::vector<at::Tensor>> params(branches);
  for (auto& branch : params) {
    for (const auto& shape : {std::vector<std::int64_t>{2, 3}, std::vector<std::int64_t>{3}}) {
      at::Tensor p = at::zeros(shape, at::kDouble).requires_grad_();
      p.mutable_grad() = at::ones(shape, at::kDouble);
      branch.push_back(p);
    }
  }
  return params;
}

// One hook call with the given masked outputs and targets.
void run_agm_hook(AGMPolicy& policy, const std::vector<at::Tensor>& subsets, const at::Tensor& target,
              const std::vector<std::vector<at::Tensor>>& params) {
  const std::vector<at::Tensor> heads;
  const std::function<void(at::Tensor&)> one_process;
  const std::vector<std::vector<at::Tensor>> no_fused;
  policy.modulate_gradients(StepGradients{heads, target, params, one_process, 0, no_fused, subsets});
}

// Two-modality masked outputs whose responses are exactly a and b: v({0}) = a, v({1}) = b,
// v(all) = a + b gives φ_0 = ½a + ½(a + b − b) = a and φ_1 = b.
std::vector<at::Tensor> additive(const at::Tensor& a, const at::Tensor& b) { return {at::Tensor(), a, b, a + b}; }

// −log softmax(row)[y], capped as the original caps it, on plain numbers.
double nll(const std::vector<double>& row, std::int64_t y) {
  double z = 0;
  for (double v : row) z += std::exp(v);
  return std::min(-(row[static_cast<std::size_t>(y)] - std::log(z)), kCap);
}

// The original's two-modality step (lihongcs/AGM train loop) on plain numbers: scores, then
// ratio_a = exp(s_v − s_a), optimal_ratio_a = exp(ŝ_v − ŝ_a), coeff = exp(α·min(opt − ratio, cap)),
// then the running means over `iteration` steps. Returns (coeff_a, coeff_v).
std::pair<double, double> original_step(double s_a, double s_v, double& train_a, double& train_v,
                                        int iteration, double alpha, double cap) {
  const double ratio_a = std::exp(s_v - s_a), ratio_v = std::exp(s_a - s_v);
  const double optimal_a = std::exp(train_v - train_a), optimal_v = std::exp(train_a - train_v);
  const double coeff_a = std::exp(alpha * std::min(optimal_a - ratio_a, cap));
  const double coeff_v = std::exp(alpha * std::min(optimal_v - ratio_v, cap));
  train_a = train_a * (iteration - 1) / iteration + s_a / iteration;
  train_v = train_v * (iteration - 1) / iteration + s_v / iteration;
  return {coeff_a, coeff_v};
}

at::Tensor rows(const std::vector<std::vector<double>>& r) {
  std::vector<double> flat;
  for (const auto& row : r) flat.insert(flat.end(), row.begin(), row.end());
  return at::tensor(flat, at::kDouble).view({static_cast<std::int64_t>(r.size()), -1});
}

// Shapley values by their definition: the average over every order of the modalities of
// what m adds to those before it (v(∅) = 0). Independent of the subset-weight formula.
std::vector<at::Tensor> naive_shapley(const std::vector<at::Tensor>& v, std::size_t n) {
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::vector<at::Tensor> phi(n);
  const auto value = [&](std::size_t s) { return s == 0 ? at::zeros_like(v.back()) : v[s]; };
  double orders = 0;
  do {
    std::size_t before = 0;
    for (std::size_t m : order) {
      const at::Tensor gain = value(before | (std::size_t{1} << m)) - value(before);
      phi[m] = phi[m].defined() ? phi[m] + gain : gain;
      before |= std::size_t{1} << m;
    }
    ++orders;
  } while (std::next_permutation(order.begin(), order.end()));
  for (auto& p : phi) p = p / orders;
  return phi;
}

// A network's fused output with only the modalities of each bit mask present (the others
// zeroed), in eval mode without gradient, computed here independently of the balancer.
template <class NetT>
std::vector<at::Tensor> masked_outputs(NetT& net, const std::vector<at::Tensor>& x) {
  const std::size_t all = (std::size_t{1} << x.size()) - 1;
  std::vector<at::Tensor> v(all + 1);
  EvalModeGuard<NetT> eval(net);
  for (std::size_t s = 1; s < all; ++s) {
    std::vector<at::Tensor> masked;
    for (std::size_t k = 0; k < x.size(); ++k) masked.push_back(s >> k & 1 ? x[k] : at::zeros_like(x[k]));
    v[s] = forward_heads(net, masked).y.to(at::kDouble);
  }
  return v;
}

// One AGM step of `net` on (x, target) through the Balancer against what it should be,
// from a twin with the same state: masked outputs computed here, responses by the naive
// Shapley average, scores and coefficients by the rule written out (N/(N−1)·(s̄ − s_m); for
// two branches the original's exp(s_other − s_m)), gradients of CE(y) scaled by k on
// every non-1-d parameter of a branch. Also: the balancer's passes change no buffer (a
// BatchNorm's running statistics) and leave every module in training mode.
template <class NetT>
void check_agm_step_through_balancer(NetT net, NetT twin, const std::vector<at::Tensor>& x, const at::Tensor& target,
                                 double alpha) {
  const std::size_t n = x.size();
  copy_state(net, twin);
  // A BatchNorm frozen in eval mode inside the training network stays frozen.
  const auto first_norm = [](auto& model) {
    for (const auto& m : model->modules(/*include_self=*/false)) {
      if (m->name().find("BatchNorm") != std::string::npos) return m;
    }
    return std::shared_ptr<torch::nn::Module>();
  };
  const auto frozen = first_norm(net);
  REQUIRE(frozen);
  frozen->eval();
  first_norm(twin)->eval();
  // The twin: the train-mode step as the balancer's, then the masked outputs (eval mode,
  // with the BatchNorm statistics that step updated).
  // A plain balancer commits the twin's gates as the AGM one commits the network's.
  Balancer<VanillaPolicy> plain(twin, VanillaPolicy(), BalancerOptions().warmup_epochs(0));
  plain.next_plan();
  const NetOutput twin_out = forward_heads(twin, x);
  std::vector<at::Tensor> v = masked_outputs(twin, x);
  v.back() = twin_out.y.detach().to(at::kDouble);
  const std::vector<at::Tensor> phi = naive_shapley(v, n);
  std::vector<double> s(n);
  for (std::size_t m = 0; m < n; ++m) {
    const at::Tensor p = phi[m];
    for (std::int64_t i = 0; i < p.size(0); ++i) {
      std::vector<double> row(p.size(1));
      for (std::int64_t c = 0; c < p.size(1); ++c) row[c] = p[i][c].item<double>();
      s[m] += nll(row, target[i].item<std::int64_t>()) / static_cast<double>(p.size(0));
    }
  }
  const double mean = std::accumulate(s.begin(), s.end(), 0.0) / static_cast<double>(n);
  std::vector<double> k(n);
  for (std::size_t m = 0; m < n; ++m) {
    const double ratio = std::exp(static_cast<double>(n) / static_cast<double>(n - 1) * (mean - s[m]));
    k[m] = std::exp(alpha * std::min(1.0 - ratio, 10.0));  // running means 0: r̄ = 1
  }
  const at::Tensor twin_loss = at::cross_entropy_loss(twin_out.y, target);
  twin_loss.backward();
  plain.observe(twin_loss);

  Balancer<AGMPolicy> balancer(net, AGMPolicy(AGMOptions().alpha(alpha)), BalancerOptions().warmup_epochs(0));
  balancer.next_plan();
  const NetOutput out = forward_heads(net, x);
  const at::Tensor loss = balancer.loss(out, target, x);
  CHECK(loss.item<double>() == Approx(at::cross_entropy_loss(out.y, target).item<double>()).epsilon(1e-12));
  net->zero_grad();
  loss.backward();
  balancer.observe(loss);
  for (std::size_t m = 0; m < n; ++m) {
    CHECK(balancer.policy().last_scores()[static_cast<std::int64_t>(m)].item<double>() == Approx(s[m]).epsilon(1e-5));
    CHECK(balancer.policy().last_coefficients()[static_cast<std::int64_t>(m)].item<double>() == Approx(k[m]).epsilon(1e-5));
  }
  CHECK(std::abs(k[0] - k[1]) > 1e-6);  // the case does modulate
  const auto mine = branches_of(net), theirs = branches_of(twin);
  for (std::size_t m = 0; m < n; ++m) {
    for (std::size_t p = 0; p < mine[m].size(); ++p) {
      const double factor = mine[m][p].dim() >= 2 ? k[m] : 1.0;
      CHECK(at::allclose(mine[m][p].grad(), theirs[m][p].grad() * factor, 1e-4, 1e-7));
    }
  }
  // The masked passes left the BatchNorm statistics, the gate means (they stage no gates)
  // and the modes as the step found them.
  const auto nb = net->named_buffers(), tb = twin->named_buffers();
  for (const auto& b : nb) {
    INFO(b.key());
    CHECK(at::equal(b.value(), tb[b.key()]));
  }
  for (const auto& m : net->modules()) CHECK(m->is_training() == (m != frozen));
}

}  // namespace

TEST_CASE("AGM's mono-modal responses are the Shapley values with v(empty) = 0 (the public "
          "collection drops the empty coalition)", "[agm]") {
  // Two modalities by hand: φ_0 = ½(v0 − 0) + ½(v01 − v1), φ_1 = ½ v1 + ½(v01 − v0).
  const at::Tensor v0 = rows({{1, 2}}), v1 = rows({{4, -2}}), v01 = rows({{10, 0}});
  auto phi = AGMPolicy::mono_modal_responses({at::Tensor(), v0, v1, v01});
  CHECK(at::allclose(phi[0], rows({{3.5, 2}})));   // ½·1 + ½·6, ½·2 + ½·2
  CHECK(at::allclose(phi[1], rows({{6.5, -2}})));  // ½·4 + ½·9, ½·(−2) + ½·(−2)
  // The public collection's N-modality code (newGrad) leaves out S = ∅: it would give
  // φ_0 = ½(v01 − v1) = (3, 1), which sums with φ_1 to less than the full output.
  CHECK_FALSE(at::allclose(phi[0], rows({{3, 1}})));
  CHECK(at::allclose(phi[0] + phi[1], v01));  // efficiency: the responses add up to y

  // Three modalities, by hand: φ_0 = ⅓ v0 + ⅙(v01 − v1) + ⅙(v02 − v2) + ⅓(v012 − v12).
  std::vector<at::Tensor> v(8);
  const double values[8] = {0, 1, 2, 5, 3, 7, 11, 20};  // v[mask], a 1x1 output each
  for (std::size_t s = 1; s < 8; ++s) v[s] = rows({{values[s]}});
  phi = AGMPolicy::mono_modal_responses(v);
  CHECK(phi[0].item<double>() == Approx(1.0 / 3 + (5.0 - 2) / 6 + (7.0 - 3) / 6 + (20.0 - 11) / 3));
  const auto naive = naive_shapley(v, 3);
  for (std::size_t m = 0; m < 3; ++m) CHECK(phi[m].item<double>() == Approx(naive[m].item<double>()));
  CHECK(phi[0].item<double>() + phi[1].item<double>() + phi[2].item<double>() == Approx(20));

  // Four modalities, random outputs, against the average over all 24 orders.
  auto gen = at::detail::createCPUGenerator(3);
  std::vector<at::Tensor> w(16);
  for (std::size_t s = 1; s < 16; ++s) w[s] = at::randn({5, 3}, gen, at::kDouble);
  phi = AGMPolicy::mono_modal_responses(w);
  const auto naive4 = naive_shapley(w, 4);
  for (std::size_t m = 0; m < 4; ++m) CHECK(at::allclose(phi[m], naive4[m], 1e-12, 1e-12));
}

TEST_CASE("AGM's coefficients over two hand-computed steps are the original's, and scale the "
          "non-bias gradients", "[agm]") {
  // Responses a, b (2 classes): softmax of (0, ln 3) is (¼, ¾), of (0, 0) is (½, ½).
  const double l3 = std::log(3.0);
  const at::Tensor a1 = rows({{0, l3}, {0, l3}}), b1 = rows({{0, 0}, {0, 0}});
  const at::Tensor t1 = at::tensor({1, 0}, at::kLong);
  const double s_a1 = (std::log(4.0 / 3) + std::log(4.0)) / 2, s_v1 = std::log(2.0);
  // Step 2: modality a right with ¾ in both rows, b with ¼ in both.
  const at::Tensor a2 = rows({{0, l3}, {l3, 0}}), b2 = rows({{l3, 0}, {0, l3}});
  const at::Tensor t2 = at::tensor({1, 0}, at::kLong);
  const double s_a2 = std::log(4.0 / 3), s_v2 = std::log(4.0);

  // The original's ratio exp(s_v − s_a): the public collection's N-modality
  // exp(N/(N−1)(s_m − s̄)) is its inverse and fails these checks.
  const double alpha = 0.7;
  double train_a = 0, train_v = 0;
  const auto [k_a1, k_v1] = original_step(s_a1, s_v1, train_a, train_v, 1, alpha, 10);
  const auto [k_a2, k_v2] = original_step(s_a2, s_v2, train_a, train_v, 2, alpha, 10);

  auto policy = for_branches(AGMPolicy(AGMOptions().alpha(alpha)), 2);
  auto params = ones_gradients(2);
  run_agm_hook(policy, additive(a1, b1), t1, params);
  CHECK(policy.last_scores()[0].item<double>() == Approx(s_a1).epsilon(1e-12));
  CHECK(policy.last_scores()[1].item<double>() == Approx(s_v1).epsilon(1e-12));
  CHECK(policy.last_coefficients()[0].item<double>() == Approx(k_a1).epsilon(1e-12));
  CHECK(policy.last_coefficients()[1].item<double>() == Approx(k_v1).epsilon(1e-12));
  CHECK(at::allclose(params[0][0].grad(), at::full({2, 3}, k_a1, at::kDouble)));
  CHECK(at::allclose(params[1][0].grad(), at::full({2, 3}, k_v1, at::kDouble)));
  CHECK(at::equal(params[0][1].grad(), at::ones({3}, at::kDouble)));  // biases: not scaled
  // a is behind (s_a > s_v), below its usual (zero) lead: sped up; v slowed.
  CHECK(k_a1 > 1);
  CHECK(k_v1 < 1);

  params = ones_gradients(2);
  run_agm_hook(policy, additive(a2, b2), t2, params);
  CHECK(policy.last_coefficients()[0].item<double>() == Approx(k_a2).epsilon(1e-12));
  CHECK(policy.last_coefficients()[1].item<double>() == Approx(k_v2).epsilon(1e-12));
  CHECK(policy.running_scores()[0].item<double>() == Approx(train_a).epsilon(1e-12));
  CHECK(policy.running_scores()[1].item<double>() == Approx(train_v).epsilon(1e-12));
  CHECK(policy.modulated_steps().item<std::int64_t>() == 2);
  CHECK(at::allclose(params[0][0].grad(), at::full({2, 3}, k_a2, at::kDouble)));

  // The parameter filter: conv weights only leaves a 2-d weight alone; all scales biases.
  auto conv = for_branches(AGMPolicy(AGMOptions().alpha(alpha).parameters(ModulatedParameters::conv_weights)), 2);
  params = ones_gradients(2);
  run_agm_hook(conv, additive(a1, b1), t1, params);
  CHECK(at::equal(params[0][0].grad(), at::ones({2, 3}, at::kDouble)));
  auto all = for_branches(AGMPolicy(AGMOptions().alpha(alpha).parameters(ModulatedParameters::all)), 2);
  params = ones_gradients(2);
  run_agm_hook(all, additive(a1, b1), t1, params);
  CHECK(at::allclose(params[0][1].grad(), at::full({3}, k_a1, at::kDouble)));
}

TEST_CASE("AGM at the edges: equal modalities are not modulated, the gap is capped, a lost "
          "row's loss is capped, non-finite scores leave the step as it is", "[agm]") {
  const double l3 = std::log(3.0);
  // Equal responses: s equal, r = r̄ = 1, k = 1 exactly, over several steps.
  auto equal = for_branches(AGMPolicy(AGMOptions().alpha(2.0)), 2);
  for (int i = 0; i < 3; ++i) {
    auto params = ones_gradients(2);
    const at::Tensor a = rows({{0, l3 * i}, {1, -2}});
    run_agm_hook(equal, additive(a, a.clone()), at::tensor({1, 0}, at::kLong), params);
    CHECK(at::equal(equal.last_coefficients(), at::ones({2}, at::kDouble)));
    CHECK(at::equal(params[0][0].grad(), at::ones({2, 3}, at::kDouble)));
  }

  // The cap: step 1 puts a 5 nats ahead (ŝ_v − ŝ_a = 5: r̄_a = e^5); step 2 equal (r = 1):
  // r̄_a − r_a = e^5 − 1 > max_gap, so k_a = exp(α·max_gap); k_v = exp(α·(e^−5 − 1)).
  for (const double cap : {10.0, 7.0}) {
    auto policy = for_branches(AGMPolicy(AGMOptions().alpha(0.1).max_gap(cap)), 2);
    auto params = ones_gradients(2);
    // a: right with odds e^20 : 1, b: wrong with odds e^5 : 1.
    const at::Tensor sure = rows({{20, 0}}), unsure = rows({{0, 5}});
    run_agm_hook(policy, additive(sure, unsure), at::tensor({0}, at::kLong), params);
    const double gap = policy.running_scores()[1].item<double>() - policy.running_scores()[0].item<double>();
    CHECK(gap == Approx(std::log1p(std::exp(5.0)) - std::log1p(std::exp(-20.0))).epsilon(1e-12));
    params = ones_gradients(2);
    run_agm_hook(policy, additive(sure, sure.clone()), at::tensor({0}, at::kLong), params);
    CHECK(policy.last_coefficients()[0].item<double>() == Approx(std::exp(0.1 * cap)).epsilon(1e-12));
    CHECK(policy.last_coefficients()[1].item<double>() ==
          Approx(std::exp(0.1 * (std::exp(-gap) - 1))).epsilon(1e-12));
  }

  // One modality perfect, the other lost: a row with p < 1e-8 scores −log 1e-8.
  auto lost = for_branches(AGMPolicy(), 2);
  auto params = ones_gradients(2);
  run_agm_hook(lost, additive(rows({{50, 0}}), rows({{-50, 0}})), at::tensor({0}, at::kLong), params);
  CHECK(lost.last_scores()[0].item<double>() == Approx(0).margin(1e-15));
  CHECK(lost.last_scores()[1].item<double>() == Approx(kCap).epsilon(1e-12));
  CHECK(lost.last_coefficients()[0].item<double>() == Approx(std::exp(0.1 * (1 - std::exp(kCap)))).margin(1e-12));

  // Non-finite responses: k = 1, gradients, running means and the count of steps unchanged.
  auto policy = for_branches(AGMPolicy(), 2);
  params = ones_gradients(2);
  run_agm_hook(policy, additive(rows({{0, l3}}), rows({{0, 0}})), at::tensor({1}, at::kLong), params);
  const at::Tensor before = policy.running_scores().clone();
  params = ones_gradients(2);
  run_agm_hook(policy, additive(rows({{NAN, 0}}), rows({{0, 0}})), at::tensor({1}, at::kLong), params);
  CHECK(at::equal(policy.last_coefficients(), at::ones({2}, at::kDouble)));
  CHECK(at::equal(params[0][0].grad(), at::ones({2, 3}, at::kDouble)));
  CHECK(at::equal(policy.running_scores(), before));
  CHECK(policy.modulated_steps().item<std::int64_t>() == 1);
  CHECK(policy.skipped_steps().item<std::int64_t>() == 1);
}

TEST_CASE("AGM through the Balancer: the loss is CE(y), masked passes give the responses and "
          "each branch's gradient is scaled by its coefficient, on MMTM, late-fusion and "
          "three-branch networks", "[agm][n-way]") {
  const MultiModalBatch b = small_batch(8, 31);
  check_agm_step_through_balancer(small_net(4), small_net(99), {b.x0, b.x1}, b.target, 0.5);
  check_agm_step_through_balancer(leaning_late_net(4), small_late_net(99), {b.x0, b.x1}, b.target, 0.5);
  const Batch c = n_way_batch(3, 8, 32);
  check_agm_step_through_balancer(small_three_way(4), small_three_way(99), c.inputs, c.target, 0.5);
}

template <class B>
concept LossWithoutInputs = requires(B& b, const ModelOutput& out, const at::Tensor& target) { b.loss(out, target); };

TEST_CASE("AGM in warm-up: the fused output's loss alone (the original's), no masked passes, the "
          "inputs are needed from the start", "[agm]") {
  Net net = small_net(7), twin = small_net(99);
  copy_state(net, twin);
  const MultiModalBatch b = small_batch(8, 7);
  // The original (lihongcs/AGM) trains CE(out) from the first step.
  at::cross_entropy_loss(twin->forward(b.x0, b.x1).y, b.target).backward();
  Balancer<AGMPolicy> balancer(net, AGMPolicy(), BalancerOptions().warmup_epochs(1));
  balancer.next_plan();
  const ModelOutput out = net->forward(b.x0, b.x1);
  // Without the inputs there is no loss() to call (a compile-time error for AGM).
  static_assert(!LossWithoutInputs<Balancer<AGMPolicy>> && LossWithoutInputs<Balancer<VanillaPolicy>>);
  const at::Tensor loss = balancer.loss(out, b.target, {b.x0, b.x1});
  CHECK(loss.item<double>() == Approx(at::cross_entropy_loss(out.y, b.target).item<double>()));
  loss.backward();
  balancer.observe(loss);
  const auto p = net->parameters(), q = twin->parameters();
  for (std::size_t j = 0; j < p.size(); ++j) CHECK(at::equal(p[j].grad(), q[j].grad()));
  CHECK_FALSE(balancer.policy().last_coefficients().defined());
}

TEST_CASE("AGM: the micro-batches of one step are scored together, a failed call keeps the earlier ones", "[agm]") {
  // Without BatchNorm a row's outputs do not depend on the other rows: two loss() calls on
  // halves give the coefficients of one call on the whole batch.
  const auto make = [] {
    torch::manual_seed(12);
    const auto opts = [](std::int64_t in) {
      return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}).batch_norm(false);
    };
    return Net(ConvBranch(opts(3)), ConvBranch(opts(1)), std::vector<FusionTap<MMTM>>{});
  };
  const MultiModalBatch b = small_batch(8, 41);
  Net whole = make(), halves = make();
  Balancer<AGMPolicy> one(whole, AGMPolicy(AGMOptions().alpha(1.0)), BalancerOptions().warmup_epochs(0));
  Balancer<AGMPolicy> two(halves, AGMPolicy(AGMOptions().alpha(1.0)), BalancerOptions().warmup_epochs(0));
  one.next_plan();
  const at::Tensor l1 = one.loss(whole->forward(b.x0, b.x1), b.target, {b.x0, b.x1});
  l1.backward();
  one.observe(l1);
  two.next_plan();
  at::Tensor l2;
  for (std::int64_t h = 0; h < 2; ++h) {
    const at::Tensor x0 = b.x0.narrow(0, 4 * h, 4), x1 = b.x1.narrow(0, 4 * h, 4);
    if (h == 1) {  // a call that throws (inputs of other rows) keeps what the first one staged
      CHECK_THROWS_WITH(two.loss(halves->forward(x0, x1), b.target.narrow(0, 4, 4), {x0, x1.narrow(0, 0, 2)}),
                        Catch::Contains("input 1 is [2, 1, 8, 8]"));
    }
    const at::Tensor part = two.loss(halves->forward(x0, x1), b.target.narrow(0, 4 * h, 4), {x0, x1}, 0.5);
    part.backward();
    l2 = l2.defined() ? l2 + part : part;
  }
  two.observe(l2);
  CHECK(at::allclose(one.policy().last_coefficients(), two.policy().last_coefficients(), 1e-5, 1e-7));
  CHECK(at::allclose(one.policy().last_scores(), two.policy().last_scores(), 1e-5, 1e-7));
  CHECK((one.policy().last_coefficients() - 1).abs().max().item<double>() > 1e-4);
}

TEST_CASE("AGM with checks on: a non-finite gradient is refused by name before the coefficients, "
          "an abandoned step leaves the running means", "[agm]") {
  Net net = small_net(15);
  // BatchNorm frozen: a forward pass changes nothing, so equal steps score equally.
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (m->name().find("BatchNorm") != std::string::npos) m->eval();
  }
  Balancer<AGMPolicy> balancer(net, AGMPolicy(), BalancerOptions().warmup_epochs(0));
  const MultiModalBatch b = small_batch(8, 15);
  const auto step = [&](bool poison) {
    balancer.next_plan();
    const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1), b.target, {b.x0, b.x1});
    net->zero_grad();
    loss.backward();
    if (poison) {
      torch::NoGradGuard no_grad;
      net->parameter_groups().branch[1].front().mutable_grad().view(-1)[0] = NAN;
    }
    balancer.observe(loss);
  };
  CHECK_THROWS_WITH(step(true), Catch::Contains("non-finite gradient"));
  CHECK(balancer.policy().modulated_steps().item<std::int64_t>() == 0);
  CHECK(at::equal(balancer.policy().running_scores(), at::zeros({2}, at::kDouble)));
  step(false);
  const at::Tensor after_one = balancer.policy().running_scores().clone();
  CHECK(balancer.policy().modulated_steps().item<std::int64_t>() == 1);
  // An abandoned step (the forward pass and loss() done on other rows, then given up)
  // changes nothing: the next step on the same rows and parameters scores as the first,
  // so the running means stay.
  const MultiModalBatch other = small_batch(4, 16);
  balancer.next_plan();
  (void)balancer.loss(net->forward(other.x0, other.x1), other.target, {other.x0, other.x1});
  balancer.abandon_step();
  step(false);
  CHECK(balancer.policy().modulated_steps().item<std::int64_t>() == 2);
  CHECK(at::allclose(balancer.policy().running_scores(), after_one, 1e-12, 0));
  CHECK(balancer.step() == 2);
}

TEST_CASE("AGM resumes bit for bit mid-run, running scores included", "[agm][checkpoint]") {
  const auto make = [] {
    Net net = small_net(2);
    auto opt = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    auto bal = std::make_shared<Balancer<AGMPolicy>>(net, AGMPolicy(AGMOptions().alpha(0.5)),
                                                     BalancerOptions().warmup_epochs(1));
    return std::tuple{net, opt, bal};
  };
  const auto loss_of = [](Net& net, Balancer<AGMPolicy>& bal, int i) {
    const auto b = small_batch(8, static_cast<std::uint64_t>(200 + i));
    return bal.loss(net->forward(b.x0, b.x1), b.target, {b.x0, b.x1});
  };
  const auto [a, b] = runs_resumed_mid_run("agm", make, loss_of, [](const Balancer<AGMPolicy>& bal) {
    REQUIRE(bal.policy().modulated_steps().item<std::int64_t>() == 4);  // the running means are state
  });
  CHECK(same_state(*std::get<0>(a), *std::get<0>(b)));
  const AGMPolicy &ended_a = std::get<2>(a)->policy(), &ended_b = std::get<2>(b)->policy();
  CHECK(at::equal(ended_a.running_scores(), ended_b.running_scores()));
  CHECK(saved_bytes(ended_a) == saved_bytes(ended_b));
}

TEST_CASE("AGM refuses bad options, inputs and state by name, and changes nothing", "[agm][bad-input]") {
  CHECK_THROWS_WITH(Balancer<AGMPolicy>(small_net(1), AGMPolicy(), BalancerOptions().masked_rows_per_pass(0)),
                    Catch::Contains("masked_rows_per_pass must be >= 1, got 0"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(), 1), Catch::Contains("needs 2 to 12 branches"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(), 13), Catch::Contains("got 13"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().alpha(-0.5)), 2), Catch::Contains("alpha must be a finite number >= 0, got -0.5"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().alpha(NAN)), 2), Catch::Contains("alpha must be a finite number"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().max_gap(0)), 2), Catch::Contains("max_gap must be a finite number > 0, got 0"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().max_gap(INFINITY)), 2), Catch::Contains("max_gap must be a finite"));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().alpha(10).max_gap(10)), 2),
                    Catch::Contains("alpha * max_gap must be <= 80 (the coefficient exp(alpha * max_gap) would "
                                    "overflow), got alpha 10 and max_gap 10"));
  CHECK_NOTHROW(for_branches(AGMPolicy(AGMOptions().alpha(8).max_gap(10)), 2));
  CHECK_THROWS_WITH(for_branches(AGMPolicy(AGMOptions().parameters(static_cast<ModulatedParameters>(7))), 2),
                    Catch::Contains("parameters must be"));
  CHECK_THROWS_WITH(AGMPolicy::mono_modal_responses({at::Tensor(), rows({{1}}), rows({{1}})}),
                    Catch::Contains("every subset"));
  CHECK_THROWS_WITH(AGMPolicy::mono_modal_responses({at::Tensor(), rows({{1}}), rows({{1, 2}}), rows({{1}})}),
                    Catch::Contains("modalities 2 (bit mask)"));

  Net net = small_net(8);
  Balancer<AGMPolicy> balancer(net, AGMPolicy(), BalancerOptions().warmup_epochs(0));
  const MultiModalBatch b = small_batch(8, 8);
  balancer.next_plan();
  const ModelOutput out = net->forward(b.x0, b.x1);
  CHECK_THROWS_WITH(balancer.loss(out, b.target, {b.x0}), Catch::Contains("1 inputs for a network of 2 branches"));
  CHECK_THROWS_WITH(balancer.loss(out, b.target, {b.x0, b.x1.narrow(0, 0, 4)}),
                    Catch::Contains("input 1 is [4, 1, 8, 8]"));
  CHECK_THROWS_WITH(balancer.loss(out, b.target, {b.x0, at::Tensor()}), Catch::Contains("input 1"));
  const at::Tensor loss = balancer.loss(out, b.target, {b.x0, b.x1});  // still usable
  loss.backward();
  balancer.observe(loss);

  // State from other options, another branch count, or damaged, is refused.
  AGMPolicy trained = balancer.policy();
  const std::string bytes = saved_bytes(trained);
  auto other = for_branches(AGMPolicy(AGMOptions().alpha(0.2)), 2);
  CHECK_THROWS_WITH(load_saved(other, bytes), Catch::Contains("made with alpha 0.1, this policy has alpha 0.2"));
  auto gap = for_branches(AGMPolicy(AGMOptions().max_gap(7)), 2);
  CHECK_THROWS_WITH(load_saved(gap, bytes), Catch::Contains("max_gap 10, this policy has max_gap 7"));
  auto filter = for_branches(AGMPolicy(AGMOptions().parameters(ModulatedParameters::all)), 2);
  CHECK_THROWS_WITH(load_saved(filter, bytes), Catch::Contains("this policy modulates all"));
  auto three = for_branches(AGMPolicy(), 3);
  CHECK_THROWS_WITH(load_saved(three, bytes), Catch::Contains("running scores of 2 branches, this policy has 3"));
  const auto damaged = [](const at::Tensor& running, const at::Tensor& steps) {
    torch::serialize::OutputArchive archive;
    archive.write("alpha", 0.1);
    archive.write("max_gap", 10.0);
    archive.write("parameters", static_cast<std::int64_t>(ModulatedParameters::non_bias));
    archive.write("running_scores", running);
    archive.write("steps", steps);
    archive.write("skipped_steps", at::zeros({}, at::kLong));
    std::ostringstream out;
    archive.save_to(out);
    return out.str();
  };
  auto fresh = for_branches(AGMPolicy(), 2);
  const std::string fresh_bytes = saved_bytes(fresh);
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({NAN, 1.0}, at::kDouble), at::zeros({}, at::kLong))),
                    Catch::Contains("out of range"));
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({-1.0, 1.0}, at::kDouble), at::zeros({}, at::kLong))),
                    Catch::Contains("out of range"));
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({1.0, 1.0}, at::kFloat), at::zeros({}, at::kLong))),
                    Catch::Contains("damaged running scores"));
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({1.0, 1.0}, at::kDouble), at::full({}, -3, at::kLong))),
                    Catch::Contains("damaged step count"));
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({1.0, 1.0}, at::kDouble), at::zeros({2}, at::kLong))),
                    Catch::Contains("damaged step count"));
  CHECK_THROWS_WITH(load_saved(fresh, damaged(at::tensor({1.0, 1.0}, at::kDouble), at::zeros({}, at::kLong))),
                    Catch::Contains("running scores without a step"));
  CHECK_THROWS(load_saved(fresh, std::string("not an archive")));
  CHECK(saved_bytes(fresh) == fresh_bytes);
  load_saved(fresh, bytes);
  CHECK(at::equal(fresh.running_scores(), trained.running_scores()));
}

TEST_CASE("AGM with half-precision gradients: a coefficient that would overflow half is refused by "
          "name before anything changes; bfloat16 takes it", "[agm][bad-input]") {
  // Branch a all wrong (logit 8 on the other class), v all right: r_a = exp(s_v − s_a) ≈ e^−8,
  // so k_a = exp(α·min(1 − r_a, cap)) ≈ exp(15) ≈ 3.3e6, beyond half's 65504.
  const at::Tensor a = rows({{8, 0}, {8, 0}}), v = rows({{0, 8}, {0, 8}});
  const at::Tensor target = at::tensor({1, 1}, at::kLong);
  const double s_a = nll({8, 0}, 1), s_v = nll({0, 8}, 1);
  double train_a = 0, train_v = 0;
  const auto [k_a, k_v] = original_step(s_a, s_v, train_a, train_v, 1, 15.0, 1.0);
  REQUIRE(k_a > 65504);
  const auto gradients_in = [](at::ScalarType dtype) {
    std::vector<std::vector<at::Tensor>> params(2);
    for (auto& branch : params) {
      at::Tensor p = at::zeros({2, 3}, dtype).requires_grad_();
      p.mutable_grad() = at::ones({2, 3}, dtype);
      branch.push_back(p);
    }
    return params;
  };
  auto half = for_branches(AGMPolicy(AGMOptions().alpha(15.0).max_gap(1.0)), 2);
  auto params = gradients_in(at::kHalf);
  CHECK_THROWS_WITH(run_agm_hook(half, additive(a, v), target, params),
                    Catch::Contains("AGMPolicy: branch 0 has half-precision gradients") &&
                        Catch::Contains("keep alpha * max_gap <= 11.0896"));
  CHECK(at::equal(params[0][0].grad(), at::ones({2, 3}, at::kHalf)));  // untouched
  CHECK(half.modulated_steps().item<std::int64_t>() == 0);
  CHECK_FALSE(half.last_coefficients().defined());
  // bfloat16 has float's range: the same step is taken, k_a as the original computes it.
  auto wide = for_branches(AGMPolicy(AGMOptions().alpha(15.0).max_gap(1.0)), 2);
  params = gradients_in(at::kBFloat16);
  run_agm_hook(wide, additive(a, v), target, params);
  CHECK(params[0][0].grad().to(at::kDouble).max().item<double>() == Approx(k_a).epsilon(1e-2));
  CHECK(at::isfinite(params[0][0].grad()).all().item<bool>());
  // Half with α·cap within bounds: taken, finite.
  auto bounded = for_branches(AGMPolicy(AGMOptions().alpha(10.0).max_gap(1.0)), 2);
  params = gradients_in(at::kHalf);
  run_agm_hook(bounded, additive(a, v), target, params);
  CHECK(at::isfinite(params[0][0].grad()).all().item<bool>());
  CHECK(params[0][0].grad().to(at::kDouble).max().item<double>() > 1000);
}

TEST_CASE("AGM's masked passes: the masked copies stacked along the rows give the outputs of one "
          "forward per subset, within four units in the last place of float (2, 3 and 5 branches, "
          "in passes of several copies, a short last pass, and one copy a pass)", "[agm]") {
  // Not bit for bit: the CPU's matrix and convolution kernels sum in an order that depends
  // on the row count, which moved single outputs by one unit in the last place of float
  // when measured (7e-9 to 1.5e-8 at 0.13 to 0.17, LibTorch 1.13 and 2.13), and on another
  // CPU (2026-12-07, LibTorch 2.13) by up to 1.3e-8 where the largest output was 0.04, 2.7
  // units of that scale: the tolerance is four units of the output's scale. A wrong mask
  // or row moves outputs by about the scale itself.
  const std::int64_t rows_per_pass = BalancerOptions().masked_rows_per_pass();
  REQUIRE(rows_per_pass == 32);
  const auto same_as_pass_by_pass = [&](auto net, const std::vector<at::Tensor>& x) {
    const std::vector<at::Tensor> one_per_subset = masked_outputs(net, x);
    const std::vector<at::Tensor> stacked = mmbalance::detail::masked_forward(net, rows_per_pass)(x);
    REQUIRE(stacked.size() == one_per_subset.size());
    for (std::size_t s = 1; s + 1 < stacked.size(); ++s) {
      const double scale = one_per_subset[s].abs().max().item<double>();
      const double difference = (stacked[s].to(at::kDouble) - one_per_subset[s]).abs().max().item<double>();
      INFO("subset " << s << ", largest difference " << difference << " of " << scale);
      CHECK(stacked[s].sizes() == one_per_subset[s].sizes());
      CHECK(difference <= 4 * std::numeric_limits<float>::epsilon() * scale);
    }
  };
  const MultiModalBatch b = small_batch(8, 7);
  same_as_pass_by_pass(small_net(3), {b.x0, b.x1});
  same_as_pass_by_pass(small_late_net(3), {b.x0, b.x1});
  same_as_pass_by_pass(small_three_way(4), n_way_batch(3, 8, 21).inputs);  // 6 copies: 4 + 2
  same_as_pass_by_pass(small_three_way(4), n_way_batch(3, 12, 22).inputs);  // 6 copies: 2 + 2 + 2
  // Five gray branches, late fusion: 30 masked copies of 6 rows, 5 a pass; of 80 rows, one.
  using Five = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, ConvBranch, ConvBranch, MMTM>;
  torch::manual_seed(5);
  const auto gray = [] { return ConvBranch(branch_options(1, {4, 8}, {1, 2})); };
  Five five(std::tuple{gray(), gray(), gray(), gray(), gray()}, std::vector<FusionTap<MMTM>>{});
  for (const std::int64_t rows : {6, 80}) {
    std::vector<at::Tensor> x;
    for (int k = 0; k < 5; ++k) x.push_back(at::randn({rows, 1, 8, 8}));
    same_as_pass_by_pass(five, x);
  }
}
