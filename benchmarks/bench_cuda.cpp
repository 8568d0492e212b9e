// Question: what does balancing cost on a GPU, and how many device-to-host syncs does a
// step make? Registered only when CUDA is available; timing is manual, around
// torch::cuda::synchronize(), so each iteration measures finished GPU work. CUDA_StepsPaired
// times vanilla and guided steps taking turns, step by step, as BM_StepsPaired on the CPU.
#include <array>
#include <chrono>
#include <functional>
#include <string>

#include <benchmark/benchmark.h>
#include <torch/cuda.h>

#ifdef MMBALANCE_BENCH_SYNC_COUNT
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "bench_common.h"

using namespace mmbalance;
using namespace mmbalance::bench;

namespace {

const at::Device kCuda(at::kCUDA, 0);

// Times `body` per iteration with the GPU drained before and after.
void timed(benchmark::State& state, const std::function<void()>& body) {
  for (int i = 0; i < 3; ++i) body();  // warm-up: allocator, cuDNN autotuning
  torch::cuda::synchronize();
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    body();
    torch::cuda::synchronize();
    state.SetIterationTime(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
}

#ifdef MMBALANCE_BENCH_SYNC_COUNT
// Counts LibTorch's "called a synchronizing CUDA operation" warnings, which it issues for
// every device-to-host sync while the sync debug mode is L_WARN.
struct SyncCounter : c10::WarningHandler {
  int count = 0;
  void process(const c10::Warning& w) override {
    if (w.msg().find("synchroniz") != std::string::npos) ++count;
  }
};

template <class F>
int count_syncs(F&& body) {
  SyncCounter counter;
  c10::WarningHandler* previous = c10::WarningUtils::get_warning_handler();
  c10::WarningUtils::set_warning_handler(&counter);
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
  body();
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  c10::WarningUtils::set_warning_handler(previous);
  return counter.count;
}
#endif

void meter_cuda(benchmark::State& state) {
  auto g = resnet18_pair_groups(kCuda);
  LearningSpeedMeter meter(g);
  timed(state, [&] { meter.accumulate(LearningSpeedMeter::mu(meter.measure())); });
}

void naive_cuda(benchmark::State& state) {
  auto g = resnet18_pair_groups(kCuda);
  timed(state, [&] { benchmark::DoNotOptimize(naive_speeds(g)); });
}

void floor_cuda(benchmark::State& state) {
  auto g = resnet18_pair_groups(kCuda);
  const at::Tensor buffer = at::randn({2 * numel(distinct(g))}, kCuda);
  timed(state, [&] { benchmark::DoNotOptimize(at::norm(buffer).data_ptr()); });
}

template <class Policy>
void step_cuda(benchmark::State& state, Policy policy, bool checks, StepKind fixed_kind,
               bool plain, SpeedRead read = SpeedRead::same_step) {
  auto net = colored_mnist_net();
  net->to(kCuda);
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  auto data = batch(state.range(0), 1, kCuda);
  Balancer<Policy> balancer(
      net, policy, BalancerOptions().warmup_epochs(0).check_every_step(checks).speed_read(read));
  net->forward(data.x0, data.x1);  // gate averages for re-balancing steps
  auto step = [&] {
    if (plain) {
      auto loss = modality_specific_loss(net->forward(data.x0, data.x1, fixed_kind), data.target);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      return;
    }
    const StepKind kind = balancer.next_step();
    auto loss = balancer.loss(net->forward(data.x0, data.x1, kind), data.target);
    optimizer.zero_grad();
    loss.backward();
    balancer.observe(loss);
    optimizer.step();
  };
  timed(state, step);
#ifdef MMBALANCE_BENCH_SYNC_COUNT
  const int steps = 20;
  state.counters["syncs_per_step"] =
      static_cast<double>(count_syncs([&] { for (int i = 0; i < steps; ++i) step(); })) / steps;
#endif
}

const GuidedPolicy kAlwaysRegular(GuidedOptions().alpha(INFINITY));

// Vanilla, guided (regular steps, d_speed read in the same step) and guided reading it one
// step late (SpeedRead::previous_step: no host sync) on three copies of the network, step
// by step in rotating order, each step timed alone from a drained GPU to a drained GPU (as
// BM_StepsPaired on the CPU): the ratios are paired, so the card's clock and whatever else
// runs on it hit all three alike.
void steps_paired_cuda(benchmark::State& state) {
  struct Copy {
    ConvMMTMNet net = colored_mnist_net();
    torch::optim::SGD optimizer;
    Copy() : optimizer((net->to(kCuda), net->parameters()), torch::optim::SGDOptions(0.01).momentum(0.9)) {}
  };
  const auto data = batch(state.range(0), 1, kCuda);
  Copy vanilla, guided, lagged;
  Balancer<GuidedPolicy> same_step(guided.net, kAlwaysRegular, BalancerOptions().warmup_epochs(0).check_every_step(false));
  Balancer<GuidedPolicy> late(lagged.net, kAlwaysRegular,
                              BalancerOptions().warmup_epochs(0).check_every_step(false).speed_read(SpeedRead::previous_step));
  const auto plain_step = [&](Copy& c) {
    auto loss = modality_specific_loss(c.net->forward(data.x0, data.x1), data.target);
    c.optimizer.zero_grad();
    loss.backward();
    c.optimizer.step();
  };
  const auto balanced_step = [&](Copy& c, Balancer<GuidedPolicy>& balancer) {
    const StepKind kind = balancer.next_step();
    auto loss = balancer.loss(c.net->forward(data.x0, data.x1, kind), data.target);
    c.optimizer.zero_grad();
    loss.backward();
    balancer.observe(loss);
    c.optimizer.step();
  };
  const std::array<std::function<void()>, 3> steps{
      [&] { plain_step(vanilla); }, [&] { balanced_step(guided, same_step); }, [&] { balanced_step(lagged, late); }};
  for (int i = 0; i < 3; ++i) {  // warm-up: allocator, cuDNN autotuning
    for (const auto& step : steps) step();
  }
  const std::array<double, 3> seconds = time_in_turns(state, steps, [] { torch::cuda::synchronize(); });
  const double iterations = static_cast<double>(state.iterations());
  state.counters["vanilla_ms"] = seconds[0] / iterations * 1e3;
  state.counters["guided_over_vanilla"] = seconds[1] / seconds[0];
  state.counters["guided_lagged_over_vanilla"] = seconds[2] / seconds[0];
}

struct Register {
  Register() {
    if (!torch::cuda::is_available()) return;
    auto ms = [](benchmark::internal::Benchmark* b) {
      b->UseManualTime()->Unit(benchmark::kMicrosecond);
    };
    ms(benchmark::RegisterBenchmark("CUDA_MeterObserve/resnet18_pair", meter_cuda));
    ms(benchmark::RegisterBenchmark("CUDA_NaivePerParameter/resnet18_pair", naive_cuda));
    ms(benchmark::RegisterBenchmark("CUDA_FloorNorm/resnet18_pair", floor_cuda));
    for (std::int64_t b : {8, 128}) {
      // Wall time (the CPU waits on the GPU), 2 s a repetition: device-check's time is short.
      benchmark::RegisterBenchmark("CUDA_StepsPaired", steps_paired_cuda)
          ->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();
    }
    for (std::int64_t b : {8, 32, 128}) {
      ms(benchmark::RegisterBenchmark("CUDA_StepVanilla", [](benchmark::State& s) {
           step_cuda(s, VanillaPolicy(), false, StepKind::regular, true);
         })->Arg(b));
      ms(benchmark::RegisterBenchmark("CUDA_StepVanillaBalancerNoChecks", [](benchmark::State& s) {
           step_cuda(s, VanillaPolicy(), false, StepKind::regular, false);
         })->Arg(b));
      ms(benchmark::RegisterBenchmark("CUDA_StepGuidedRegular", [](benchmark::State& s) {
           step_cuda(s, kAlwaysRegular, true, StepKind::regular, false);
         })->Arg(b));
      ms(benchmark::RegisterBenchmark("CUDA_StepGuidedRegularNoChecks", [](benchmark::State& s) {
           step_cuda(s, kAlwaysRegular, false, StepKind::regular, false);
         })->Arg(b));
      // Zero device-to-host syncs expected: d_speed reaches the policy one step late.
      ms(benchmark::RegisterBenchmark("CUDA_StepGuidedRegularLagged", [](benchmark::State& s) {
           step_cuda(s, kAlwaysRegular, false, StepKind::regular, false, SpeedRead::previous_step);
         })->Arg(b));
      // OGM-GE: scores, coefficients and noise on the device (the noise drawn on the CPU).
      ms(benchmark::RegisterBenchmark("CUDA_StepOGMGE", [](benchmark::State& s) {
           step_cuda(s, OGMGEPolicy(OGMGEOptions().alpha(0.5)), false, StepKind::regular, false);
         })->Arg(b));
      ms(benchmark::RegisterBenchmark("CUDA_StepOGM", [](benchmark::State& s) {
           step_cuda(s, OGMGEPolicy(OGMGEOptions().alpha(0.5).noise(false)), false,
                     StepKind::regular, false);
         })->Arg(b));
      ms(benchmark::RegisterBenchmark("CUDA_StepRebalance", [](benchmark::State& s) {
           step_cuda(s, VanillaPolicy(), false, StepKind::rebalance_m0, true);
         })->Arg(b));
    }
  }
} register_cuda_benchmarks;

}  // namespace
