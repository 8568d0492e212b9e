#pragma once
/// \file
/// `Balancer<Policy>`: drives balanced multi-modal learning from the user's own loop. A
/// facade over parts with one job each: the step transaction (here: the pending plan, the
/// policy's state before it, the gates the step staged), the speed monitor
/// (speed_monitor.h), the loss former (loss_former.h), the epoch clock (epoch_clock.h) and
/// a re-initializing policy's initial parameters (reinitialization.h); each part saves and
/// reads its own entries of the record.

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Type.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/epoch_clock.h"
#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_former.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_hooks.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/reinitialization.h"
#include "mmbalance/balancing/speed_monitor.h"
#include "mmbalance/balancing/vanilla.h"
#include "mmbalance/detail/record_reader.h"
#include "mmbalance/metrics/head_losses.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/step_kind.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options for `Balancer`.
///
/// Example:
/// ```
/// Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(0.1).Q(5)),
///                                 BalancerOptions().warmup_epochs(1));
/// ```
struct BalancerOptions {
  /// Epochs of regular steps before the policy is consulted (the paper uses one).
  TORCH_ARG(std::int64_t, warmup_epochs) = 1;
  /// true: every step reads one small tensor (loss, squared norms, accumulators) to the
  /// host, and a non-finite loss or gradient (in any step), or a parameter group of norm
  /// zero or without a gradient so far (regular steps), is rejected with an exception
  /// that leaves the balancer and the model's gate means as they were. false: no host
  /// read except the one a policy with `observe_speeds` needs; a regular step whose μ is
  /// not finite is left out of the accumulators on the device and counted
  /// (`skipped_steps()`), and nothing is thrown.
  TORCH_ARG(bool, check_every_step) = true;
  /// When a policy with `observe_speeds` gets the speeds; see `SpeedRead`.
  TORCH_ARG(SpeedRead, speed_read) = SpeedRead::same_step;
};

