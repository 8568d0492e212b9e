#include <catch2/catch.hpp>

#include <filesystem>
#include <string>

#include <unistd.h>

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

namespace {

// Every parameter and buffer of `net` on `device`, and every optimizer state tensor too.
template <class NetT>
bool all_on(const NetT& net, const torch::optim::Optimizer& optimizer, const at::Device& device) {
  for (const auto& t : net->parameters()) if (t.device() != device) return false;
  for (const auto& t : net->buffers()) if (t.device() != device) return false;
  for (const auto& entry : optimizer.state()) {
    const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(entry.second.get());
    if (sgd != nullptr && sgd->momentum_buffer().defined() &&
        sgd->momentum_buffer().device() != device) {
      return false;
    }
  }
  return true;
}

// Steps [first, last) of a run on `device`, the loss formed by the balancer.
template <class NetT, class BalancerT>
void train_on(NetT& net, torch::optim::Optimizer& opt, BalancerT& bal, const at::Device& device,
              int first, int last) {
  for (int i = first; i < last; ++i) {
    auto b = n_way_batch(net->num_branches(), 8, static_cast<std::uint64_t>(i));
    std::vector<at::Tensor> x;
    for (const auto& t : b.inputs) x.push_back(t.to(device));
    const StepPlan plan = bal.next_plan();
    auto loss = bal.loss(net->forward(x, plan), b.target.to(device));
    opt.zero_grad();
    loss.backward();
    bal.observe(loss);
    opt.step();
    if ((i + 1) % 4 == 0) bal.end_epoch();
  }
}

template <class NetT>
double max_abs_difference(const NetT& a, const NetT& b) {
  double worst = 0;
  auto pb = b->named_parameters();
  for (const auto& p : a->named_parameters()) {
    worst = std::max(worst, (p.value().cpu() - pb[p.key()].cpu()).abs().max().template item<double>());
  }
  return worst;
}

}  // namespace

TEST_CASE("CUDA: a checkpoint saved on the GPU resumes on the CPU, and one from the CPU on the GPU",
          "[cuda][checkpoint]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("mmbalance_cuda_ckpt_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto policy = [] { return GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)); };
  auto gpu = small_three_way(5);
  gpu->to(cuda);
  auto opt_gpu = make_sgd(gpu);
  Balancer<GuidedPolicy> bal_gpu(gpu, policy(), BalancerOptions().warmup_epochs(0));
  train_on(gpu, opt_gpu, bal_gpu, cuda, 0, 5);
  save_checkpoint(dir + "/gpu.pt", gpu, opt_gpu, bal_gpu);

  // GPU -> CPU: everything lands on the CPU model's device, and training goes on alike.
  auto cpu = small_three_way(6);
  auto opt_cpu = make_sgd(cpu);
  Balancer<GuidedPolicy> bal_cpu(cpu, policy(), BalancerOptions().warmup_epochs(0));
  load_checkpoint(dir + "/gpu.pt", cpu, opt_cpu, bal_cpu);
  CHECK(all_on(cpu, opt_cpu, at::kCPU));
  CHECK(max_abs_difference(cpu, gpu) == 0.0);
  CHECK(bal_cpu.total_plan_counts() == bal_gpu.total_plan_counts());
  train_on(gpu, opt_gpu, bal_gpu, cuda, 5, 9);
  train_on(cpu, opt_cpu, bal_cpu, at::kCPU, 5, 9);
  CHECK(all_on(cpu, opt_cpu, at::kCPU));
  CHECK(bal_cpu.total_plan_counts() == bal_gpu.total_plan_counts());
  CHECK(max_abs_difference(cpu, gpu) < 1e-3);

  // CPU -> GPU.
  save_checkpoint(dir + "/cpu.pt", cpu, opt_cpu, bal_cpu);
  auto back = small_three_way(7);
  back->to(cuda);
  auto opt_back = make_sgd(back);
  Balancer<GuidedPolicy> bal_back(back, policy(), BalancerOptions().warmup_epochs(0));
  load_checkpoint(dir + "/cpu.pt", back, opt_back, bal_back);
  CHECK(all_on(back, opt_back, cuda));
  CHECK(max_abs_difference(back, cpu) == 0.0);
  train_on(back, opt_back, bal_back, cuda, 9, 11);
  CHECK(bal_back.meter().accumulated().device() == cuda);
  std::filesystem::remove_all(dir);
}

