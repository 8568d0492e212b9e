// The loss hooks of balancing policies (balancing/loss_weighting.h) as the Balancer forms
// the step's loss: a policy's auxiliary term. (Gradient-Blending's weights:
// test_gradient_blending.cpp.)
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// docs/policies.md's example: every head learns toward the fused prediction, a teacher
// that is detached on purpose (the heads move, y is not pulled toward them).
struct FusedDistillationPolicy : VanillaPolicy {
  double lambda = 0.5;
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor& /*target*/) const {
    const at::Tensor log_teacher = at::log_softmax(out.y, 1).detach();
    at::Tensor kl = at::zeros({}, out.y.options());
    for (const at::Tensor& head : out.heads) {
      kl = kl + (log_teacher.exp() * (log_teacher - at::log_softmax(head, 1))).sum(1).mean();
    }
    return kl * (lambda / static_cast<double>(out.heads.size()));
  }
};

// The public collection's ReconBoost defect: a regulariser built from detached tensors.
struct DetachedTermPolicy : VanillaPolicy {
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor&) const {
    return (out.heads[0].detach() - out.heads[1].detach()).pow(2).mean();
  }
};

// A term of the wrong shape, of an integer type, on another device, none (undefined) at
// all, or in double precision (taken in the loss's own).
struct ShapedTermPolicy : VanillaPolicy {
  int kind = 0;
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor&) const {
    if (kind == 0) return out.heads[0].mean(1);                      // one per row
    if (kind == 1) return at::ones({}, out.y.options().dtype(at::kLong));
    if (kind == 2) return at::ones({}, at::TensorOptions().device(at::kMeta));
    if (kind == 3) return {};
    return out.heads[0].to(at::kDouble).mean().reshape({1}) * 0.25;
  }
};

// Hooks the balancer would not see without `const`: it refuses to compile with them.
struct NonConstTermPolicy : VanillaPolicy {
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor&) { return out.y.mean(); }
};
struct TwoBranchTermPolicy : VanillaPolicy {  // the two-branch output: not the hook's
  at::Tensor auxiliary_loss(const ModelOutput& out, const at::Tensor&) const { return out.y.mean(); }
};
struct TemplatedTermPolicy : VanillaPolicy {  // a template the balancer cannot call as const
  template <class Out>
  at::Tensor auxiliary_loss(const Out& out, const at::Tensor&) { return out.y.mean(); }
};
struct NonConstWeightsPolicy : VanillaPolicy {
  LossWeights loss_weights() { return {{1.0, 1.0}, 0.0}; }
};
// Declared but not callable as the hook: what detail::PolicyHooksCheck refuses
// (tests/compile_fail/misdeclared_hooks.cpp shows the messages).
static_assert(AddsAuxiliaryLoss<FusedDistillationPolicy> && mmbalance::detail::HasMember_auxiliary_loss<FusedDistillationPolicy>);
static_assert(!AddsAuxiliaryLoss<NonConstTermPolicy> && mmbalance::detail::HasMember_auxiliary_loss<NonConstTermPolicy>);
static_assert(!AddsAuxiliaryLoss<TwoBranchTermPolicy> && mmbalance::detail::HasMember_auxiliary_loss<TwoBranchTermPolicy>);
static_assert(!AddsAuxiliaryLoss<TemplatedTermPolicy> && mmbalance::detail::HasMember_auxiliary_loss<TemplatedTermPolicy>);
static_assert(!WeighsLosses<NonConstWeightsPolicy> && mmbalance::detail::HasMember_loss_weights<NonConstWeightsPolicy>);
static_assert(!mmbalance::detail::HasMember_loss_weights<VanillaPolicy> && !mmbalance::detail::HasMember_auxiliary_loss<VanillaPolicy>);

// Weights and a term together: 0.25·CE(y0) + 0.5·CE(y1) + 1·CE(y) + 0.1·mean(y0).
struct WeightsAndTermPolicy : VanillaPolicy {
  LossWeights loss_weights() const { return {{0.25, 0.5}, 1.0}; }
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor&) const { return out.heads[0].mean() * 0.1; }
};