/// What the balancer has done so far, per step kind (two branches).
using StepCounts = std::array<std::int64_t, kNumStepKinds>;

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
        losses_(net, net->parameter_groups().branch),
        gate_means_(net->gate_means()) {
    if constexpr (TakesBranchCount<Policy>) policy_.set_branches(branches());
    policy_before_step_ = policy_;
    if constexpr (ReinitializesBranches<Policy>) initial_.emplace(losses_.branch_parameters());
    TORCH_CHECK(options.speed_read() == SpeedRead::same_step || !options.check_every_step(),
                "Balancer: speed_read(SpeedRead::previous_step) avoids waiting for the device, "
                "which per-step checks must do; set check_every_step(false) too");
    if constexpr (HoldsFusionGates<Policy>) {
      TORCH_CHECK(!gate_means_.empty(), "Balancer: ", policy_type(), " chooses re-balancing "
                  "steps, which hold the fusion modules' gates, and this network has no fusion "
                  "modules (late fusion): use a policy that needs none (VanillaPolicy, "
                  "OGMGEPolicy, GradientBlendingPolicy, MMParetoPolicy, AGMPolicy) or a network with fusion modules");
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

  /// The step's training loss from its output: the sum over the heads of CE(head,
  /// target), each averaged over the batch (`modality_specific_loss`); after warm-up, with
  /// a policy that weights the losses (`WeighsLosses`), Σ_k w_k·CE(head_k) + w_y·CE(y),
  /// plus the term of a policy that adds one (`AddsAuxiliaryLoss`).
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
  /// computed with modalities masked (2^N − 2 forward passes in eval mode without
  /// gradient after warm-up, the absent inputs zeroed). Other policies ignore them.
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
    TORCH_CHECK(pending_, "Balancer::observe: call next_step() or next_plan() before the "
                "forward pass");
    const StepPlan plan = *pending_;
    at::Tensor gates_count;  // checks off: whether the step was valid, on the device
    try {
      TORCH_CHECK(loss.defined() && loss.numel() == 1, "Balancer::observe: loss must be a scalar, got ",
                  detail::shape_string(loss));
      if constexpr (detail::LossFormer<Policy>::kNeeded) {  // in warm-up too: the loop is wrong from the start
        TORCH_CHECK(losses_.formed(), "Balancer::observe: ", policy_type(),
                    ModulatesGradients<Policy> ? " modulates gradients from the step's outputs"
                                               : " forms the step's loss (weights or a term of its own)",
                    "; form the loss with balancer.loss(out, target)");
      }
      // The policy's gradient hook, after the checks and the meter's reading of the raw
      // gradients but before anything is committed: if it throws, nothing has changed.
      const auto modulate = [&] {
        if constexpr (ModulatesGradients<Policy>) {
          if (!in_warmup()) policy_.modulate_gradients(losses_.gradients(sum_across_ranks, clock_.epoch()));
        }
      };
      const auto deliver = [&](const SpeedSummary& speeds) {
        if constexpr (ObservesSpeeds<Policy>) policy_.observe_speeds(speeds);
      };
      const bool wants_speeds = ObservesSpeeds<Policy> && !in_warmup();
      monitor_.deliver_lagged(wants_speeds && plan.is_regular(), deliver);
      if (plan.is_regular()) {
        gates_count = monitor_.regular_step(loss, clock_.step(), wants_speeds, modulate, deliver);
      } else {
        if (options_.check_every_step()) monitor_.check_rebalancing_step(loss, plan, clock_.step());
        modulate();
      }
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

  /// Gives up the step `next_step()` (or `next_plan()`) announced, as if it had never been asked for: the
  /// policy, the counters and the gate averages stay as they were. Call it when your
  /// forward or backward pass throws (e.g. out of memory), then `next_step()` again. A
  /// step `observe` rejected is abandoned already; with no step pending this does nothing.
  void abandon_step() {
    if (!pending_) return;
    policy_ = policy_before_step_;
    for (auto& m : gate_means_) m->drop();
    pending_.reset();
    losses_.release();
  }

  /// Marks the end of an epoch. With a policy that measures generalization
  /// (`ObservesEpochLosses`, e.g. `GradientBlendingPolicy`), an epoch at whose end it
  /// measures needs `end_epoch(net, train_sample, held_out)` instead, and this throws.
  void end_epoch() {
    TORCH_CHECK(!pending_, "Balancer::end_epoch: the last step (", to_string(*pending_),
                ") was not observed");
    if constexpr (ReinitializesBranches<Policy>) {
      TORCH_CHECK(clock_.epochs_done_after_warmup() < 0, "Balancer::end_epoch: ", policy_type(),
                  " may re-initialize branches at this boundary, which resets their optimizer "
                  "state: call end_epoch(optimizer)");
    }
    if constexpr (ObservesEpochLosses<Policy>) {
      TORCH_CHECK(!measures_at_epoch_end(), "Balancer::end_epoch: ", policy_type(), " measures "
                  "every head's loss at the end of this epoch: call end_epoch(net, train_sample, "
                  "held_out)");
    }
    advance_epoch();
  }

  /// Marks the end of an epoch for a policy that re-initializes branches
  /// (`ReinitializesBranches`): after warm-up it asks the policy for each branch's strength
  /// a_k, sets branch k's parameters to (1 - a_k)·θ + a_k·θ_init and drops `optimizer`'s
  /// state for them where a_k > 0. Strengths that are not one per branch in [0, 1] throw
  /// and change nothing.
  void end_epoch(torch::optim::Optimizer& optimizer)
    requires ReinitializesBranches<Policy>
  {
    TORCH_CHECK(!pending_, "Balancer::end_epoch: the last step (", to_string(*pending_),
                ") was not observed");
    const std::int64_t done = clock_.epochs_done_after_warmup();
    std::vector<double> strengths;
    advance_epoch([&] {
      if (done < 0) return;
      strengths = policy_.reinitialization(done);
      TORCH_CHECK(strengths.size() == branches(), "Balancer::end_epoch: ", policy_type(), " gives ",
                  strengths.size(), " re-initialization strengths for ", branches(), " branches");
      for (std::size_t k = 0; k < strengths.size(); ++k) {
        TORCH_CHECK(strengths[k] >= 0 && strengths[k] <= 1, "Balancer::end_epoch: ", policy_type(),
                    " re-initializes branch ", k, " with strength ", strengths[k], "; strengths are in [0, 1]");
      }
    });
    initial_->apply(strengths, losses_.branch_parameters(), optimizer);
  }

  /// Marks the end of an epoch; where the policy measures generalization at this boundary
  /// (`ObservesEpochLosses`), first measures every head's mean loss (`head_losses`: eval
  /// mode, no gradients) on `train_sample` (batches of training data) and on `held_out`
  /// (batches kept out of training) and hands both to the policy. Other policies ignore
  /// the data. Data-parallel: each rank passes its shards and `dp.sum_across_ranks()`.
  /// Empty data, or losses the policy refuses, throw and change nothing (as does a
  /// policy's `start_epoch` hook that throws, in either form of `end_epoch`).
  template <class Net, class TrainSample, class HeldOut,
            std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
  void end_epoch(Net& net, TrainSample&& train_sample, HeldOut&& held_out,
                 SumAcrossRanks sum_across_ranks = {}) {
    TORCH_CHECK(!pending_, "Balancer::end_epoch: the last step (", to_string(*pending_),
                ") was not observed");
    if constexpr (ReinitializesBranches<Policy>) {
      TORCH_CHECK(clock_.epochs_done_after_warmup() < 0, "Balancer::end_epoch: ", policy_type(),
                  " may re-initialize branches at this boundary, which resets their optimizer "
                  "state: call end_epoch(optimizer)");
    }
    if constexpr (ObservesEpochLosses<Policy>) {
      if (measures_at_epoch_end()) {
        // An empty std::function (as observe() takes for one process) adds nothing up.
        const auto sum = [&](at::Tensor& t) {
          if constexpr (std::is_same_v<SumAcrossRanks, std::function<void(at::Tensor&)>>) {
            if (!sum_across_ranks) return;
          }
          sum_across_ranks(t);
        };
        const auto measure = [&](auto&& data, const char* which) {
          try {
            return head_losses(net, data, sum);
          } catch (c10::Error& e) {  // named where it happened, its type kept (e.g. out of memory)
            e.add_context(std::string("Balancer::end_epoch: measuring ") + which);
            throw;
          }
        };
        const EpochLosses losses{measure(train_sample, "train_sample"), measure(held_out, "held_out"),
                                 clock_.epochs_done_after_warmup()};
        advance_epoch([&] { policy_.observe_epoch_losses(losses); });
        return;
      }
    }
    advance_epoch();
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
  StepCounts epoch_step_counts() const { return step_counts(clock_.epoch_counts()); }
  StepCounts total_step_counts() const { return step_counts(clock_.total_counts()); }

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

  const Policy& policy() const { return policy_; }
  const LearningSpeedMeter& meter() const { return monitor_.meter(); }
  const BalancerOptions& options() const { return options_; }

  /// Everything needed to continue exactly: the branch count, accumulators, counters, the
  /// last speeds, the options that shape the run (warm-up) and the policy's type and own
  /// state (mode, window counter, generator, options).
  void save(torch::serialize::OutputArchive& archive) const {
    TORCH_CHECK(!pending_, "Balancer::save: a step is in progress (", to_string(*pending_), ")");
    const detail::SavedPolicyIdentity identity = detail::policy_identity<Policy>();
    archive.write("policy_name", identity.name);
    archive.write("policy_version", identity.version);
    archive.write("branches", static_cast<std::int64_t>(branches()));
    archive.write("speed_read", static_cast<std::int64_t>(options_.speed_read()));
    monitor_.save(archive);
    clock_.save(archive);
    if constexpr (HasState<Policy>) {
      torch::serialize::OutputArchive nested;
      policy_.save(nested);
      archive.write("policy", nested);
    }
    if constexpr (ReinitializesBranches<Policy>) initial_->save(archive);
  }

  /// Restores a state written by `save`. Everything is read and checked first; on any
  /// error (another number of branches, another policy (by its `checkpoint_identity`; a
  /// record from before identities by its C++ type), other parameter groups,
  /// another warm-up, a policy whose options differ, a damaged record) it throws a
  /// c10::Error saying what differs, and changes nothing. A two-branch record of an earlier
  /// version (no branch count, the speeds as named numbers) loads too.
  void load(torch::serialize::InputArchive& archive) {
    const detail::RecordReader in{archive};
    c10::IValue saved_branches;
    const bool has_branches = archive.try_read("branches", saved_branches);
    TORCH_CHECK(!has_branches || saved_branches.isInt(), "Balancer::load: 'branches' is not an integer");
    const std::int64_t branch_count = has_branches ? saved_branches.toInt() : 2;
    TORCH_CHECK(branch_count == static_cast<std::int64_t>(branches()), "Balancer::load: the "
                "checkpoint was made for a network of ", branch_count, " branches, this one has ",
                branches());
    const detail::SavedPolicyIdentity saved_policy = detail::read_policy_identity(archive);
    detail::check_policy_identity<Policy>(saved_policy);
    // In the order of earlier versions: groups, warm-up, speed read, then the values.
    monitor_.check_groups(in);
    detail::EpochClock clock = clock_.read(in);
    const std::int64_t speed_read = in.integer("speed_read");
    TORCH_CHECK(speed_read == static_cast<std::int64_t>(options_.speed_read()),
                "Balancer::load: the checkpoint was made with speed_read ",
                speed_read == 0 ? "same_step" : "previous_step", ", this balancer has ",
                options_.speed_read() == SpeedRead::same_step ? "same_step" : "previous_step",
                "; resume with the options the run started with");
    auto speeds = monitor_.read(in, has_branches);
    Policy policy = policy_;
    if constexpr (HasState<Policy>) {
      torch::serialize::InputArchive nested;
      TORCH_CHECK(archive.try_read("policy", nested), "Balancer::load: no policy state");
      try {
        if constexpr (ReadsEarlierVersions<Policy>) {
          const std::int64_t current = detail::policy_identity<Policy>().version;
          if (saved_policy.version != 0 && saved_policy.version < current) {
            policy.load(nested, saved_policy.version);
          } else {
            policy.load(nested);
          }
        } else {
          policy.load(nested);
        }
      } catch (const std::exception& e) {  // LibTorch's archive throws its own types too
        TORCH_CHECK(false, "Balancer::load: the policy's state does not load: ",
                    detail::error_text(e));
      }
    }

    std::optional<detail::InitialParameters> initial = initial_;
    if constexpr (ReinitializesBranches<Policy>) initial = initial_->read(archive);

    // All read and checked: commit.
    monitor_.restore(std::move(speeds));
    clock_ = std::move(clock);
    policy_ = std::move(policy);
    initial_ = std::move(initial);
    pending_.reset();
    losses_.release();
  }

 private:
  at::Tensor form_loss(const NetOutput& out, const at::Tensor& target, const std::vector<at::Tensor>* inputs,
                       double scale) {
    TORCH_CHECK(pending_, "Balancer::loss: call next_step() or next_plan() before the forward pass");
    return losses_.form(policy_, out, target, inputs, scale, !in_warmup(), options_.check_every_step());
  }

  // Moves to the next epoch. What the policy takes from the ending epoch (`take`: its
  // losses or its re-initialization, if any) and its start_epoch hook for the next one, if
  // after warm-up, are one decision made before the clock moves: if either throws, nothing
  // has changed.
  template <class Take = void (*)()>
  void advance_epoch(Take&& take = [] {}) {
    ask_policy([&] {
      take();
      if constexpr (HasEpochHook<Policy>) {
        const std::int64_t next = clock_.epoch() + 1;
        if (next >= options_.warmup_epochs()) policy_.start_epoch(next - options_.warmup_epochs());
      }
    });
    clock_.next_epoch();
  }

  // Whether the policy measures at the end of the current epoch.
  bool measures_at_epoch_end() const {
    const std::int64_t done = clock_.epochs_done_after_warmup();
    if constexpr (ObservesEpochLosses<Policy>) return done >= 0 && policy_.wants_epoch_losses(done);
    return false;
  }

  void check_observed(const char* caller) const {
    TORCH_CHECK(!pending_, caller, ": the previous step (", to_string(*pending_),
                ") was not observed; call observe(loss) after backward()");
  }

  // The policy's decision (or its update at an epoch end), with its state kept for
  // `abandon_step` and put back if the policy throws.
  template <class Decide>
  auto ask_policy(Decide&& decide) {
    policy_before_step_ = policy_;
    try {
      return decide();
    } catch (...) {
      policy_ = policy_before_step_;
      throw;
    }
  }

  // A plan the network cannot run throws and leaves the policy as it was.
  void check_plan(const StepPlan& plan) {
    const std::string problem = plan.problem(branches());
    if (!problem.empty()) {
      policy_ = policy_before_step_;
      TORCH_CHECK(false, "Balancer: the policy ", problem);
    }
    if (!plan.is_regular() && gate_means_.empty()) {
      policy_ = policy_before_step_;
      TORCH_CHECK(false, "Balancer: the policy holds branch ", *plan.held_branch(), ", a "
                  "re-balancing step, and this network has no fusion modules whose gates it "
                  "could hold (late fusion)");
    }
  }

  // Asks the policy for the coming step's plan (regular in warm-up), refuses a plan the
  // network cannot run, and starts the step: drops gates staged outside a step.
  StepPlan begin_step(const char* caller) {
    check_observed(caller);
    const StepPlan plan = ask_policy([&] { return in_warmup() ? StepPlan::regular() : policy_.next_plan(); });
    check_plan(plan);
    for (auto& m : gate_means_) m->drop();
    losses_.release();
    pending_ = plan;
    return plan;
  }

  StepCounts step_counts(const std::vector<std::int64_t>& counts) const {
    TORCH_CHECK(branches() == 2, "Balancer: step counts per StepKind are for two branches, "
                "this network has ", branches(), "; use epoch_plan_counts()/total_plan_counts()");
    return {counts[0], counts[1], counts[2]};
  }

  static std::string policy_type() { return c10::demangle(typeid(Policy).name()); }

  BalancerOptions options_;
  Policy policy_;
  Policy policy_before_step_ = policy_;
  detail::SpeedMonitor monitor_;
  detail::EpochClock clock_;
  detail::LossFormer<Policy> losses_;
  std::vector<RunningMean> gate_means_;
  std::optional<StepPlan> pending_;
  std::optional<detail::InitialParameters> initial_;  // a re-initializing policy's
};

}  // namespace mmbalance
