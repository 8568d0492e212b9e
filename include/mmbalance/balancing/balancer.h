#pragma once
/// \file
/// `Balancer<Policy>`: drives balanced multi-modal learning from the user's own loop. A
/// facade over parts with one job each: the step transaction (here: the pending plan and
/// the gates the step staged), the policy with the state it rolls back to
/// (policy_transaction.h), the speed monitor (speed_monitor.h), the loss former
/// (loss_former.h), the epoch clock (epoch_clock.h) and the epoch boundary
/// (epoch_boundary.h: epoch losses and features, re-initialization); each part saves and reads its own
/// entries of the record.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/balancer_options.h"
#include "mmbalance/balancing/epoch_boundary.h"
#include "mmbalance/balancing/epoch_clock.h"
#include "mmbalance/balancing/loss_former.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_hooks.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy_transaction.h"
#include "mmbalance/balancing/speed_monitor.h"
#include "mmbalance/balancing/vanilla.h"
#include "mmbalance/detail/record_reader.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Call `next_step()` before the forward pass, `observe(loss)` after `backward()` and
/// before the optimizer step, `end_epoch()` after each epoch:
/// ```
/// for (auto& batch : loader) {
///   StepKind kind = balancer.next_step();
///   auto loss = modality_specific_loss(net->forward(batch.x0, batch.x1, kind), batch.target);
///   optimizer.zero_grad();
///   loss.backward();
///   balancer.observe(loss);
///   optimizer.step();
/// }
/// balancer.end_epoch();
/// ```
/// For any number of branches the loop is the same with `next_plan()`:
/// ```
///   StepPlan plan = balancer.next_plan();
///   auto loss = modality_specific_loss(net->forward({x0, x1, x2}, plan), batch.target);
/// ```
/// `Policy` is a `BalancingPolicy` (one for any number of branches); a member it declares
/// in a form the balancer would not call (see balancing/policy_hooks.h) is a compile error
/// naming the member and the form expected.
template <class Policy = VanillaPolicy>
class Balancer {
  static_assert(detail::PolicyHooksCheck<Policy>::ok);

 public:
  /// `net` is a `MultiModalNet` handle (any `MultiModalModel`); the balancer keeps its
  /// parameter groups and the handles of its fusion modules' gate means, and tells the
  /// policy the network's branch count first (`set_branches`, which may refuse it).
  template <MultiModalModel Net>
  explicit Balancer(Net net, Policy policy = Policy(), BalancerOptions options = {})
      : options_(options),
        policy_(std::move(policy)),
        monitor_(net->parameter_groups(), options.check_every_step(), options.speed_read()),
        clock_(monitor_.branches(), options.warmup_epochs()),
        losses_(net, net->parameter_groups().branch, options.masked_rows_per_pass()),
        epochs_(losses_.branch_parameters()),
        gate_means_(net->gate_means()) {
    if constexpr (TakesBranchCount<Policy>) policy_.policy().set_branches(branches());
    if constexpr (HoldsFusionGates<Policy>) {
      TORCH_CHECK(!gate_means_.empty(), "Balancer: ", detail::policy_type<Policy>(), " chooses re-balancing "
                  "steps, which hold the fusion modules' gates, and this network has no fusion "
                  "modules (late fusion): use a policy that needs none (VanillaPolicy, "
                  "OGMGEPolicy, OPMPolicy, GradientBlendingPolicy, MMParetoPolicy, AGMPolicy) or a network with fusion modules");
    }
  }

  /// The kind of the coming step (two branches; `next_plan()` is the same for any number):
  /// the policy's plan as a `StepKind`. Must alternate with `observe()`. Gates staged
  /// outside a step (a forward pass of your own in training mode) are dropped here: only
  /// the step's own forward passes count.
  StepKind next_step() {
    TORCH_CHECK(branches() == 2, "Balancer::next_step: step kinds are for two branches, this "
                "network has ", branches(), "; use next_plan()");
    const StepPlan plan = begin_step("Balancer::next_step");
    if (const auto k = plan.modulated_branch()) {
      abandon_step();
      TORCH_CHECK(false, "Balancer::next_step: the policy modulates branch ", *k, "'s features, "
                  "which a StepKind cannot carry: use next_plan() and forward(inputs, plan)");
    }
    return to_step_kind(plan);
  }

  /// The plan of the coming step: regular, or which branch is held (re-balanced). Must
  /// alternate with `observe()`; gates staged outside a step are dropped here. A plan that
  /// holds a branch the network does not have throws and changes nothing.
  StepPlan next_plan() { return begin_step("Balancer::next_plan"); }