TEST_CASE("CUDA: three branches, guided, train on the GPU as on the CPU", "[cuda][n-way]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  auto cpu = small_three_way(8);
  auto gpu = small_three_way(8);
  gpu->to(cuda);
  auto opt_cpu = make_sgd(cpu);
  auto opt_gpu = make_sgd(gpu);
  const auto options = BalancerOptions().warmup_epochs(0);
  Balancer<GuidedPolicy> bal_cpu(cpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), options);
  Balancer<GuidedPolicy> bal_gpu(gpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), options);
  train_on(cpu, opt_cpu, bal_cpu, at::kCPU, 0, 8);
  train_on(gpu, opt_gpu, bal_gpu, cuda, 0, 8);
  // alpha = 0 opens a window after every regular step: re-balancing plans were taken.
  REQUIRE(bal_cpu.total_plan_counts()[0] < 8);
  CHECK(bal_cpu.total_plan_counts() == bal_gpu.total_plan_counts());
  CHECK(max_abs_difference(cpu, gpu) < 1e-3);
  CHECK(bal_gpu.meter().accumulated().device() == cuda);
}

TEST_CASE("CUDA: OGM-GE modulates on the GPU as on the CPU, noise included", "[cuda][ogm-ge]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  for (const bool noise : {false, true}) {
    auto cpu = small_three_way(9);
    auto gpu = small_three_way(9);
    gpu->to(cuda);
    auto opt_cpu = make_sgd(cpu);
    auto opt_gpu = make_sgd(gpu);
    const auto policy = [&] { return OGMGEPolicy(OGMGEOptions().alpha(0.8).noise(noise).seed(2)); };
    Balancer<OGMGEPolicy> bal_cpu(cpu, policy(), BalancerOptions().warmup_epochs(0));
    Balancer<OGMGEPolicy> bal_gpu(gpu, policy(), BalancerOptions().warmup_epochs(0));
    train_on(cpu, opt_cpu, bal_cpu, at::kCPU, 0, 6);
    train_on(gpu, opt_gpu, bal_gpu, cuda, 0, 6);
    CHECK(bal_gpu.policy().last_coefficients().device() == cuda);
    CHECK(torch::allclose(bal_cpu.policy().last_coefficients(),
                          bal_gpu.policy().last_coefficients().cpu(), 1e-4, 1e-5));
    // The coefficients modulated something: otherwise this compares plain SGD.
    CHECK(bal_cpu.policy().last_coefficients().min().item<double>() < 1.0);
    CHECK(max_abs_difference(cpu, gpu) < 1e-3);
  }
}

