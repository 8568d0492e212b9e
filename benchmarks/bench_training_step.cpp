// Question: what does balancing add to a training step?
// On the colored-MNIST net (SGD momentum 0.9, lr 0.01, CE(y0) + CE(y1)) at batch 8, 32, 128:
// - vanilla: a plain LibTorch step, no mmbalance machinery besides the model;
// - paired: vanilla, guided regular (a GuidedBalancer staying in regular mode: meter,
//   policy, per-step checks, what every regular step of guided training costs), the same
//   with check_every_step(false), and a re-balancing step (StepKind::rebalance_m0), taking
//   turns; its counters are the ratios to vanilla;
// - balancer only: next_step() + observe() on fixed gradients, i.e. what guided adds to a
//   regular step, measured alone (more precise than any end-to-end ratio here);
// - OGM-GE paired: vanilla, OGM-GE and OGM (no noise) taking turns, at batch 8 and 128;
// - loss methods paired: vanilla, Gradient-Blending (a step's cost: the weighted loss; its
//   measurement at the end of a super-epoch is per epoch) and MMPareto (one more backward
//   pass of CE(y) and the combination) taking turns, at batch 8 and 128;
// - forward and feature methods paired: vanilla, OPM (dropping the leading branch in 70 %
//   of the steps), PMR (its prototype term every step) and ReLearning (CE(y); nothing per
//   step) taking turns, at batch 8 and 128;
// - AGM's masked passes paired: the 2^N − 2 masked copies stacked into passes of the
//   default row budget against one copy a pass (the library before 2026-12-07), at batch
//   8, 32 and 128, two and three branches;
// - rollback state: what the balancer keeps per step to roll a policy back to: the C++
//   copy (a policy declaring copy_is_snapshot, as the library's do) or, by default, the
//   copy and the policy's record (save, serialized), for GuidedPolicy's and
//   MMParetoPolicy's state.
#include <array>
#include <chrono>
#include <functional>

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

void vanilla_step(Setup& s, StepKind kind = StepKind::regular) {
  auto loss = modality_specific_loss(s.net->forward(s.data.x0, s.data.x1, kind), s.data.target);
  s.optimizer.zero_grad();
  loss.backward();
  s.optimizer.step();
}

void balanced_step(Setup& s, GuidedBalancer& balancer) {
  const StepKind kind = balancer.next_step();
  auto loss = modality_specific_loss(s.net->forward(s.data.x0, s.data.x1, kind), s.data.target);
  s.optimizer.zero_grad();
  loss.backward();
  balancer.observe(loss);
  s.optimizer.step();
}

// alpha = infinity: every step stays regular, so each one pays for meter and policy.
GuidedBalancer always_regular(Setup& s, bool checks) {
  return GuidedBalancer(s.net, GuidedPolicy(GuidedOptions().alpha(INFINITY)),
                        BalancerOptions().warmup_epochs(0).check_every_step(checks));
}

void BM_StepVanilla(benchmark::State& state) {
  Setup s(state.range(0));
  for (auto _ : state) vanilla_step(s);
}

// The four kinds of step on four copies of the model take turns within each iteration,
// in rotating order, each timed alone: whatever the machine does meanwhile hits all four
// alike. The counters are ratios of their summed times.
void BM_StepsPaired(benchmark::State& state) {
  const std::int64_t b = state.range(0);
  Setup vanilla(b), guided(b), unchecked(b), rebalance(b);
  GuidedBalancer guided_balancer = always_regular(guided, true);
  GuidedBalancer unchecked_balancer = always_regular(unchecked, false);
  rebalance.net->forward(rebalance.data.x0, rebalance.data.x1);  // gate averages to hold
  const std::array<std::function<void()>, 4> steps{
      [&] { vanilla_step(vanilla); }, [&] { balanced_step(guided, guided_balancer); },
      [&] { balanced_step(unchecked, unchecked_balancer); },
      [&] { vanilla_step(rebalance, StepKind::rebalance_m0); }};
  const std::array<double, 4> seconds = time_in_turns(state, steps);
  state.counters["guided_over_vanilla"] = seconds[1] / seconds[0];
  state.counters["guided_no_checks_over_vanilla"] = seconds[2] / seconds[0];
  state.counters["rebalance_over_vanilla"] = seconds[3] / seconds[0];
}

// A step of a policy through the balancer: its plan (which may act on the forward pass,
// as OPM's drops), its loss (with the inputs AGM masks), its gradient hooks.
template <class Policy>
void policy_step(Setup& s, Balancer<Policy>& balancer) {
  const StepPlan plan = balancer.next_plan();
  auto loss = balancer.loss(s.net->forward({s.data.x0, s.data.x1}, plan), s.data.target, {s.data.x0, s.data.x1});
  s.optimizer.zero_grad();
  loss.backward();
  balancer.observe(loss);
  s.optimizer.step();
}