  /// The step's training loss from its output: the policy's objective (`Objective`:
  /// without one, the sum over the heads of CE(head, target), each averaged over the
  /// batch, `modality_specific_loss`; `fused`: CE(y), `fused_loss`); after warm-up, with a policy that
  /// weights the losses (`WeighsLosses`), Σ_k w_k·CE(head_k) + w_y·CE(y), plus the term of
  /// a policy that adds one (`AddsAuxiliaryLoss`).
  /// Call it between `next_step()`/`next_plan()` and `observe()`; it hands the step's
  /// outputs to a policy that modulates gradients (`ModulatesGradients`), which needs it,
  /// and for one that `NeedsFusedGradients` computes ∂(scale·CE(y))/∂θ_k after warm-up (one
  /// backward pass of CE(y), keeping the graph for your `backward()`; added up over the
  /// calls of one step, for gradient accumulation). `scale` multiplies the returned loss:
  /// pass the factor you would multiply it by (e.g. a data-parallel rank's share of an
  /// uneven global batch) so that such a policy sees its gradients scaled alike. With
  /// gradient accumulation call it for each micro-batch: the heads and targets of a step's
  /// calls are joined (rows in call order). If it throws, what it staged before stays.
  /// A policy that `NeedsMaskedOutputs` (AGM) needs the step's inputs: it has only the
  /// overloads that take them.
  at::Tensor loss(const NetOutput& out, const at::Tensor& target, double scale = 1.0)
    requires(!NeedsMaskedOutputs<Policy>)
  {
    return form_loss(out, target, nullptr, scale);
  }

  /// `loss(out, target, scale)` with the step's inputs, one per branch in branch order,
  /// from which a policy that `NeedsMaskedOutputs` (AGM) has the network's fused output
  /// computed with modalities masked (2^N − 2 masked copies of the batch in eval mode
  /// without gradient after warm-up, the absent inputs zeroed, stacked into passes of up
  /// to `BalancerOptions::masked_rows_per_pass` rows). Other policies ignore them.
  at::Tensor loss(const NetOutput& out, const at::Tensor& target, const std::vector<at::Tensor>& inputs,
                  double scale = 1.0) {
    return form_loss(out, target, &inputs, scale);
  }

  /// Takes the step's loss after `backward()`, before the optimizer step. Regular steps
  /// feed the learning-speed meter (and the policy's `observe_speeds`); after warm-up a
  /// policy that modulates gradients then changes them (from the outputs `loss()` saw).
  /// Data-parallel, pass `dp.sum_across_ranks()` too: such a policy adds its statistics
  /// up over the ranks with it (the other policies need nothing from it).
  void observe(const at::Tensor& loss) { observe(loss, {}); }

  /// `observe(loss)` in data-parallel training: `sum_across_ranks` (`dp.sum_across_ranks()`)
  /// adds a modulating policy's statistics up over the ranks.
  void observe(const at::Tensor& loss, const std::function<void(at::Tensor&)>& sum_across_ranks) {
    TORCH_CHECK(pending_, "Balancer::observe: call next_step() or next_plan() before the forward pass");
    const StepPlan plan = *pending_;
    at::Tensor gates_count;  // checks off: whether the step was valid, on the device
    try {
      TORCH_CHECK(loss.defined() && loss.numel() == 1, "Balancer::observe: loss must be a scalar, got ",
                  detail::shape_string(loss));
      losses_.check_formed();
      // The policy's gradient hook, after the checks and the meter's reading of the raw
      // gradients but before anything is committed: if it throws, nothing has changed.
      const auto modulate = [&] {
        if constexpr (ModulatesGradients<Policy>) {
          if (!in_warmup()) policy_.policy().modulate_gradients(losses_.gradients(sum_across_ranks, clock_.epoch()));
        }
      };
      const auto deliver = [&](const SpeedSummary& speeds) {
        if constexpr (ObservesSpeeds<Policy>) policy_.policy().observe_speeds(speeds);
      };
      gates_count = monitor_.observe(loss, plan, clock_.step(), ObservesSpeeds<Policy> && !in_warmup(), modulate,
                                     deliver);
    } catch (...) {
      abandon_step();
      throw;
    }
    // Accepted: the step's gates count (re-balancing steps stage none); with checks off,
    // those of a step left out of the accumulators do not.
    for (auto& m : gate_means_) m->commit(gates_count);
    pending_.reset();
    losses_.release();
    clock_.count(plan);
  }

