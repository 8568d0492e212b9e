// The hooks other methods of the field need, each exercised by a small policy trained
// through the balancer: features in the output (an auxiliary loss on them), the forward
// side (a plan that modulates a branch's features), per-sample loss weights, and
// re-initialization of a branch at an epoch boundary with its optimizer state reset.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "support.h"

using namespace mmbalance;
using mmbalance::testing::make_sgd;
using mmbalance::testing::small_batch;
using mmbalance::testing::small_late_net;
using mmbalance::testing::small_net;

namespace {

// A penalty on every branch's features: lambda · Σ_k mean(f_k²).
struct FeaturePenalty {
  double lambda = 0.5;
  StepPlan next_plan() { return StepKind::regular; }
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor& /*target*/) const {
    at::Tensor sum = out.features[0].pow(2).mean();
    for (std::size_t k = 1; k < out.features.size(); ++k) sum = sum + out.features[k].pow(2).mean();
    return sum * lambda;
  }
};

// Drops branch 0's features with probability 1 - keep and scales the kept ones.
struct DropBranch0 {
  double keep = 0.5, scale = 2.0;
  std::int64_t plans = 0;
  StepPlan next_plan() {
    ++plans;
    return StepPlan::regular().modulating(0, keep, scale);
  }
};

// Weighs class-0 rows three times the others.
struct UpweighClass0 {
  StepPlan next_plan() { return StepKind::regular; }
  at::Tensor sample_weights(const NetOutput& /*out*/, const at::Tensor& target) const {
    return target.eq(0).to(at::kFloat) * 2.0 + 1.0;
  }
};

// Moves branch 1 halfway back to its initial parameters at every epoch boundary.
struct ReinitBranch1 {
  std::vector<double> strengths{0.0, 0.5};
  std::vector<std::int64_t> asked;
  StepPlan next_plan() { return StepKind::regular; }
  std::vector<double> reinitialization(std::int64_t epochs) {
    asked.push_back(epochs);
    return strengths;
  }
};

// Measures every head's losses at each boundary after the first, and moves branch 1 a
// quarter of the way back only at a boundary whose losses it has just taken.
struct MeasuresThenReinitializes {
  std::vector<std::int64_t> measured;
  StepPlan next_plan() { return StepKind::regular; }
  bool wants_epoch_losses(std::int64_t epochs) const { return epochs >= 1; }
  void observe_epoch_losses(const EpochLosses& losses) { measured.push_back(losses.epochs); }
  std::vector<double> reinitialization(std::int64_t epochs) {
    return {0.0, !measured.empty() && measured.back() == epochs ? 0.25 : 0.0};
  }
};

// One step of `balancer` on `b`, the loss formed by the balancer.
template <class BalancerT, class NetT, class Optimizer>
at::Tensor train_step(BalancerT& balancer, NetT& net, Optimizer& opt, const MultiModalBatch& b) {
  const StepPlan plan = balancer.next_plan();
  const at::Tensor loss = balancer.loss(net->forward({b.x0, b.x1}, plan), b.target);
  opt.zero_grad();
  loss.backward();
  balancer.observe(loss);
  opt.step();
  return loss;
}

// CE of each row by hand (log-softmax at the target), as doubles.
std::vector<double> row_losses(const at::Tensor& logits, const at::Tensor& target) {
  const at::Tensor l = logits.detach().to(at::kDouble);
  std::vector<double> out;
  for (std::int64_t i = 0; i < l.size(0); ++i) {
    const double m = l[i].max().item<double>();
    double sum = 0;
    for (std::int64_t c = 0; c < l.size(1); ++c) sum += std::exp(l[i][c].item<double>() - m);
    out.push_back(-(l[i][target[i].item<std::int64_t>()].item<double>() - m - std::log(sum)));
  }
  return out;
}

}  // namespace