TEST_CASE("CUDA: MMPareto combines on the GPU as on the CPU, conflicts included", "[cuda][mmpareto]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  // Heads leaning apart make branch 0's gradients conflict: the min-norm path runs too.
  Net cpu = leaning_late_net(9), gpu = leaning_late_net(9);
  gpu->to(cuda);
  auto opt_cpu = make_sgd(cpu);
  auto opt_gpu = make_sgd(gpu);
  Balancer<MMParetoPolicy> bal_cpu(cpu, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  Balancer<MMParetoPolicy> bal_gpu(gpu, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  const auto train = [](Net& net, torch::optim::SGD& opt, Balancer<MMParetoPolicy>& bal, const at::Device& device) {
    for (int i = 0; i < 6; ++i) {
      const auto b = small_batch(8, static_cast<std::uint64_t>(60 + i));
      bal.next_plan();
      const at::Tensor loss = bal.loss(net->forward(b.x0.to(device), b.x1.to(device)), b.target.to(device));
      opt.zero_grad();
      loss.backward();
      bal.observe(loss);
      opt.step();
    }
  };
  train(cpu, opt_cpu, bal_cpu, at::kCPU);
  train(gpu, opt_gpu, bal_gpu, cuda);
  CHECK(bal_gpu.policy().conflict_steps().device() == cuda);
  CHECK(bal_cpu.policy().conflict_steps()[0].item<std::int64_t>() > 0);
  CHECK(bal_gpu.policy().conflict_steps()[0].item<std::int64_t>() > 0);
  CHECK(torch::allclose(bal_cpu.policy().last_fused_weights(), bal_gpu.policy().last_fused_weights().cpu(),
                        1e-3, 1e-4));
  CHECK(max_abs_difference(cpu, gpu) < 1e-3);
}

TEST_CASE("CUDA: AGM's masked passes and coefficients on the GPU as on the CPU, a CPU checkpoint "
          "resumes on the GPU", "[cuda][agm][checkpoint]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  Net cpu = small_net(10), gpu = small_net(10);
  gpu->to(cuda);
  auto opt_cpu = make_sgd(cpu);
  auto opt_gpu = make_sgd(gpu);
  const auto agm = AGMOptions().alpha(0.5);
  Balancer<AGMPolicy> bal_cpu(cpu, AGMPolicy(agm), BalancerOptions().warmup_epochs(0));
  Balancer<AGMPolicy> bal_gpu(gpu, AGMPolicy(agm), BalancerOptions().warmup_epochs(0));
  const auto train = [](Net& net, torch::optim::SGD& opt, Balancer<AGMPolicy>& bal, const at::Device& device,
                        int first, int last) {
    for (int i = first; i < last; ++i) {
      const auto b = small_batch(8, static_cast<std::uint64_t>(70 + i));
      const at::Tensor x0 = b.x0.to(device), x1 = b.x1.to(device);
      bal.next_plan();
      const at::Tensor loss = bal.loss(net->forward(x0, x1), b.target.to(device), {x0, x1});
      opt.zero_grad();
      loss.backward();
      bal.observe(loss);
      opt.step();
    }
  };
  train(cpu, opt_cpu, bal_cpu, at::kCPU, 0, 4);
  train(gpu, opt_gpu, bal_gpu, cuda, 0, 4);
  CHECK(bal_gpu.policy().running_scores().device() == cuda);
  CHECK(bal_gpu.policy().modulated_steps().device() == cuda);
  CHECK(torch::allclose(bal_cpu.policy().running_scores(), bal_gpu.policy().running_scores().cpu(), 1e-3, 1e-5));
  CHECK(torch::allclose(bal_cpu.policy().last_coefficients(), bal_gpu.policy().last_coefficients().cpu(), 1e-3, 1e-5));
  CHECK(max_abs_difference(cpu, gpu) < 1e-3);

  // The CPU run's checkpoint, loaded into a GPU model and balancer, continues there.
  const std::string dir = std::filesystem::temp_directory_path() / ("mmbalance_cuda_agm_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  save_checkpoint(dir + "/agm.pt", cpu, opt_cpu, bal_cpu);
  Net resumed = small_net(99);
  resumed->to(cuda);
  auto opt_resumed = make_sgd(resumed);
  Balancer<AGMPolicy> bal_resumed(resumed, AGMPolicy(agm), BalancerOptions().warmup_epochs(0));
  load_checkpoint(dir + "/agm.pt", resumed, opt_resumed, bal_resumed);
  train(cpu, opt_cpu, bal_cpu, at::kCPU, 4, 6);
  train(resumed, opt_resumed, bal_resumed, cuda, 4, 6);
  CHECK(bal_resumed.policy().modulated_steps().cpu().item<std::int64_t>() == 6);
  CHECK(torch::allclose(bal_cpu.policy().running_scores(), bal_resumed.policy().running_scores().cpu(), 1e-3, 1e-5));
  CHECK(max_abs_difference(cpu, resumed) < 1e-3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("CUDA: a checkpoint with speeds pending (SpeedRead::previous_step) resumes on the GPU",
          "[cuda][checkpoint]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("mmbalance_cuda_lagged_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto options =
      BalancerOptions().warmup_epochs(0).check_every_step(false).speed_read(SpeedRead::previous_step);
  const auto train = [](Net& net, torch::optim::SGD& opt, GuidedBalancer& bal, const at::Device& dev,
                        int first, int last) {
    std::vector<StepKind> kinds;
    for (int i = first; i < last; ++i) {
      auto b = small_batch(8, static_cast<std::uint64_t>(i));
      const StepKind kind = bal.next_step();
      auto loss = bal.loss(net->forward(b.x0.to(dev), b.x1.to(dev), kind), b.target.to(dev));
      opt.zero_grad();
      loss.backward();
      bal.observe(loss);
      opt.step();
      kinds.push_back(kind);
    }
    return kinds;
  };
  Net cpu = small_net(43);
  auto opt_cpu = make_sgd(cpu);
  GuidedBalancer bal_cpu(cpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), options);
  train(cpu, opt_cpu, bal_cpu, at::kCPU, 0, 3);
  save_checkpoint(dir + "/lagged.pt", cpu, opt_cpu, bal_cpu);

  Net gpu = small_net(44);
  gpu->to(cuda);
  auto opt_gpu = make_sgd(gpu);
  GuidedBalancer bal_gpu(gpu, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), options);
  load_checkpoint(dir + "/lagged.pt", gpu, opt_gpu, bal_gpu);
  CHECK(bal_gpu.meter().accumulated().device() == cuda);
  // The pending speeds reach the policy on the GPU as they do on the CPU.
  CHECK(train(gpu, opt_gpu, bal_gpu, cuda, 3, 9) == train(cpu, opt_cpu, bal_cpu, at::kCPU, 3, 9));
  CHECK(max_abs_difference(cpu, gpu) < 1e-3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("CUDA: a Gradient-Blending checkpoint from the CPU resumes on the GPU, where the losses "
          "are then measured", "[cuda][gblend][checkpoint]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("mmbalance_cuda_gblend_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto policy = [] { return for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(1)), 2); };
  const std::vector<MultiModalBatch> train = {small_batch(8, 100)}, held_out = {small_batch(8, 200)};
  // An epoch of 3 steps on `device`, then its end (measured).
  const auto epoch = [&](Net& net, torch::optim::SGD& opt, Balancer<GradientBlendingPolicy>& balancer,
                         at::Device device, std::uint64_t seed) {
    for (std::uint64_t i = 0; i < 3; ++i) {
      const auto b = small_batch(8, seed + i);
      const StepKind kind = balancer.next_step();
      const at::Tensor loss =
          balancer.loss(net->forward(b.x0.to(device), b.x1.to(device), kind), b.target.to(device));
      opt.zero_grad();
      loss.backward();
      balancer.observe(loss);
      opt.step();
    }
    balancer.end_epoch(net, train, held_out);
  };
  Net cpu = small_net(8);
  auto opt_cpu = make_sgd(cpu);
  Balancer<GradientBlendingPolicy> bal_cpu(cpu, policy());
  for (std::uint64_t e = 0; e < 3; ++e) epoch(cpu, opt_cpu, bal_cpu, at::kCPU, 10 * e);
  REQUIRE(bal_cpu.policy().estimates() == 2);
  save_checkpoint(dir + "/gblend.pt", cpu, opt_cpu, bal_cpu);

  Net gpu = small_net(9);
  gpu->to(cuda);
  auto opt_gpu = make_sgd(gpu);
  Balancer<GradientBlendingPolicy> bal_gpu(gpu, policy());
  load_checkpoint(dir + "/gblend.pt", gpu, opt_gpu, bal_gpu);
  CHECK(bal_gpu.policy().loss_weights().heads == bal_cpu.policy().loss_weights().heads);
  CHECK(bal_gpu.policy().loss_weights().fused == bal_cpu.policy().loss_weights().fused);
  CHECK(saved_bytes(bal_gpu.policy()) == saved_bytes(bal_cpu.policy()));
  epoch(gpu, opt_gpu, bal_gpu, cuda, 30);
  epoch(cpu, opt_cpu, bal_cpu, at::kCPU, 30);
  CHECK(bal_gpu.policy().estimates() == 3);
  const LossWeights g = bal_gpu.policy().loss_weights();
  CHECK(g.heads[0] + g.heads[1] + g.fused == Approx(1.0));
  std::filesystem::remove_all(dir);
}

TEST_CASE("CUDA: sample-level valuation's contributions and a forward pass with absent rows on the GPU as on the CPU",
          "[cuda][sample-valuation]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  auto cpu = small_three_way(12);
  auto gpu = small_three_way(12);
  gpu->to(cuda);
  const Batch b = n_way_batch(3, 48, 13);
  std::vector<at::Tensor> on_gpu;
  for (const at::Tensor& x : b.inputs) on_gpu.push_back(x.to(cuda));
  const at::Tensor phi_cpu = sample_contributions(cpu, b.inputs, b.target, 48 * 3);
  const at::Tensor phi_gpu = sample_contributions(gpu, on_gpu, b.target.to(cuda), 48 * 3);
  CHECK(phi_gpu.device() == cuda);
  // Equal where no prediction sits on a near tie (a last-bit difference flips an argmax).
  CHECK(phi_gpu.cpu().sub(phi_cpu).abs().gt(1e-6).sum().item<std::int64_t>() <= 2);
  const ResampledRows rows = SampleValuationPolicy::resampled_rows(SampleValuationPolicy::copies(phi_gpu));
  CHECK(rows.samples.device() == at::kCPU);
  // A forward pass on resampled rows (the last 48: copies where there are as many), on both devices.
  const at::Tensor presence = rows.presence.narrow(0, rows.presence.size(0) - 48, 48);
  const at::Tensor samples = rows.samples.narrow(0, rows.samples.size(0) - 48, 48);
  std::vector<at::Tensor> x_cpu, x_gpu;
  for (const at::Tensor& x : b.inputs) {
    x_cpu.push_back(x.index_select(0, samples));
    x_gpu.push_back(x_cpu.back().to(cuda));
  }
  const at::Tensor y = b.target.index_select(0, samples);
  const NetOutput out_cpu = cpu->forward(x_cpu, StepPlan::regular(), presence);
  const NetOutput out_gpu = gpu->forward(x_gpu, StepPlan::regular(), presence.to(cuda));
  CHECK(torch::allclose(out_cpu.y, out_gpu.y.cpu(), 1e-4, 1e-5));
  CHECK_THROWS_WITH(gpu->forward(x_gpu, StepPlan::regular(), presence),
                    Catch::Contains("presence must be a bool (batch, branches) = (48, 3) tensor on cuda:0"));
}
