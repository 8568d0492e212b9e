// The branch a user would write for (batch, channels, time) signals
// (examples/signal_branch.h): its shapes by hand, and a network of two of them trained
// through a guided balancer on a task each modality solves.
#include <catch2/catch.hpp>

#include <cmath>

#include <signal_branch.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

static_assert(Branch<SignalBranch>);

TEST_CASE("SignalBranch: each stage halves the time axis and has the channels it declares; the "
          "head averages over time", "[signal_branch]") {
  torch::manual_seed(0);
  SignalBranch b(SignalBranchOptions(2, 4).channels({8, 16}));
  REQUIRE(b->num_stages() == 2);
  CHECK(b->stage_channels(0) == 8);
  CHECK(b->stage_channels(1) == 16);
  const at::Tensor x = torch::randn({5, 2, 40});
  const at::Tensor s0 = b->forward_stage(0, x), s1 = b->forward_stage(1, s0);
  CHECK(s0.sizes() == at::IntArrayRef({5, 8, 20}));
  CHECK(s1.sizes() == at::IntArrayRef({5, 16, 10}));
  const at::Tensor y = b->head(s1);
  CHECK(y.sizes() == at::IntArrayRef({5, 4}));
  // The head is the classifier of the time average.
  CHECK(at::allclose(y, s1.mean(2).matmul(b->classifier->weight.t()) + b->classifier->bias));
  CHECK_THROWS_WITH(b->forward_stage(0, torch::randn({5, 3, 40})), Catch::Contains("must be (batch, 2, time)"));
  CHECK_THROWS_WITH(SignalBranch(SignalBranchOptions(2, 4).kernel_size(4)), Catch::Contains("odd kernel size"));
}

namespace {

// Class c in {0, 1, 2}: modality 0 is a sine of c + 1 cycles over 64 samples on 2 noisy
// channels; modality 1 is one channel at level c / 2, noisier.
MultiModalBatch signal_batch(std::int64_t n, std::uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  const at::Tensor c = at::randint(3, {n}, gen);
  const at::Tensor t = at::arange(64, at::kFloat).div(64.0).view({1, 1, 64});
  const at::Tensor cycles = (c + 1).to(at::kFloat).view({n, 1, 1});
  const at::Tensor x0 = at::sin(2 * M_PI * cycles * t).expand({n, 2, 64}) + 0.3 * at::randn({n, 2, 64}, gen);
  const at::Tensor x1 = (c.to(at::kFloat) / 2).view({n, 1, 1}).expand({n, 1, 64}) + 0.5 * at::randn({n, 1, 64}, gen);
  return {x0, x1, c};
}

}  // namespace

TEST_CASE("A network of two SignalBranches with MMTM trains through a guided balancer",
          "[signal_branch][balancer]") {
  torch::manual_seed(3);
  using SignalNet = MultiModalNet<SignalBranch, SignalBranch, MMTM>;
  SignalNet net(SignalBranch(SignalBranchOptions(2, 3).channels({8, 16})),
                SignalBranch(SignalBranchOptions(1, 3).channels({8, 16})), {{0, MMTM(8, 8)}, {1, MMTM(16, 16)}});
  torch::optim::Adam opt(net->parameters(), torch::optim::AdamOptions(1e-2));
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), BalancerOptions().warmup_epochs(0));
  const MultiModalBatch held_out = signal_batch(96, 999);
  const auto accuracy = [&] {
    torch::NoGradGuard no_grad;
    net->eval();
    const at::Tensor y = net->forward(held_out.x0, held_out.x1).y;
    net->train();
    return y.argmax(1).eq(held_out.target).to(at::kFloat).mean().item<double>();
  };
  const double before = accuracy();
  std::int64_t rebalancing = 0;
  for (std::uint64_t i = 0; i < 60; ++i) {
    const MultiModalBatch b = signal_batch(32, i);
    const StepKind kind = balancer.next_step();
    const at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
    rebalancing += kind == StepKind::regular ? 0 : 1;
  }
  const double after = accuracy();
  INFO("held-out accuracy " << before << " -> " << after);
  CHECK(after >= 0.9);
  CHECK(after > before + 0.3);
  CHECK(rebalancing > 0);
  CHECK(std::isfinite(balancer.last_d_speed()));
}
