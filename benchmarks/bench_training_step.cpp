// Question: what does balancing add to a training step?
// On the colored-MNIST net (SGD momentum 0.9, lr 0.01, CE(y0) + CE(y1)) at batch 8, 32, 128:
// - vanilla: a plain LibTorch step, no mmbalance machinery besides the model;
// - guided regular: the same step driven by a GuidedBalancer staying in regular mode
//   (meter, policy, per-step checks: what every regular step of guided training costs);
// - guided regular, no checks: the same with check_every_step(false);
// - re-balancing: a step with StepKind::rebalance_m0 (no meter);
// - balancer only: next_step() + observe() on fixed gradients, i.e. what guided adds to a
//   regular step, measured alone (the step ratios above are within the machine's noise).
#include <benchmark/benchmark.h>

#include "bench_common.h"

using namespace mmbalance;
using namespace mmbalance::bench;

namespace {

struct Setup {
  explicit Setup(std::int64_t batch_size)
      : net(colored_mnist_net()),
        optimizer(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9)),
        data(batch(batch_size, 1)) {}
  ConvMMTMNet net;
  torch::optim::SGD optimizer;
  MultiModalBatch data;
};

void BM_StepVanilla(benchmark::State& state) {
  Setup s(state.range(0));
  for (auto _ : state) {
    auto loss = modality_specific_loss(s.net->forward(s.data.x0, s.data.x1), s.data.target);
    s.optimizer.zero_grad();
    loss.backward();
    s.optimizer.step();
  }
}

void guided_steps(benchmark::State& state, bool checks) {
  Setup s(state.range(0));
  // alpha = infinity: every step stays regular, so each one pays for meter and policy.
  GuidedBalancer balancer(s.net, GuidedPolicy(GuidedOptions().alpha(INFINITY)),
                          BalancerOptions().warmup_epochs(0).check_every_step(checks));
  for (auto _ : state) {
    const StepKind kind = balancer.next_step();
    auto loss =
        modality_specific_loss(s.net->forward(s.data.x0, s.data.x1, kind), s.data.target);
    s.optimizer.zero_grad();
    loss.backward();
    balancer.observe(loss);
    s.optimizer.step();
  }
}

void BM_StepGuidedRegular(benchmark::State& state) { guided_steps(state, true); }
void BM_StepGuidedRegularNoChecks(benchmark::State& state) { guided_steps(state, false); }

void BM_StepRebalance(benchmark::State& state) {
  Setup s(state.range(0));
  s.net->forward(s.data.x0, s.data.x1);  // gate averages from one regular step
  for (auto _ : state) {
    auto loss = modality_specific_loss(
        s.net->forward(s.data.x0, s.data.x1, StepKind::rebalance_m0), s.data.target);
    s.optimizer.zero_grad();
    loss.backward();
    s.optimizer.step();
  }
}

void BM_BalancerObserveOnly(benchmark::State& state) {
  Setup s(state.range(0));
  GuidedBalancer balancer(s.net, GuidedPolicy(GuidedOptions().alpha(INFINITY)),
                          BalancerOptions().warmup_epochs(0));
  auto loss = modality_specific_loss(s.net->forward(s.data.x0, s.data.x1), s.data.target);
  loss.backward();
  for (auto _ : state) {
    benchmark::DoNotOptimize(balancer.next_step());
    balancer.observe(loss);
  }
}

}  // namespace

// Interleaved per batch size, so that the ratios compare neighbours in time.
#define MMBALANCE_STEP_BENCH(b)                                                          \
  BENCHMARK(BM_StepVanilla)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0);        \
  BENCHMARK(BM_StepGuidedRegular)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0);  \
  BENCHMARK(BM_StepGuidedRegularNoChecks)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0); \
  BENCHMARK(BM_StepRebalance)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0);        \
  BENCHMARK(BM_BalancerObserveOnly)->Arg(b)->Unit(benchmark::kMillisecond)

MMBALANCE_STEP_BENCH(8);
MMBALANCE_STEP_BENCH(32);
MMBALANCE_STEP_BENCH(128);