TEST_CASE("Features in the output: each branch's last stage, which its head reads; a policy's "
          "term on them trains through the balancer", "[hooks][features]") {
  testing::Net net = small_late_net(11);
  const auto b = small_batch(8, 12);
  const NetOutput out = net->forward({b.x0, b.x1});
  // By hand: the branch's stages one by one.
  const at::Tensor f0 = net->branch0->forward_stage(1, net->branch0->forward_stage(0, b.x0));
  CHECK(torch::allclose(out.features[0], f0));
  CHECK(torch::allclose(out.heads[0], net->branch0->head(out.features[0])));

  Balancer<FeaturePenalty> balancer(net, FeaturePenalty{}, BalancerOptions().warmup_epochs(0));
  const StepPlan plan = balancer.next_plan();
  const NetOutput step = net->forward({b.x0, b.x1}, plan);
  const at::Tensor loss = balancer.loss(step, b.target);
  double expected = 0;
  for (std::size_t k = 0; k < 2; ++k) {
    for (const double l : row_losses(step.heads[k], b.target)) expected += l / 8.0;
    expected += 0.5 * step.features[k].detach().to(at::kDouble).pow(2).mean().item<double>();
  }
  CHECK(loss.item<double>() == Approx(expected).epsilon(1e-5));
  balancer.abandon_step();

  // Trained, the penalty shrinks the features below a vanilla twin's.
  testing::Net twin = small_late_net(11);
  Balancer<VanillaPolicy> vanilla(twin, VanillaPolicy(), BalancerOptions().warmup_epochs(0));
  auto opt = make_sgd(net);
  auto twin_opt = make_sgd(twin);
  for (int i = 0; i < 15; ++i) {
    train_step(balancer, net, opt, b);
    train_step(vanilla, twin, twin_opt, b);
  }
  const auto feature_mean = [&](testing::Net& n) {
    torch::NoGradGuard no_grad;
    return n->forward({b.x0, b.x1}).features[0].pow(2).mean().item<double>();
  };
  CHECK(feature_mean(net) < 0.5 * feature_mean(twin));
}

TEST_CASE("Forward side: a plan modulates one branch's features per sample, kept with its "
          "probability and scaled, or dropped", "[hooks][forward]") {
  testing::Net net = small_net(13);
  net->eval();
  const auto b = small_batch(64, 14);
  const NetOutput plain = net->forward({b.x0, b.x1});
  // Kept always: the features scaled, the head reading them, the other branch as it was
  // (late fusion of the heads: this network's fusion modules come before the last stage).
  const NetOutput scaled = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 1.0, 3.0));
  CHECK(torch::allclose(scaled.features[0], plain.features[0] * 3.0));
  CHECK(torch::allclose(scaled.heads[0], net->branch0->head(plain.features[0] * 3.0)));
  CHECK(torch::equal(scaled.heads[1], plain.heads[1]));
  // Dropped: the fusion modules read the branch as zero too, so the other branch changes.
  const NetOutput none = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.0));
  CHECK(none.features[0].abs().max().item<double>() == 0.0);
  CHECK_FALSE(torch::allclose(none.heads[1], plain.heads[1]));
  // Kept with probability 0.5, scaled by 2: every row is either 2·f or 0.
  torch::manual_seed(15);
  const NetOutput dropped = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.5, 2.0));
  std::int64_t kept = 0;
  for (std::int64_t i = 0; i < 64; ++i) {
    const at::Tensor row = dropped.features[0][i];
    if (torch::allclose(row, plain.features[0][i] * 2.0)) {
      ++kept;
    } else {
      CHECK(row.abs().max().item<double>() == 0.0);
    }
  }
  CHECK(kept > 16);  // Binomial(64, 0.5): outside [17, 47] with probability < 1e-4
  CHECK(kept < 48);
  torch::manual_seed(15);  // the draws come from LibTorch's generator
  CHECK(torch::equal(net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.5, 2.0)).features[0],
                     dropped.features[0]));
  CHECK_THROWS_WITH(net->forward({b.x0, b.x1}, StepPlan::regular().modulating(2, 0.5)),
                    Catch::Contains("the step modulates branch 2's features") && Catch::Contains("the network has 2 branches (0..1)"));
  CHECK_THROWS_WITH(net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 1.5)),
                    Catch::Contains("probability 1.5"));

  // A regular step that drops samples stages no gates (they were not computed from the
  // branch as it is); one that only scales does.
  net->train();
  const auto staged = [&] { return net->gate_means()[0]->staged()[-1].item<double>(); };
  for (auto& m : net->gate_means()) m->drop();
  net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.5));
  CHECK(staged() == 0.0);
  net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 1.0, 2.0));
  CHECK(staged() == 64.0);
  for (auto& m : net->gate_means()) m->drop();

  // Through the balancer: the policy's plan reaches the forward pass; it trains.
  Balancer<DropBranch0> balancer(net, DropBranch0{}, BalancerOptions().warmup_epochs(0));
  auto opt = make_sgd(net);
  for (int i = 0; i < 4; ++i) {
    const StepPlan plan = balancer.next_plan();
    CHECK(plan.modulated_branch() == std::optional<std::size_t>(0));
    CHECK(plan.is_regular());
    const at::Tensor loss = modality_specific_loss(net->forward({b.x0, b.x1}, plan), b.target);
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
  }
  CHECK(balancer.total_plan_counts()[0] == 4);  // counted as regular steps
  // next_step() cannot carry the modulation: refused, the step not started.
  CHECK_THROWS_WITH(balancer.next_step(), Catch::Contains("modulates branch 0's features, which a StepKind cannot carry"));
  CHECK(balancer.policy().plans == 4);
  CHECK_NOTHROW(balancer.next_plan());
  balancer.abandon_step();
  // A plan the network cannot run is refused by name, the policy as it was.
  Balancer<DropBranch0> bad(net, DropBranch0{0.5, std::nan("")}, BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(bad.next_plan(), Catch::Contains("modulates branch 0's features") &&
                                         Catch::Contains("finite scale"));
  CHECK(bad.policy().plans == 0);
}