  /// Gives up the step `next_step()` (or `next_plan()`) announced, as if it had never been
  /// asked for: the policy (tensors it changed in place included; see `CopyIsSnapshot`),
  /// the counters and the gate averages stay as they were. Call it when your forward or
  /// backward pass throws (e.g. out of memory), then `next_step()` again. A step `observe`
  /// rejected is abandoned already; with no step pending this does nothing.
  void abandon_step() {
    if (!pending_) return;
    policy_.roll_back();
    for (auto& m : gate_means_) m->drop();
    pending_.reset();
    losses_.release();
  }

  /// Marks the end of an epoch. With a policy that measures on data (`ObservesEpochLosses`,
  /// e.g. `GradientBlendingPolicy`; `ObservesEpochFeatures`, e.g. `ReLearningPolicy`), an
  /// epoch at whose end it measures needs `end_epoch(net, train_sample, held_out)` instead,
  /// and this throws.
  void end_epoch() {
    check_epoch_end(false, false);
    epochs_.advance(clock_, policy_);
  }

  /// Marks the end of an epoch for a policy that re-initializes branches
  /// (`ReinitializesBranches`): after warm-up it asks the policy for each branch's strength
  /// a_k, sets branch k's parameters to (1 - a_k)·θ + a_k·θ_init and drops `optimizer`'s
  /// state for them where a_k > 0. Strengths that are not one per branch in [0, 1] throw
  /// and change nothing.
  void end_epoch(torch::optim::Optimizer& optimizer)
    requires ReinitializesBranches<Policy>
  {
    check_epoch_end(false, true);
    epochs_.end(clock_, policy_, losses_.branch_parameters(), optimizer);
  }

  /// Marks the end of an epoch; where the policy measures at this boundary, first measures
  /// on `train_sample` (batches of training data) and on `held_out` (batches kept out of
  /// training), in eval mode without gradients, and hands the result to the policy: every
  /// head's mean loss (`head_losses`) for `ObservesEpochLosses`, every branch's features
  /// (`EpochFeatures`) for `ObservesEpochFeatures`. Other policies ignore the data.
  /// Data-parallel: pass `dp.sum_across_ranks()`, and each rank its shards (losses: the
  /// sums cover all ranks) or the same data on every rank (features). Empty data, or
  /// measurements the policy refuses, throw and change nothing (as does a policy's
  /// `start_epoch` hook that throws, in any form of `end_epoch`).
  template <class Net, class TrainSample, class HeldOut,
            std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
  void end_epoch(Net& net, TrainSample&& train_sample, HeldOut&& held_out,
                 SumAcrossRanks sum_across_ranks = {}) {
    check_epoch_end(true, false);
    epochs_.end(clock_, policy_, net, train_sample, held_out, sum_across_ranks);
  }

  /// Both of the above, for a policy that measures on data and re-initializes branches
  /// (e.g. `ReLearningPolicy`): the policy takes the measurement, then gives its strengths.
  template <class Net, class TrainSample, class HeldOut,
            std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
  void end_epoch(Net& net, TrainSample&& train_sample, HeldOut&& held_out, torch::optim::Optimizer& optimizer,
                 SumAcrossRanks sum_across_ranks = {})
    requires ReinitializesBranches<Policy>
  {
    check_epoch_end(true, true);
    epochs_.end(clock_, policy_, net, train_sample, held_out, sum_across_ranks, losses_.branch_parameters(), optimizer);
  }

  bool in_warmup() const { return clock_.in_warmup(); }
  std::int64_t epoch() const { return clock_.epoch(); }
  std::int64_t step() const { return clock_.step(); }
  /// The network's number of branches.
  std::size_t branches() const { return monitor_.branches(); }

  /// Steps per plan, this epoch and in all: [regular, branch 0 held, ..., branch N-1 held]
  /// (for two branches the `StepKind` order).
  const std::vector<std::int64_t>& epoch_plan_counts() const { return clock_.epoch_counts(); }
  const std::vector<std::int64_t>& total_plan_counts() const { return clock_.total_counts(); }
  /// The same per `StepKind` (two branches).
  StepCounts epoch_step_counts() const { return detail::EpochClock::per_step_kind(clock_.epoch_counts()); }
  StepCounts total_step_counts() const { return detail::EpochClock::per_step_kind(clock_.total_counts()); }

  /// The signed d_speed = s_0 - s_1 after the last regular step of a two-branch network, as
  /// last read to the host (NaN before any read; with check_every_step(false) and a policy
  /// that needs no value, call `speed()`). NaN for N >= 3 branches, which have no signed
  /// d_speed: read `last_speeds().spread`.
  double last_d_speed() const { return monitor_.last().d_speed; }

  /// Every branch's s_k, their spread, the fastest branch (and for two branches d_speed)
  /// after the last regular step, as last read to the host (see `last_d_speed`).
  const SpeedSummary& last_speeds() const { return monitor_.last(); }

