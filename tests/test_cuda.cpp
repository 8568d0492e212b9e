#include <catch2/catch.hpp>

#include <torch/cuda.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

// Each test returns early where no CUDA device is present (this machine, CI).

TEST_CASE("CUDA: guided training matches CPU and keeps state on the device", "[cuda]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  auto cpu = small_net(41);
  auto gpu = cpu.clone(cuda);
  auto opt_cpu = make_sgd(cpu);
  auto opt_gpu = make_sgd(gpu);
  GuidedBalancer bal_cpu(cpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                         BalancerOptions().warmup_epochs(0));
  GuidedBalancer bal_gpu(gpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                         BalancerOptions().warmup_epochs(0));
  for (int i = 0; i < 6; ++i) {
    auto b = small_batch(8, static_cast<std::uint64_t>(i));
    for (int side = 0; side < 2; ++side) {
      auto& net = side == 0 ? cpu : gpu;
      auto& opt = side == 0 ? opt_cpu : opt_gpu;
      auto& bal = side == 0 ? bal_cpu : bal_gpu;
      const auto dev = side == 0 ? at::Device(at::kCPU) : cuda;
      const StepKind kind = bal.next_step();
      auto loss = modality_specific_loss(net->forward(b.x0.to(dev), b.x1.to(dev), kind),
                                         b.target.to(dev));
      opt.zero_grad();
      loss.backward();
      bal.observe(loss);
      opt.step();
    }
  }
  CHECK(bal_gpu.meter().accumulated().device() == cuda);
  CHECK(gpu->taps[0].module->gate_mean->mean.device() == cuda);
  CHECK(bal_cpu.total_step_counts() == bal_gpu.total_step_counts());
  CHECK(torch::allclose(bal_cpu.meter().accumulated(), bal_gpu.meter().accumulated().cpu(), 1e-3));
  for (const auto& p : gpu->named_parameters()) {
    CHECK(torch::allclose(p.value().cpu(), cpu->named_parameters()[p.key()], 1e-3, 1e-4));
  }
  // The probe runs on the model's device with CPU batches.
  std::vector<MultiModalBatch> data{small_batch(8, 50), small_batch(8, 51)};
  auto r_cpu = probe_utilization(cpu, data, data);
  auto r_gpu = probe_utilization(gpu, data, data);
  CHECK(r_gpu.samples == r_cpu.samples);
  CHECK(std::abs(r_gpu.accuracy - r_cpu.accuracy) <= 1.0 / 16);
}

TEST_CASE("CUDA: the meter equals the CPU meter", "[cuda]") {
  if (!torch::cuda::is_available()) return;
  auto cpu = small_net(42);
  auto gpu = cpu.clone(at::Device(at::kCUDA, 0));
  auto b = small_batch(8, 1);
  for (auto* net : {&cpu, &gpu}) {
    const auto dev = (*net)->parameters()[0].device();
    (*net)->eval();
    modality_specific_loss((*net)->forward(b.x0.to(dev), b.x1.to(dev)), b.target.to(dev))
        .backward();
  }
  LearningSpeedMeter m_cpu(cpu->parameter_groups()), m_gpu(gpu->parameter_groups());
  CHECK(torch::allclose(m_cpu.measure(), m_gpu.measure().cpu(), 1e-4));
}
