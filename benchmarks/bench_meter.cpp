// Question: what does measuring the conditional learning speed cost?
// The LearningSpeedMeter's observe step (measure + accumulate) against (a) the official
// code's naive per-parameter loop with host reads and (b) the physical floor, one sum of
// squares over a contiguous buffer holding as many elements as all parameters and all
// gradients. Plus the meter's scaling with model width and with the number of branches
// (N = 2, 3, 4: one pass over all parameters whatever N, 2N masked group sums).
#include <benchmark/benchmark.h>

#include "bench_common.h"

using namespace mmbalance;
using namespace mmbalance::bench;

namespace {

ParameterGroups small_groups() {
  static auto net = colored_mnist_net();
  static bool ready = false;
  if (!ready) {
    auto b = batch(32);
    modality_specific_loss(net->forward(b.x0, b.x1), b.target).backward();
    ready = true;
  }
  return net->parameter_groups();
}

const ParameterGroups& groups_for(std::int64_t model) {
  static const ParameterGroups small = small_groups();
  static const ParameterGroups large = resnet18_pair_groups();
  return model == 0 ? small : large;
}

void label(benchmark::State& state, const ParameterGroups& g) {
  const auto params = distinct(g);
  state.counters["tensors"] = static_cast<double>(params.size());
  state.counters["parameters"] = static_cast<double>(numel(params));
  state.SetLabel(state.range(0) == 0 ? "colored-mnist net" : "resnet18 pair");
}

void BM_MeterObserve(benchmark::State& state) {
  const auto& g = groups_for(state.range(0));
  LearningSpeedMeter meter(g);
  for (auto _ : state) {
    meter.accumulate(LearningSpeedMeter::mu(meter.measure()));
  }
  benchmark::DoNotOptimize(meter.accumulated().data_ptr());
  label(state, g);
}

void BM_NaivePerParameter(benchmark::State& state) {
  const auto& g = groups_for(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(naive_speeds(g));
  label(state, g);
}

void BM_FloorNorm(benchmark::State& state) {
  const auto& g = groups_for(state.range(0));
  const auto params = distinct(g);
  const at::Tensor buffer = at::randn({2 * numel(params)});
  for (auto _ : state) {
    // One sum of squares in a single pass (norm's square root is free); square().sum()
    // would write and re-read a temporary and so is no floor.
    auto s = at::norm(buffer);
    benchmark::DoNotOptimize(s.data_ptr());
  }
  label(state, g);
}

// Scaling: the colored-MNIST net at width 1, 2, 4, 8 (parameters grow ~ width²).
void BM_MeterScaling(benchmark::State& state) {
  auto net = colored_mnist_net(state.range(0));
  auto b = batch(4);
  modality_specific_loss(net->forward(b.x0, b.x1), b.target).backward();
  LearningSpeedMeter meter(net->parameter_groups());
  for (auto _ : state) meter.accumulate(LearningSpeedMeter::mu(meter.measure()));
  const auto n = numel(net->parameters());
  state.SetComplexityN(n);
  state.counters["parameters"] = static_cast<double>(n);
  state.SetBytesProcessed(state.iterations() * 2 * n * 4);
}

// N branches of the colored-MNIST net (N-way MMTMs): the meter's cost per parameter
// should not grow with N (one fused pass; the 2N group sums are a masked reduction).
template <std::size_t N>
void BM_MeterBranches(benchmark::State& state) {
  auto net = colored_mnist_n_way_net<N>();
  const auto b = batch(4);
  std::vector<at::Tensor> inputs{b.x0};
  for (std::size_t k = 1; k < N; ++k) inputs.push_back(b.x1);
  modality_specific_loss(net->forward(inputs), b.target).backward();
  LearningSpeedMeter meter(net->parameter_groups());
  for (auto _ : state) meter.accumulate(LearningSpeedMeter::mu(meter.measure()));
  benchmark::DoNotOptimize(meter.accumulated().data_ptr());
  const auto n = numel(net->parameters());
  state.counters["branches"] = static_cast<double>(N);
  state.counters["parameters"] = static_cast<double>(n);
  state.SetBytesProcessed(state.iterations() * 2 * n * 4);
}

}  // namespace

BENCHMARK(BM_MeterBranches<2>)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MeterBranches<3>)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MeterBranches<4>)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MeterObserve)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_NaivePerParameter)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FloorNorm)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MeterScaling)
    ->Arg(1)->Arg(2)->Arg(4)->Arg(8)
    ->Complexity(benchmark::oN)
    ->Unit(benchmark::kMicrosecond);