// A step of sample-level valuation: CE(y) on rows of which every other one has one
// modality absent (alternately 0 and 1), as a resampled epoch's rows may.
void sample_valuation_step(Setup& s, Balancer<SampleValuationPolicy>& balancer, const at::Tensor& presence) {
  const StepPlan plan = balancer.next_plan();
  auto loss = balancer.loss(s.net->forward({s.data.x0, s.data.x1}, plan, presence), s.data.target);
  s.optimizer.zero_grad();
  loss.backward();
  balancer.observe(loss);
  s.optimizer.step();
}

at::Tensor every_other_row_one_absent(std::int64_t rows) {
  at::Tensor presence = at::ones({rows, 2}, at::kBool);
  for (std::int64_t r = 1; r < rows; r += 2) presence[r][(r / 2) % 2] = false;
  return presence;
}

// Vanilla against OGM-GE and OGM (no noise), taking turns as in BM_StepsPaired.
void BM_OGMGEPaired(benchmark::State& state) {
  const std::int64_t b = state.range(0);
  Setup vanilla(b), with_noise(b), without_noise(b);
  Balancer<OGMGEPolicy> ogm_ge(with_noise.net, OGMGEPolicy(OGMGEOptions().alpha(0.5)),
                               BalancerOptions().warmup_epochs(0));
  Balancer<OGMGEPolicy> ogm(without_noise.net, OGMGEPolicy(OGMGEOptions().alpha(0.5).noise(false)),
                            BalancerOptions().warmup_epochs(0));
  const std::array<std::function<void()>, 3> steps{
      [&] { vanilla_step(vanilla); }, [&] { policy_step(with_noise, ogm_ge); },
      [&] { policy_step(without_noise, ogm); }};
  const std::array<double, 3> seconds = time_in_turns(state, steps);
  state.counters["ogm_ge_over_vanilla"] = seconds[1] / seconds[0];
  state.counters["ogm_over_vanilla"] = seconds[2] / seconds[0];
}

// Vanilla against Gradient-Blending, MMPareto and AGM, taking turns as in BM_StepsPaired.
void BM_LossMethodsPaired(benchmark::State& state) {
  const std::int64_t b = state.range(0);
  Setup vanilla(b), blended(b), pareto(b), adaptive(b);
  Balancer<GradientBlendingPolicy> gblend(blended.net, GradientBlendingPolicy(),
                                          BalancerOptions().warmup_epochs(0));
  Balancer<MMParetoPolicy> mmpareto(pareto.net, MMParetoPolicy(), BalancerOptions().warmup_epochs(0));
  Balancer<AGMPolicy> agm(adaptive.net, AGMPolicy(), BalancerOptions().warmup_epochs(0));
  const std::array<std::function<void()>, 4> steps{
      [&] { vanilla_step(vanilla); }, [&] { policy_step(blended, gblend); },
      [&] { policy_step(pareto, mmpareto); }, [&] { policy_step(adaptive, agm); }};
  for (const auto& step : steps) step();  // warm-up: the allocator, first-call work
  const at::Tensor conflicts_before = mmpareto.policy().conflict_steps().clone();
  const std::array<double, 4> seconds = time_in_turns(state, steps);
  state.counters["gblend_over_vanilla"] = seconds[1] / seconds[0];
  state.counters["mmpareto_over_vanilla"] = seconds[2] / seconds[0];
  state.counters["agm_over_vanilla"] = seconds[3] / seconds[0];
  // Seconds per step of each, for benchmarks/originals_cost.py (C++ over Python).
  const double iterations = static_cast<double>(state.iterations());
  state.counters["vanilla_seconds"] = seconds[0] / iterations;
  state.counters["mmpareto_seconds"] = seconds[2] / iterations;
  state.counters["agm_seconds"] = seconds[3] / iterations;
  // MMPareto's cost depends on how often the gradients conflict: per branch and step.
  const at::Tensor conflicts = mmpareto.policy().conflict_steps() - conflicts_before;  // per branch, timed steps
  state.counters["mmpareto_conflict_fraction"] =
      conflicts.sum().item<double>() / (static_cast<double>(conflicts.numel()) * iterations);
}

