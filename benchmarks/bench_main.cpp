// Shared main: fixes LibTorch's thread count (MMBALANCE_BENCH_THREADS, default 2) so that
// every ratio is taken under the same conditions.
#include <cstdlib>

#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

int main(int argc, char** argv) {
  const char* threads = std::getenv("MMBALANCE_BENCH_THREADS");
  at::set_num_threads(threads ? std::atoi(threads) : 2);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