double ce(const at::Tensor& logits, const at::Tensor& target) {
  return at::cross_entropy_loss(logits, target).item<double>();
}

// Hand-computed KL(p_y || softmax(head)) averaged over rows, from the logits.
double kl_to(const at::Tensor& y, const at::Tensor& head) {
  const at::Tensor p = at::softmax(y.detach(), 1);
  return (p * (p.log() - at::log_softmax(head.detach(), 1))).sum(1).mean().item<double>();
}

}  // namespace

TEST_CASE("A policy's auxiliary term is added to the loss after warm-up, and its gradient "
          "reaches the parameters", "[balancer][loss]") {
  Net net = small_net(71);
  const auto b = small_batch(8, 3);
  Balancer<FusedDistillationPolicy> balancer(net, FusedDistillationPolicy{}, BalancerOptions().warmup_epochs(1));

  // Warm-up: the unweighted loss alone.
  {
    const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
    const at::Tensor loss = balancer.loss(out, b.target);
    CHECK(loss.item<double>() == Approx(ce(out.y0, b.target) + ce(out.y1, b.target)).epsilon(1e-6));
    balancer.abandon_step();
    balancer.end_epoch();
  }

  const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
  const at::Tensor loss = balancer.loss(out, b.target);
  const double lambda = 0.5;
  CHECK(loss.item<double>() == Approx(ce(out.y0, b.target) + ce(out.y1, b.target) +
                                      lambda / 2 * (kl_to(out.y, out.y0) + kl_to(out.y, out.y1)))
                                   .epsilon(1e-6));

  // ∂/∂(branch 0's classifier bias), by hand: the bias adds to y0's logits only, so the
  // gradient is the row mean of dCE/dy0 = softmax(y0) − onehot plus λ/N times the row mean
  // of dKL/dy0 = softmax(y0) − softmax(y) (the teacher detached). A detached term (the
  // public ReconBoost's regulariser) would leave the second part out.
  for (auto& p : net->parameters()) p.mutable_grad() = at::Tensor();
  loss.backward();
  const at::Tensor onehot = at::one_hot(b.target, 3).to(at::kFloat);
  const at::Tensor p0 = at::softmax(out.y0.detach(), 1), py = at::softmax(out.y.detach(), 1);
  const at::Tensor ce_part = (p0 - onehot).mean(0);
  const at::Tensor term_part = (p0 - py).mean(0) * (lambda / 2);
  REQUIRE(term_part.abs().max().item<double>() > 1e-4);  // the term's part is not negligible
  const at::Tensor grad = net->branch0->classifier->bias.grad();
  CHECK(at::allclose(grad, ce_part + term_part, 1e-5, 1e-6));
  CHECK_FALSE(at::allclose(grad, ce_part, 1e-5, 1e-6));
  balancer.observe(loss);
}

TEST_CASE("An auxiliary term is scaled with the loss and adds to a policy's loss weights",
          "[balancer][loss]") {
  Net net = small_net(72);
  const auto b = small_batch(8, 4);
  Balancer<WeightsAndTermPolicy> balancer(net, WeightsAndTermPolicy{}, BalancerOptions().warmup_epochs(0));
  const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
  const double expected = 0.25 * ce(out.y0, b.target) + 0.5 * ce(out.y1, b.target) + ce(out.y, b.target) +
                          0.1 * out.y0.mean().item<double>();
  CHECK(balancer.loss(out, b.target).item<double>() == Approx(expected).epsilon(1e-6));
  balancer.abandon_step();
  const ModelOutput again = net->forward(b.x0, b.x1, balancer.next_step());
  CHECK(balancer.loss(again, b.target, 3.0).item<double>() == Approx(3 * expected).epsilon(1e-6));
  balancer.abandon_step();
}