// Vanilla against OPM (the original's options: 70 % of the steps drop the leading branch
// once it has scores), PMR (prototypes from a first epoch of one step, then its term
// every step), ReLearning (its steps: CE(y) through the balancer; its epoch-boundary
// cost is bench_epoch_boundary's) and sample-level valuation (a step on resampled rows;
// its valuation is bench_epoch_boundary's), taking turns as in BM_StepsPaired.
void BM_ForwardAndFeatureMethodsPaired(benchmark::State& state) {
  const std::int64_t b = state.range(0);
  Setup vanilla(b), dropping(b), prototypes(b), relearning(b), valuation(b);
  Balancer<OPMPolicy> opm(dropping.net, OPMPolicy(), BalancerOptions().warmup_epochs(0));
  Balancer<PMRPolicy> pmr(prototypes.net, PMRPolicy(), BalancerOptions().warmup_epochs(0));
  Balancer<ReLearningPolicy> relearn(relearning.net, ReLearningPolicy(), BalancerOptions().warmup_epochs(0));
  Balancer<SampleValuationPolicy> smv(valuation.net, SampleValuationPolicy(), BalancerOptions().warmup_epochs(0));
  const at::Tensor presence = every_other_row_one_absent(b);
  const std::array<std::function<void()>, 5> steps{
      [&] { vanilla_step(vanilla); }, [&] { policy_step(dropping, opm); }, [&] { policy_step(prototypes, pmr); },
      [&] { policy_step(relearning, relearn); }, [&] { sample_valuation_step(valuation, smv, presence); }};
  for (const auto& step : steps) step();  // warm-up: the allocator, OPM's first scores, PMR's sums
  pmr.end_epoch();                        // PMR's first prototypes: its term from here on
  const std::array<double, 5> seconds = time_in_turns(state, steps);
  state.counters["opm_over_vanilla"] = seconds[1] / seconds[0];
  state.counters["pmr_over_vanilla"] = seconds[2] / seconds[0];
  state.counters["relearning_over_vanilla"] = seconds[3] / seconds[0];
  state.counters["smv_over_vanilla"] = seconds[4] / seconds[0];
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

// The masked passes of N branches at batch state.range(0): batched and pass by pass taking
// turns; the counter is batched over pass by pass.
template <std::size_t N>
void BM_MaskedPassesPaired(benchmark::State& state) {
  auto net = colored_mnist_n_way_net<N>();
  const MultiModalBatch data = batch(state.range(0), 1);
  std::vector<at::Tensor> inputs{data.x0};
  for (std::size_t k = 1; k < N; ++k) inputs.push_back(data.x1);
  auto batched = mmbalance::detail::masked_forward(net, BalancerOptions().masked_rows_per_pass());
  // One row a pass is one copy a pass: the forward per subset the library ran before
  // 2026-12-07, the same code otherwise.
  auto pass_by_pass = mmbalance::detail::masked_forward(net, 1);
  const std::array<std::function<void()>, 2> passes{
      [&] { benchmark::DoNotOptimize(batched(inputs)); },
      [&] { benchmark::DoNotOptimize(pass_by_pass(inputs)); }};
  const std::array<double, 2> seconds = time_in_turns(state, passes);
  state.counters["batched_over_pass_by_pass"] = seconds[0] / seconds[1];
}

// The policy `P` without its copy_is_snapshot promise: the balancer keeps its record.
template <class P>
struct WithoutSnapshotPromise : P {
  static constexpr bool copy_is_snapshot = false;
};

template <class P>
void BM_RollbackState(benchmark::State& state) {
  P policy;
  policy.set_branches(2);
  mmbalance::detail::PolicyTransaction<P> transaction(policy);
  for (auto _ : state) transaction.keep();
  state.SetLabel(CopyIsSnapshot<P> ? "copy" : "copy and record");
}

}  // namespace

BENCHMARK_TEMPLATE(BM_RollbackState, GuidedPolicy)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_RollbackState, WithoutSnapshotPromise<GuidedPolicy>)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_RollbackState, MMParetoPolicy)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_RollbackState, WithoutSnapshotPromise<MMParetoPolicy>)->Unit(benchmark::kMicrosecond);

#define MMBALANCE_STEP_BENCH(b)                                                    \
  BENCHMARK(BM_StepVanilla)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(2.0);  \
  BENCHMARK(BM_StepsPaired)->Arg(b)->Unit(benchmark::kMillisecond)->MinTime(4.0);  \
  BENCHMARK(BM_BalancerObserveOnly)->Arg(b)->Unit(benchmark::kMillisecond)

MMBALANCE_STEP_BENCH(8);
MMBALANCE_STEP_BENCH(32);
MMBALANCE_STEP_BENCH(128);
BENCHMARK(BM_OGMGEPaired)->Arg(8)->Arg(128)->Unit(benchmark::kMillisecond)->MinTime(4.0);
BENCHMARK(BM_LossMethodsPaired)->Arg(8)->Arg(128)->Unit(benchmark::kMillisecond)->MinTime(4.0);
BENCHMARK(BM_ForwardAndFeatureMethodsPaired)->Arg(8)->Arg(128)->Unit(benchmark::kMillisecond)->MinTime(4.0);
BENCHMARK_TEMPLATE(BM_MaskedPassesPaired, 2)->Arg(8)->Arg(32)->Arg(128)->Unit(benchmark::kMillisecond)->MinTime(4.0);
BENCHMARK_TEMPLATE(BM_MaskedPassesPaired, 3)->Arg(8)->Arg(32)->Arg(128)->Unit(benchmark::kMillisecond)->MinTime(4.0);