  /// Reads the accumulators now (one small read) and derives every branch's s_k, their
  /// spread, the fastest branch (and for two branches s(m1|m0), s(m0|m1), d_speed).
  SpeedSummary speed() const { return monitor_.meter().summary(); }

  /// Regular steps left out of the accumulators (only with check_every_step(false)).
  /// Reads one number from the device.
  std::int64_t skipped_steps() const { return monitor_.meter().skipped(); }

  const Policy& policy() const { return policy_.policy(); }
  const LearningSpeedMeter& meter() const { return monitor_.meter(); }
  const BalancerOptions& options() const { return options_; }

  /// Everything needed to continue exactly: the branch count, accumulators, counters, the
  /// last speeds, the options that shape the run (warm-up) and the policy's type and own
  /// state (mode, window counter, generator, options).
  void save(torch::serialize::OutputArchive& archive) const {
    TORCH_CHECK(!pending_, "Balancer::save: a step is in progress (", to_string(*pending_), ")");
    policy_.save(archive);
    monitor_.save(archive);
    clock_.save(archive);
    epochs_.save(archive);
  }

  /// Restores a state written by `save`. Everything is read and checked first; on any
  /// error (another number of branches, another policy (by its `checkpoint_identity`; a
  /// record from before identities by its C++ type), other parameter groups,
  /// another warm-up, a policy whose options differ, a damaged record) it throws a
  /// c10::Error saying what differs, and changes nothing. A two-branch record of an earlier
  /// version (no branch count, the speeds as named numbers) loads too.
  void load(torch::serialize::InputArchive& archive) {
    const detail::RecordReader in{archive};
    const bool has_branches = monitor_.check_branches(in);
    const detail::SavedPolicyIdentity saved_policy = detail::read_policy_identity(archive);
    detail::check_policy_identity<Policy>(saved_policy);
    // In the order of earlier versions: groups, warm-up, speed read, then the values.
    monitor_.check_groups(in);
    detail::EpochClock clock = clock_.read(in);
    monitor_.check_speed_read(in);
    auto speeds = monitor_.read(in, has_branches);
    // The policy's state, then the rest and the commit; if anything throws, the policy is put back.
    policy_.load(archive, saved_policy, [&] {
      auto initial = epochs_.read(archive);
      monitor_.restore(std::move(speeds));
      clock_ = std::move(clock);
      epochs_.commit(std::move(initial));
    });
    pending_.reset();
    losses_.release();
  }

 private:
  at::Tensor form_loss(const NetOutput& out, const at::Tensor& target, const std::vector<at::Tensor>* inputs,
                       double scale) {
    TORCH_CHECK(pending_, "Balancer::loss: call next_step() or next_plan() before the forward pass");
    return losses_.form(policy_.policy(), out, target, inputs, scale, !in_warmup(), options_.check_every_step());
  }

  // An epoch ends with no step pending, in a form that serves the policy there.
  void check_epoch_end(bool with_data, bool with_optimizer) const {
    TORCH_CHECK(!pending_, "Balancer::end_epoch: the last step (", to_string(*pending_), ") was not observed");
    epochs_.check_form(clock_, policy_, with_data, with_optimizer);
  }

  // Asks the policy for the coming step's plan (regular in warm-up); a plan the network
  // cannot run throws and leaves the policy as it was. Starts the step: drops gates
  // staged outside a step.
  StepPlan begin_step(const char* caller) {
    TORCH_CHECK(!pending_, caller, ": the previous step (", to_string(*pending_),
                ") was not observed; call observe(loss) after backward()");
    const StepPlan plan = policy_.decide([&] {
      const StepPlan p = in_warmup() ? StepPlan::regular() : policy_.policy().next_plan();
      const std::string problem = p.problem(branches());
      TORCH_CHECK(problem.empty(), "Balancer: the policy ", problem);
      TORCH_CHECK(p.is_regular() || !gate_means_.empty(), "Balancer: the policy holds branch ",
                  *p.held_branch(), ", a re-balancing step, and this network has no fusion "
                  "modules whose gates it could hold (late fusion)");
      return p;
    });
    for (auto& m : gate_means_) m->drop();
    losses_.release();
    pending_ = plan;
    return plan;
  }

  BalancerOptions options_;
  detail::PolicyTransaction<Policy> policy_;  // and the state it rolls back to
  detail::SpeedMonitor monitor_;
  detail::EpochClock clock_;
  detail::LossFormer<Policy> losses_;
  detail::EpochBoundary<Policy> epochs_;
  std::vector<RunningMean> gate_means_;
  std::optional<StepPlan> pending_;
};

}  // namespace mmbalance