TEST_CASE("Per-sample loss weights: every cross-entropy a weighted mean over the rows, after "
          "warm-up", "[hooks][sample-weights]") {
  testing::Net net = small_net(16);
  const auto b = small_batch(12, 17);
  Balancer<UpweighClass0> balancer(net, UpweighClass0{}, BalancerOptions().warmup_epochs(1));
  auto opt = make_sgd(net);
  const auto expected_loss = [&](const NetOutput& out, bool weighted) {
    double total = 0;
    for (std::size_t k = 0; k < 2; ++k) {
      const std::vector<double> l = row_losses(out.heads[k], b.target);
      for (std::int64_t i = 0; i < 12; ++i) {
        const double w = weighted && b.target[i].item<std::int64_t>() == 0 ? 3.0 : 1.0;
        total += w * l[static_cast<std::size_t>(i)] / 12.0;
      }
    }
    return total;
  };
  REQUIRE(b.target.eq(0).sum().item<std::int64_t>() > 0);
  for (const bool weighted : {false, true}) {  // warm-up, then weighted
    const StepPlan plan = balancer.next_plan();
    const NetOutput out = net->forward({b.x0, b.x1}, plan);
    const at::Tensor loss = balancer.loss(out, b.target);
    CHECK(loss.item<double>() == Approx(expected_loss(out, weighted)).epsilon(1e-5));
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
    balancer.end_epoch();
  }

  struct Negative {
    StepPlan next_plan() { return StepKind::regular; }
    at::Tensor sample_weights(const NetOutput&, const at::Tensor& t) const { return -at::ones({t.size(0)}); }
  };
  struct Short {
    StepPlan next_plan() { return StepKind::regular; }
    at::Tensor sample_weights(const NetOutput&, const at::Tensor&) const { return at::ones({3}); }
  };
  Balancer<Negative> negative(net, Negative{}, BalancerOptions().warmup_epochs(0));
  negative.next_plan();
  CHECK_THROWS_WITH(negative.loss(net->forward({b.x0, b.x1}), b.target), Catch::Contains("finite and >= 0"));
  Balancer<Short> short_weights(net, Short{}, BalancerOptions().warmup_epochs(0));
  short_weights.next_plan();
  CHECK_THROWS_WITH(short_weights.loss(net->forward({b.x0, b.x1}), b.target),
                    Catch::Contains("one floating-point number per row of the batch (12)"));
}

