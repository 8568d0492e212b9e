// Question: what does the utilization probe cost compared with a plain evaluation?
// Over the same evaluation data (and a training set of the same size for the squeeze
// averages): one full probe (probe_utilization), its two halves alone
// (record_squeeze_averages over the training set, evaluate_utilization over the
// evaluation set), and one plain evaluation pass.
#include <benchmark/benchmark.h>

#include "bench_common.h"

using namespace mmbalance;
using namespace mmbalance::bench;

namespace {

constexpr std::int64_t kBatches = 8;
constexpr std::int64_t kBatchSize = 128;

std::vector<MultiModalBatch> data(std::uint64_t seed) { return batches(kBatches, kBatchSize, seed); }

ConvMMTMNet& model() {
  static ConvMMTMNet net = [] {
    auto n = colored_mnist_net();
    n->eval();
    return n;
  }();
  return net;
}

void BM_PlainEvaluation(benchmark::State& state) {
  auto& net = model();
  const auto eval = data(100);
  for (auto _ : state) {
    torch::NoGradGuard ng;
    at::Tensor correct = at::zeros({}, at::kLong);
    for (const auto& b : eval) {
      correct.add_(net->forward(b.x0, b.x1).y.argmax(1).eq(b.target).sum());
    }
    benchmark::DoNotOptimize(correct.item<std::int64_t>());
  }
}

void BM_FullProbe(benchmark::State& state) {
  auto& net = model();
  const auto train = data(0), eval = data(100);
  for (auto _ : state) benchmark::DoNotOptimize(probe_utilization(net, train, eval));
}

void BM_RecordSqueezeAverages(benchmark::State& state) {
  auto& net = model();
  const auto train = data(0);
  for (auto _ : state) record_squeeze_averages(net, train);
}

void BM_EvaluateUtilization(benchmark::State& state) {
  auto& net = model();
  const auto train = data(0), eval = data(100);
  record_squeeze_averages(net, train);
  for (auto _ : state) benchmark::DoNotOptimize(evaluate_utilization(net, eval));
}

}  // namespace

BENCHMARK(BM_PlainEvaluation)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_FullProbe)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_RecordSqueezeAverages)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_EvaluateUtilization)->Unit(benchmark::kMillisecond)->MinTime(2.0);