TEST_CASE("An auxiliary term on three branches covers every head", "[balancer][loss][nway]") {
  ThreeWay net = small_three_way(73);
  const Batch b = n_way_batch(3, 8, 5);
  Balancer<FusedDistillationPolicy> balancer(net, FusedDistillationPolicy{}, BalancerOptions().warmup_epochs(0));
  const NetOutput out = net->forward(b.inputs, balancer.next_plan());
  double expected = 0, kl = 0;
  for (const at::Tensor& h : out.heads) {
    expected += ce(h, b.target);
    kl += kl_to(out.y, h);
  }
  expected += 0.5 / 3 * kl;
  CHECK(balancer.loss(out, b.target).item<double>() == Approx(expected).epsilon(1e-6));
  balancer.abandon_step();
}

// (No semicolon in a test's name: CTest's discovery would split it in two.)
TEST_CASE("A detached, misshapen, integer or misplaced auxiliary term is refused by name, an "
          "undefined one adds nothing, a double one is taken in the loss's precision", "[balancer][loss]") {
  Net net = small_net(74);
  const auto b = small_batch(8, 6);
  {
    Balancer<DetachedTermPolicy> balancer(net, DetachedTermPolicy{}, BalancerOptions().warmup_epochs(0));
    const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
    CHECK_THROWS_WITH(balancer.loss(out, b.target), Catch::Contains("auxiliary loss carries no gradient"));
    // Under NoGradGuard nothing carries a gradient: the term is taken as it is.
    torch::NoGradGuard no_grad;
    const ModelOutput plain = net->forward(b.x0, b.x1);
    const double term = (plain.y0 - plain.y1).pow(2).mean().item<double>();
    CHECK(balancer.loss(plain, b.target).item<double>() ==
          Approx(ce(plain.y0, b.target) + ce(plain.y1, b.target) + term).epsilon(1e-6));
    balancer.abandon_step();
  }
  ShapedTermPolicy policy;
  for (int kind : {0, 1, 2, 3, 4}) {
    policy.kind = kind;
    Balancer<ShapedTermPolicy> balancer(net, policy, BalancerOptions().warmup_epochs(0));
    const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
    if (kind == 0) {
      CHECK_THROWS_WITH(balancer.loss(out, b.target), Catch::Contains("must be a floating-point scalar") &&
                                                          Catch::Contains("[8]"));
    } else if (kind == 1) {
      CHECK_THROWS_WITH(balancer.loss(out, b.target), Catch::Contains("must be a floating-point scalar") &&
                                                          Catch::Contains("Long"));
    } else if (kind == 2) {
      CHECK_THROWS_WITH(balancer.loss(out, b.target), Catch::Contains("auxiliary loss is on meta") &&
                                                          Catch::Contains("the step's loss on cpu"));
    } else {
      const double term = kind == 3 ? 0.0 : 0.25 * out.y0.to(at::kDouble).mean().item<double>();
      const at::Tensor loss = balancer.loss(out, b.target);
      CHECK(loss.scalar_type() == at::kFloat);
      CHECK(loss.dim() == 0);
      CHECK(loss.item<double>() == Approx(ce(out.y0, b.target) + ce(out.y1, b.target) + term).epsilon(1e-6));
    }
    balancer.abandon_step();
  }
}

TEST_CASE("observe refuses, from the first step, a loss that a term-adding policy did not form",
          "[balancer][loss]") {
  Net net = small_net(75);
  const auto b = small_batch(8, 7);
  Balancer<FusedDistillationPolicy> balancer(net, FusedDistillationPolicy{}, BalancerOptions().warmup_epochs(1));
  const at::Tensor loss = modality_specific_loss(net->forward(b.x0, b.x1, balancer.next_step()), b.target);
  loss.backward();
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("balancer.loss(out, target)"));
}

TEST_CASE("A policy with an auxiliary term trains through the README's loop", "[balancer][loss]") {
  Net net = small_net(76);
  auto opt = make_sgd(net);
  Balancer<FusedDistillationPolicy> balancer(net, FusedDistillationPolicy{}, BalancerOptions().warmup_epochs(0));
  const auto b = small_batch(16, 8);
  double first = 0, last = 0;
  for (int i = 0; i < 30; ++i) (i == 0 ? first : last) = balanced_step(net, opt, balancer, b).item<double>();
  CHECK(last < first);
  CHECK(balancer.total_step_counts()[0] == 30);
}