TEST_CASE("Re-initialization at an epoch boundary: a branch moved toward its initial parameters, "
          "its optimizer state reset, and resumed from a checkpoint", "[hooks][reinitialization]") {
  testing::Net net = small_net(18);
  const auto b = small_batch(8, 19);
  const std::vector<at::Tensor> initial0 = testing::clones(net->branch0->parameters());
  const std::vector<at::Tensor> initial1 = testing::clones(net->branch1->parameters());
  Balancer<ReinitBranch1> balancer(net, ReinitBranch1{}, BalancerOptions().warmup_epochs(0));
  auto opt = make_sgd(net);
  for (int i = 0; i < 3; ++i) train_step(balancer, net, opt, b);
  CHECK_THROWS_WITH(balancer.end_epoch(), Catch::Contains("call end_epoch(optimizer)"));
  CHECK_THROWS_WITH(balancer.end_epoch(net, std::vector<MultiModalBatch>{b}, std::vector<MultiModalBatch>{b}),
                    Catch::Contains("call end_epoch(optimizer)"));
  CHECK(balancer.epoch() == 0);
  const std::vector<at::Tensor> trained0 = testing::clones(net->branch0->parameters());
  const std::vector<at::Tensor> trained1 = testing::clones(net->branch1->parameters());
  const std::size_t states = opt.state().size();
  REQUIRE(states == net->parameters().size());  // SGD with momentum: one buffer each

  balancer.end_epoch(opt);
  CHECK(balancer.epoch() == 1);
  CHECK(balancer.policy().asked == std::vector<std::int64_t>{1});
  const auto p0 = net->branch0->parameters(), p1 = net->branch1->parameters();
  for (std::size_t i = 0; i < p0.size(); ++i) CHECK(torch::equal(p0[i], trained0[i]));
  for (std::size_t i = 0; i < p1.size(); ++i) {
    CHECK(torch::allclose(p1[i], trained1[i] * 0.5 + initial1[i] * 0.5, 1e-6, 1e-7));
  }
  CHECK(opt.state().size() == states - p1.size());  // branch 1's momentum dropped, the rest kept
  for (int i = 0; i < 2; ++i) train_step(balancer, net, opt, b);
  CHECK(opt.state().size() == states);  // rebuilt by the next step

  // Resumed in a network that starts elsewhere: the initial parameters are the run's.
  const auto dir = testing::fresh_test_dir("hooks", "reinit");
  const std::string path = (dir / "run.ckpt").string();
  save_checkpoint(path, net, opt, balancer);
  testing::Net resumed = small_net(99);
  auto resumed_opt = make_sgd(resumed);
  Balancer<ReinitBranch1> resumed_balancer(resumed, ReinitBranch1{}, BalancerOptions().warmup_epochs(0));
  load_checkpoint(path, resumed, resumed_opt, resumed_balancer);
  const std::vector<at::Tensor> before = testing::clones(resumed->branch1->parameters());
  resumed_balancer.end_epoch(resumed_opt);
  const auto r1 = resumed->branch1->parameters();
  for (std::size_t i = 0; i < r1.size(); ++i) {
    CHECK(torch::allclose(r1[i], before[i] * 0.5 + initial1[i] * 0.5, 1e-6, 1e-7));
  }
  std::filesystem::remove_all(dir);

  // Strengths that are not one per branch in [0, 1]: refused by name, nothing changed.
  Balancer<ReinitBranch1> bad(net, ReinitBranch1{{0.0, 1.5}, {}}, BalancerOptions().warmup_epochs(0));
  const std::vector<at::Tensor> kept = testing::clones(net->parameters());
  CHECK_THROWS_WITH(bad.end_epoch(opt), Catch::Contains("re-initializes branch 1 with strength 1.5"));
  CHECK(bad.epoch() == 0);
  CHECK(bad.policy().asked.empty());  // the policy as it was
  const auto now = net->parameters();
  for (std::size_t i = 0; i < now.size(); ++i) CHECK(torch::equal(now[i], kept[i]));
}

TEST_CASE("A policy that measures and re-initializes takes the measurement first, at one boundary",
          "[hooks][reinitialization]") {
  testing::Net net = small_net(21);
  const auto b = small_batch(8, 22);
  const std::vector<MultiModalBatch> data{b};
  const std::vector<at::Tensor> initial1 = testing::clones(net->branch1->parameters());
  Balancer<MeasuresThenReinitializes> balancer(net, MeasuresThenReinitializes{}, BalancerOptions().warmup_epochs(0));
  auto opt = make_sgd(net);
  train_step(balancer, net, opt, b);
  // Each form short of data and optimizer is refused, naming the one to call.
  CHECK_THROWS_WITH(balancer.end_epoch(opt), Catch::Contains("measures every head's loss at the end of this epoch: "
                                                             "call end_epoch(net, train_sample, held_out, optimizer)"));
  CHECK_THROWS_WITH(balancer.end_epoch(net, data, data),
                    Catch::Contains("may re-initialize branches at this boundary, which resets their optimizer state: "
                                    "call end_epoch(net, train_sample, held_out, optimizer)"));
  CHECK(balancer.epoch() == 0);
  CHECK(balancer.policy().measured.empty());
  const std::vector<at::Tensor> trained1 = testing::clones(net->branch1->parameters());
  balancer.end_epoch(net, data, data, opt);
  CHECK(balancer.epoch() == 1);
  CHECK(balancer.policy().measured == std::vector<std::int64_t>{1});
  const auto p1 = net->branch1->parameters();
  for (std::size_t i = 0; i < p1.size(); ++i) {
    CHECK(torch::allclose(p1[i], trained1[i] * 0.75 + initial1[i] * 0.25, 1e-6, 1e-7));
  }
}
