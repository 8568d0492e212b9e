// Question: what does a policy's epoch-boundary measurement cost next to one evaluation
// pass over the same data? Over a training sample and held-out data of 640 rows each (the
// colored_mnist example's 10 % held out of 6400, and as many training rows), the example
// network (its default width, 32):
// - two plain evaluation passes (forward, accuracy) over both sets;
// - Gradient-Blending's measurement (every head's loss on both sets, `head_losses`);
// - ReLearning's diagnosis (every branch's features on both sets, then per branch and set
//   min-max scaling, k-means with as many clusters as classes, its 10 starts by default
//   or 1, and the purity), through a Balancer's end_epoch at a diagnosing boundary;
// - sample-level valuation's (every row's contributions, `sample_contributions`: the
//   2^2 − 1 subsets of the modalities stacked into passes) over both sets.
#include <benchmark/benchmark.h>

#include "bench_common.h"

using namespace mmbalance;
using namespace mmbalance::bench;

namespace {

constexpr std::int64_t kBatches = 5;
constexpr std::int64_t kBatchSize = 128;

std::vector<MultiModalBatch> data(std::uint64_t seed) { return batches(kBatches, kBatchSize, seed); }

void BM_TwoEvaluationPasses(benchmark::State& state) {
  auto net = colored_mnist_net();
  net->eval();
  const auto train = data(0), held = data(100);
  for (auto _ : state) {
    torch::NoGradGuard no_grad;
    at::Tensor correct = at::zeros({}, at::kLong);
    for (const auto* set : {&train, &held}) {
      for (const auto& b : *set) correct.add_(net->forward(b.x0, b.x1).y.argmax(1).eq(b.target).sum());
    }
    benchmark::DoNotOptimize(correct.item<std::int64_t>());
  }
}

void BM_GradientBlendingMeasurement(benchmark::State& state) {
  auto net = colored_mnist_net();
  const auto train = data(0), held = data(100);
  for (auto _ : state) {
    benchmark::DoNotOptimize(head_losses(net, train));
    benchmark::DoNotOptimize(head_losses(net, held));
  }
}

// A Balancer whose every boundary diagnoses and moves the branches (the moves are
// included: a copy of the branches' parameters, one multiply-add each).
void BM_ReLearningDiagnosis(benchmark::State& state) {
  auto net = colored_mnist_net();
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  const auto options = ReLearningOptions().every(1).times(1 << 30).kmeans_runs(state.range(0));
  Balancer<ReLearningPolicy> balancer(net, ReLearningPolicy(options), BalancerOptions().warmup_epochs(0));
  const auto train = data(0), held = data(100);
  balancer.end_epoch(optimizer);  // 1 epoch done: not a boundary; every later one is
  for (auto _ : state) balancer.end_epoch(net, train, held, optimizer);
}

void BM_SampleValuation(benchmark::State& state) {
  auto net = colored_mnist_net();
  const auto train = data(0), held = data(100);
  for (auto _ : state) {
    at::Tensor sum = at::zeros({2});
    for (const auto* set : {&train, &held}) {
      for (const auto& b : *set) sum.add_(sample_contributions(net, {b.x0, b.x1}, b.target).sum(0));
    }
    benchmark::DoNotOptimize(sum[0].item<double>());
  }
}

}  // namespace

BENCHMARK(BM_TwoEvaluationPasses)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_GradientBlendingMeasurement)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_ReLearningDiagnosis)->Arg(10)->Arg(1)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SampleValuation)->Unit(benchmark::kMillisecond)->MinTime(2.0);
