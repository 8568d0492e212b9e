#pragma once
/// \file
/// `Balancer<Policy>`: drives balanced multi-modal learning from the user's own loop, for
/// two branches (step kinds) or any number (step plans).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Type.h>
#include <torch/arg.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_hooks.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/reinitialization.h"
#include "mmbalance/balancing/vanilla.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/step_kind.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// When a policy that observes the learning speeds (`observe_speeds`: guided) gets them.
enum class SpeedRead : std::uint8_t {
  /// Right after each regular step, so it decides the very next step (the paper's
  /// algorithm). Costs one small host read per regular step.
  same_step,
  /// The accumulators are copied to the host without waiting; the policy receives a
  /// regular step's speeds when the following step is observed, so decisions lag by one
  /// step and no step waits for the device. A speed that arrives while the policy is
  /// already re-balancing (the following step was a re-balancing one) is dropped, so a
  /// guided window is always exactly Q steps in one direction. Needs
  /// check_every_step(false).
  previous_step,
};

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
  /// `net` is a `MultiModalNet` handle (any `MultiModalModel`); the
  /// balancer keeps its parameter groups and the handles of its fusion modules' gate
  /// means, and tells the policy the network's branch count first (`set_branches`, which
  /// may refuse it).
  template <MultiModalModel Net>
  explicit Balancer(Net net, Policy policy = Policy(), BalancerOptions options = {})
      : options_(options),
        policy_(std::move(policy)),
        meter_(net->parameter_groups()),
        branch_parameters_(net->parameter_groups().branch),
        gate_means_(net->gate_means()),
        epoch_counts_(branches() + 1, 0),
        total_counts_(branches() + 1, 0) {
    if constexpr (TakesBranchCount<Policy>) {
      policy_.set_branches(branches());
      policy_before_step_ = policy_;
    }
    if constexpr (NeedsMaskedOutputs<Policy>) masked_forward_ = masked_forward(net);
    if constexpr (ReinitializesBranches<Policy>) {
      for (const auto& group : branch_parameters_) {
        initial_branch_parameters_.emplace_back();
        for (const at::Tensor& p : group) initial_branch_parameters_.back().push_back(p.detach().clone());
      }
    }
    TORCH_CHECK(options.warmup_epochs() >= 0, "Balancer: warmup_epochs must be >= 0, got ",
                options.warmup_epochs());
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
    return to_step_kind(begin_step("Balancer::next_step"));
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
      if constexpr (kFormsLoss) {  // in warm-up too: the loop is wrong from the start
        TORCH_CHECK(!staged_heads_.empty(), "Balancer::observe: ", policy_type(),
                    ModulatesGradients<Policy> ? " modulates gradients from the step's outputs"
                                               : " forms the step's loss (weights or a term of its own)",
                    "; form the loss with balancer.loss(out, target)");
      }
      // The policy's gradient hook, after the checks and the meter's reading of the raw
      // gradients but before anything is committed: if it throws, nothing has changed.
      const auto modulate = [&] {
        if constexpr (ModulatesGradients<Policy>) {
          if (!in_warmup()) {
            policy_.modulate_gradients(StepGradients{staged_heads_, staged_target_, branch_parameters_,
                                                     sum_across_ranks, epoch_, staged_fused_gradients_,
                                                     staged_subset_outputs_});
          }
        }
      };
      deliver_lagged_speed(plan);
      if (plan.is_regular()) {
        gates_count = observe_regular(loss, modulate);
      } else {
        if (options_.check_every_step()) check_rebalancing_step(loss, plan);
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
    release_step_outputs();
    ++step_;
    ++epoch_counts_[plan_index(plan)];
    ++total_counts_[plan_index(plan)];
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
    release_step_outputs();
  }

  /// Marks the end of an epoch. With a policy that measures generalization
  /// (`ObservesEpochLosses`, e.g. `GradientBlendingPolicy`), an epoch at whose end it
  /// measures needs `end_epoch(net, train_sample, held_out)` instead, and this throws.
  void end_epoch() {
    TORCH_CHECK(!pending_, "Balancer::end_epoch: the last step (", to_string(*pending_),
                ") was not observed");
    if constexpr (ReinitializesBranches<Policy>) {
      TORCH_CHECK(epochs_done_after_warmup() < 0, "Balancer::end_epoch: ", policy_type(),
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
    const std::int64_t done = epochs_done_after_warmup();
    std::vector<double> strengths;
    advance_epoch([&] {
      if (done < 0) return;
      strengths = policy_.reinitialization(done);
      TORCH_CHECK(strengths.size() == branches(), "Balancer::end_epoch: ", policy_type(),
                  " gives ", strengths.size(), " re-initialization strengths for ", branches(),
                  " branches");
      for (std::size_t k = 0; k < strengths.size(); ++k) {
        TORCH_CHECK(strengths[k] >= 0 && strengths[k] <= 1, "Balancer::end_epoch: ", policy_type(),
                    " re-initializes branch ", k, " with strength ", strengths[k],
                    "; strengths are in [0, 1]");
      }
    });
    const at::NoGradGuard no_grad;
    for (std::size_t k = 0; k < strengths.size(); ++k) {
      if (strengths[k] == 0) continue;
      for (std::size_t i = 0; i < branch_parameters_[k].size(); ++i) {
        at::Tensor p = branch_parameters_[k][i];
        p.mul_(1.0 - strengths[k]).add_(initial_branch_parameters_[k][i], strengths[k]);
        detail::reset_optimizer_state(optimizer, p);
      }
    }
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
                                 epochs_done_after_warmup()};
        advance_epoch([&] { policy_.observe_epoch_losses(losses); });
        return;
      }
    }
    advance_epoch();
  }

 private:
  // Moves to the next epoch. What the policy takes from the ending epoch (`take`: its
  // losses, if measured) and its start_epoch hook for the next one, if after warm-up, are
  // one decision made before the counters move: if either throws, nothing has changed.
  template <class Take = void (*)()>
  void advance_epoch(Take&& take = [] {}) {
    ask_policy([&] {
      take();
      if constexpr (HasEpochHook<Policy>) {
        const std::int64_t next = epoch_ + 1;
        if (next >= options_.warmup_epochs()) policy_.start_epoch(next - options_.warmup_epochs());
      }
    });
    ++epoch_;
    std::fill(epoch_counts_.begin(), epoch_counts_.end(), 0);
  }

  // Epochs after warm-up done at the end of the current epoch (0 at the end of warm-up,
  // negative before).
  std::int64_t epochs_done_after_warmup() const { return epoch_ + 1 - options_.warmup_epochs(); }

  // Whether the policy measures at the end of the current epoch.
  bool measures_at_epoch_end() const {
    const std::int64_t done = epochs_done_after_warmup();
    if constexpr (ObservesEpochLosses<Policy>) return done >= 0 && policy_.wants_epoch_losses(done);
    return false;
  }

 public:
  bool in_warmup() const { return epoch_ < options_.warmup_epochs(); }
  std::int64_t epoch() const { return epoch_; }
  std::int64_t step() const { return step_; }
  /// The network's number of branches.
  std::size_t branches() const { return meter_.num_groups() / 2; }

  /// Steps per plan, this epoch and in all: [regular, branch 0 held, ..., branch N-1 held]
  /// (for two branches the `StepKind` order).
  const std::vector<std::int64_t>& epoch_plan_counts() const { return epoch_counts_; }
  const std::vector<std::int64_t>& total_plan_counts() const { return total_counts_; }
  /// The same per `StepKind` (two branches).
  StepCounts epoch_step_counts() const { return step_counts(epoch_counts_); }
  StepCounts total_step_counts() const { return step_counts(total_counts_); }

  /// The signed d_speed = s_0 - s_1 after the last regular step of a two-branch network, as
  /// last read to the host (NaN before any read; with check_every_step(false) and a policy
  /// that needs no value, call `speed()`). NaN for N >= 3 branches, which have no signed
  /// d_speed: read `last_speeds().spread`.
  double last_d_speed() const { return last_speed_.d_speed; }

  /// Every branch's s_k, their spread, the fastest branch (and for two branches d_speed)
  /// after the last regular step, as last read to the host (see `last_d_speed`).
  const SpeedSummary& last_speeds() const { return last_speed_; }

  /// Reads the accumulators now (one small read) and derives every branch's s_k, their
  /// spread, the fastest branch (and for two branches s(m1|m0), s(m0|m1), d_speed).
  SpeedSummary speed() const { return meter_.summary(); }

  /// Regular steps left out of the accumulators (only with check_every_step(false)).
  /// Reads one number from the device.
  std::int64_t skipped_steps() const { return meter_.skipped(); }

  const Policy& policy() const { return policy_; }
  const LearningSpeedMeter& meter() const { return meter_; }
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
    archive.write("accumulated", meter_.accumulated().to(at::kCPU));
    archive.write("group_numel", numel_tensor());
    archive.write("meter_steps", meter_.steps());
    archive.write("step", step_);
    archive.write("epoch", epoch_);
    archive.write("last_speeds", at::tensor(last_speed_.speeds, at::kDouble));
    archive.write("skipped", static_cast<std::int64_t>(skipped_steps()));
    archive.write("epoch_counts", counts_tensor(epoch_counts_));
    archive.write("total_counts", counts_tensor(total_counts_));
    archive.write("warmup_epochs", options_.warmup_epochs());
    archive.write("speed_read", static_cast<std::int64_t>(options_.speed_read()));
    if (lagged_pending_) {
      wait_for_lagged_copy();
      archive.write("lagged_accumulated", lagged_host_.clone());
    }
    if constexpr (HasState<Policy>) {
      torch::serialize::OutputArchive nested;
      policy_.save(nested);
      archive.write("policy", nested);
    }
    if constexpr (ReinitializesBranches<Policy>) {
      torch::serialize::OutputArchive initial;
      for (std::size_t k = 0; k < initial_branch_parameters_.size(); ++k) {
        for (std::size_t i = 0; i < initial_branch_parameters_[k].size(); ++i) {
          initial.write(initial_key(k, i), initial_branch_parameters_[k][i].to(at::kCPU));
        }
      }
      archive.write("initial_branch_parameters", initial);
    }
  }

  /// Restores a state written by `save`. Everything is read and checked first; on any
  /// error (another number of branches, another policy (by its `checkpoint_identity`; a
  /// record from before identities by its C++ type), other parameter groups,
  /// another warm-up, a policy whose options differ, a damaged record) it throws a
  /// c10::Error saying what differs, and changes nothing. A two-branch record of an earlier
  /// version (no branch count, the speeds as named numbers) loads too.
  void load(torch::serialize::InputArchive& archive) {
    const auto read_value = [&](const char* key) {
      c10::IValue v;
      TORCH_CHECK(archive.try_read(key, v), "Balancer::load: no '", key, "' in the balancer's record");
      return v;
    };
    const auto read_tensor = [&](const char* key) {
      at::Tensor t;
      TORCH_CHECK(archive.try_read(key, t), "Balancer::load: no '", key, "' in the balancer's record");
      return t.to(at::kCPU);  // a checkpoint is read onto the model's device
    };
    const auto read_int = [&](const char* key) {
      const c10::IValue v = read_value(key);
      TORCH_CHECK(v.isInt(), "Balancer::load: '", key, "' is not an integer");
      return v.toInt();
    };
    const auto read_double = [&](const char* key) {
      const c10::IValue v = read_value(key);
      TORCH_CHECK(v.isDouble(), "Balancer::load: '", key, "' is not a number");
      return v.toDouble();
    };
    c10::IValue saved_branches;
    const bool has_branches = archive.try_read("branches", saved_branches);
    const std::int64_t branch_count = has_branches && saved_branches.isInt() ? saved_branches.toInt() : 2;
    TORCH_CHECK(!has_branches || saved_branches.isInt(), "Balancer::load: 'branches' is not an integer");
    TORCH_CHECK(branch_count == static_cast<std::int64_t>(branches()), "Balancer::load: the "
                "checkpoint was made for a network of ", branch_count, " branches, this one has ",
                branches());
    const detail::SavedPolicyIdentity saved_policy = detail::read_policy_identity(archive);
    detail::check_policy_identity<Policy>(saved_policy);
    const at::Tensor numel = read_tensor("group_numel");
    TORCH_CHECK(numel.scalar_type() == at::kLong &&
                    numel.numel() == static_cast<std::int64_t>(meter_.num_groups()) &&
                    at::equal(numel.to(at::kLong), numel_tensor()),
                "Balancer::load: the checkpoint was made for parameter groups with ",
                numel_string(numel), " elements, this model's groups have ",
                numel_string(numel_tensor()));
    const std::int64_t warmup = read_int("warmup_epochs");
    TORCH_CHECK(warmup == options_.warmup_epochs(), "Balancer::load: the checkpoint was made "
                "with warmup_epochs ", warmup, ", this balancer has warmup_epochs ",
                options_.warmup_epochs(), "; resume with the options the run started with");
    const std::int64_t speed_read = read_int("speed_read");
    TORCH_CHECK(speed_read == static_cast<std::int64_t>(options_.speed_read()),
                "Balancer::load: the checkpoint was made with speed_read ",
                speed_read == 0 ? "same_step" : "previous_step", ", this balancer has ",
                options_.speed_read() == SpeedRead::same_step ? "same_step" : "previous_step",
                "; resume with the options the run started with");
    const at::Tensor accumulated = read_tensor("accumulated");
    TORCH_CHECK(accumulated.dim() == 1 && accumulated.is_floating_point() &&
                    accumulated.numel() == static_cast<std::int64_t>(meter_.num_groups()),
                "Balancer::load: accumulators must have ", meter_.num_groups(), " entries, got ",
                detail::shape_string(accumulated));
    const std::vector<std::int64_t> epoch_counts = counts_vector(read_tensor("epoch_counts"));
    const std::vector<std::int64_t> total_counts = counts_vector(read_tensor("total_counts"));
    const std::int64_t meter_steps = read_int("meter_steps");
    const std::int64_t skipped = read_int("skipped");
    const std::int64_t step = read_int("step");
    const std::int64_t epoch = read_int("epoch");
    TORCH_CHECK(step >= 0 && epoch >= 0 && meter_steps >= 0 && skipped >= 0,
                "Balancer::load: negative counters (step ", step, ", epoch ", epoch, ")");
    std::vector<double> last_speeds;
    if (has_branches) {
      const at::Tensor t = read_tensor("last_speeds");
      TORCH_CHECK(t.dim() == 1 && t.numel() == branch_count && t.is_floating_point(),
                  "Balancer::load: 'last_speeds' must hold ", branch_count, " numbers, got ",
                  detail::shape_string(t));
      const at::Tensor c = t.to(at::kDouble).contiguous();
      last_speeds.assign(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    } else {
      last_speeds = {read_double("s_m1_given_m0"), read_double("s_m0_given_m1")};
    }
    at::Tensor lagged;
    const bool lagged_pending = archive.try_read("lagged_accumulated", lagged);
    TORCH_CHECK(!lagged_pending || (lagged.dim() == 1 && lagged.is_floating_point() &&
                                    lagged.numel() == static_cast<std::int64_t>(meter_.num_groups())),
                "Balancer::load: the pending speeds record must hold ", meter_.num_groups(),
                " numbers, got ", detail::shape_string(lagged));
    TORCH_CHECK(!lagged_pending || options_.speed_read() == SpeedRead::previous_step,
                "Balancer::load: the record holds speeds pending for SpeedRead::previous_step, "
                "this balancer reads them with same_step");
    if (lagged_pending) lagged = lagged.to(at::kCPU, at::kDouble).contiguous();
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

    std::vector<std::vector<at::Tensor>> initial = initial_branch_parameters_;
    if constexpr (ReinitializesBranches<Policy>) {
      torch::serialize::InputArchive nested;
      TORCH_CHECK(archive.try_read("initial_branch_parameters", nested),
                  "Balancer::load: no initial branch parameters (the policy re-initializes branches)");
      for (std::size_t k = 0; k < initial.size(); ++k) {
        for (std::size_t i = 0; i < initial[k].size(); ++i) {
          at::Tensor t;
          TORCH_CHECK(nested.try_read(initial_key(k, i), t) && t.sizes() == initial[k][i].sizes() &&
                          t.scalar_type() == initial[k][i].scalar_type(),
                      "Balancer::load: initial parameter ", i, " of branch ", k, " is missing or is not ",
                      detail::shape_string(initial[k][i]), " ", initial[k][i].scalar_type());
          initial[k][i] = t.to(initial[k][i].device());
        }
      }
    }

    // All read and checked: commit.
    meter_.restore(accumulated, meter_steps, skipped);
    step_ = step;
    epoch_ = epoch;
    last_speed_ = SpeedSummary::from_speeds(std::move(last_speeds));
    epoch_counts_ = epoch_counts;
    total_counts_ = total_counts;
    lagged_pending_ = lagged_pending;
    if (lagged_pending_) {
      lagged_host_ = lagged;
      lagged_event_.reset();
    }
    policy_ = std::move(policy);
    initial_branch_parameters_ = std::move(initial);
    pending_.reset();
    release_step_outputs();
  }

 private:
  at::Tensor form_loss(const NetOutput& out, const at::Tensor& target, const std::vector<at::Tensor>* inputs,
                       double scale) {
    TORCH_CHECK(pending_, "Balancer::loss: call next_step() or next_plan() before the forward pass");
    TORCH_CHECK(out.heads.size() == branches(), "Balancer::loss: the output has ", out.heads.size(),
                " heads, the network ", branches(), " branches");
    TORCH_CHECK(std::isfinite(scale) && scale > 0, "Balancer::loss: scale must be a finite number > 0, got ", scale);
    if constexpr (NeedsMaskedOutputs<Policy>) check_inputs(*inputs, target);  // only overloads with inputs
    at::Tensor total, weights;
    if constexpr (WeighsSamples<Policy>) {
      if (!in_warmup()) weights = sample_weights(out, target);
    }
    if constexpr (WeighsLosses<Policy>) {
      if (!in_warmup()) total = weighted_loss(out, target, weights);
    }
    if (!total.defined()) {
      if (weights.defined()) {
        for (const at::Tensor& head : out.heads) {
          const at::Tensor term = cross_entropy(head, target, weights);
          total = total.defined() ? total + term : term;
        }
      } else {
        total = modality_specific_loss(out, target);
      }
    }
    if constexpr (AddsAuxiliaryLoss<Policy>) {
      if (!in_warmup()) total = with_auxiliary_loss(total, out, target);
    }
    if constexpr (kFormsLoss) {
      // Staged, then committed: a throw (e.g. out of memory) leaves the step's earlier calls.
      std::vector<at::Tensor> heads;
      for (std::size_t k = 0; k < out.heads.size(); ++k) {
        const at::Tensor h = out.heads[k].detach();
        heads.push_back(staged_heads_.empty() ? h : at::cat({staged_heads_[k], h}));
      }
      at::Tensor targets = staged_heads_.empty() ? target : at::cat({staged_target_, target});
      std::vector<std::vector<at::Tensor>> fused;
      if constexpr (NeedsFusedGradients<Policy>) {
        if (!in_warmup()) fused = accumulated_fused_gradients(out, target, scale);
      }
      std::vector<at::Tensor> subsets;
      if constexpr (NeedsMaskedOutputs<Policy>) {
        if (!in_warmup()) subsets = accumulated_subset_outputs(out, *inputs);
      }
      staged_heads_ = std::move(heads);
      staged_target_ = std::move(targets);
      staged_fused_gradients_ = std::move(fused);
      staged_subset_outputs_ = std::move(subsets);
    }
    return scale == 1.0 ? total : total * scale;
  }

  // The inputs a masking policy runs the network on: one per branch, a row per target.
  void check_inputs(const std::vector<at::Tensor>& inputs, const at::Tensor& target) const {
    TORCH_CHECK(inputs.size() == branches(), "Balancer::loss: ", inputs.size(), " inputs for a "
                "network of ", branches(), " branches");
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      TORCH_CHECK(inputs[k].defined() && inputs[k].dim() >= 1 && target.defined() && target.dim() >= 1 &&
                      inputs[k].size(0) == target.size(0),
                  "Balancer::loss: input ", k, " is ", detail::shape_string(inputs[k]), ", the targets ",
                  detail::shape_string(target), "; every input needs a row per target");
    }
  }

  // The network's fused output y with the modalities of every proper non-empty subset
  // present (bit mask s; the others' inputs zeroed), for a policy's masked passes: eval
  // mode (every submodule's own mode restored after), no gradient, a regular plan.
  template <class Net>
  static std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> masked_forward(Net net) {
    return [net](const std::vector<at::Tensor>& x) mutable {
      EvalModeGuard<Net> eval(net);
      std::vector<at::Tensor> zeros;
      for (const at::Tensor& t : x) zeros.push_back(at::zeros_like(t));
      const std::size_t all = (std::size_t{1} << x.size()) - 1;
      std::vector<at::Tensor> v(all + 1);
      for (std::size_t s = 1; s < all; ++s) {
        std::vector<at::Tensor> masked;
        for (std::size_t k = 0; k < x.size(); ++k) masked.push_back(s >> k & 1 ? x[k] : zeros[k]);
        v[s] = net->forward(masked, StepPlan::regular()).y;
      }
      return v;
    };
  }

  // The step's staged masked outputs with this call's rows appended: y with the modalities
  // of each bit mask present (0: not run; all: the step's own y).
  std::vector<at::Tensor> accumulated_subset_outputs(const NetOutput& out, const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor> v = masked_forward_(inputs);
    v.back() = out.y.detach();
    if (!staged_subset_outputs_.empty()) {
      for (std::size_t s = 1; s < v.size(); ++s) v[s] = at::cat({staged_subset_outputs_[s], v[s]});
    }
    return v;
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
    if (const auto k = plan.modulated_branch()) {
      const double keep = plan.keep_probability(), scale = plan.feature_scale();
      if (*k >= branches() || !(keep >= 0 && keep <= 1) || !std::isfinite(scale)) {
        policy_ = policy_before_step_;
        TORCH_CHECK(false, "Balancer: the policy modulates branch ", *k, "'s features (kept with "
                    "probability ", keep, ", scaled by ", scale, "); the network has branches 0..",
                    branches() - 1, ", and a probability in [0, 1] and a finite scale are needed");
      }
    }
    if (plan.is_regular()) return;
    if (*plan.held_branch() >= branches()) {
      policy_ = policy_before_step_;
      TORCH_CHECK(false, "Balancer: the policy holds branch ", *plan.held_branch(),
                  ", the network has ", branches(), " branches (0..", branches() - 1, ")");
    }
    if (gate_means_.empty()) {
      policy_ = policy_before_step_;
      TORCH_CHECK(false, "Balancer: the policy holds branch ", *plan.held_branch(), ", a "
                  "re-balancing step, and this network has no fusion modules whose gates it "
                  "could hold (late fusion)");
    }
  }

  // CE(logits, target) averaged over the batch, each row weighted when `weights` is defined.
  static at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weights) {
    if (!weights.defined()) return at::cross_entropy_loss(logits, target);
    return (at::cross_entropy_loss(logits, target, {}, at::Reduction::None) * weights).mean();
  }

  // The policy's per-row weights, checked: one finite weight >= 0 per row, on the output's
  // device (the check reads nothing to the host but with checks on).
  at::Tensor sample_weights(const NetOutput& out, const at::Tensor& target) const {
    at::Tensor w = policy_.sample_weights(out, target);
    if (!w.defined()) return w;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == target.size(0) && at::isFloatingType(w.scalar_type()),
                "Balancer::loss: ", policy_type(), "'s sample weights must be one floating-point "
                "number per row of the batch (", target.size(0), "), got ", w.scalar_type(), " ",
                detail::shape_string(w));
    TORCH_CHECK(w.device() == out.y.device(), "Balancer::loss: ", policy_type(), "'s sample weights "
                "are on ", w.device(), ", the step's output on ", out.y.device());
    if (options_.check_every_step()) {
      TORCH_CHECK(at::isfinite(w).all().item<bool>() && (w >= 0).all().item<bool>(), "Balancer::loss: ",
                  policy_type(), "'s sample weights must be finite and >= 0");
    }
    return w.detach();
  }

  // Σ_k w_k·CE(head_k) + w_y·CE(y) with the policy's weights (host numbers: no read), each
  // CE over rows weighted by `sample_weights` where given.
  at::Tensor weighted_loss(const NetOutput& out, const at::Tensor& target, const at::Tensor& sample_weights) const {
    const LossWeights w = policy_.loss_weights();
    TORCH_CHECK(w.heads.size() == branches(), "Balancer::loss: ", policy_type(), " weighs ",
                w.heads.size(), " heads, the network has ", branches());
    TORCH_CHECK(target.dim() == 1 && out.heads[0].defined() && target.size(0) == out.heads[0].size(0),
                "Balancer::loss: target must be (batch) class indices with batch ",
                out.heads[0].defined() ? out.heads[0].size(0) : std::int64_t{0}, ", got ",
                detail::shape_string(target));
    // Terms of weight 0 are left out: no work, and an infinite loss there does not make
    // the sum NaN (0·inf).
    at::Tensor total;
    const auto add = [&](const at::Tensor& logits, double weight) {
      if (weight == 0) return;
      const at::Tensor term = cross_entropy(logits, target, sample_weights) * weight;
      total = total.defined() ? total + term : term;
    };
    for (std::size_t k = 0; k < out.heads.size(); ++k) add(out.heads[k], w.heads[k]);
    add(out.y, w.fused);
    TORCH_CHECK(total.defined(), "Balancer::loss: ", policy_type(), " weighs every loss 0");
    return total;
  }

  // The loss plus the policy's own term (`AddsAuxiliaryLoss`), which must be a scalar on
  // the loss's device and, when the loss carries a gradient, carry one too.
  at::Tensor with_auxiliary_loss(const at::Tensor& total, const NetOutput& out, const at::Tensor& target) const {
    const at::Tensor term = policy_.auxiliary_loss(out, target);
    if (!term.defined()) return total;
    TORCH_CHECK(term.numel() == 1 && at::isFloatingType(term.scalar_type()), "Balancer::loss: ", policy_type(),
                "'s auxiliary loss must be a floating-point scalar, got ", term.scalar_type(), " ",
                detail::shape_string(term));
    TORCH_CHECK(term.device() == total.device(), "Balancer::loss: ", policy_type(), "'s auxiliary loss is on ",
                term.device(), ", the step's loss on ", total.device());
    TORCH_CHECK(term.requires_grad() || !total.requires_grad(), "Balancer::loss: ", policy_type(),
                "'s auxiliary loss carries no gradient while the output does (computed from detached "
                "tensors?): it would change the loss's value and train nothing");
    return total + term.reshape({}).to(total.scalar_type());
  }

  // Asks the policy for the coming step's plan (regular in warm-up), refuses a plan the
  // network cannot run, and starts the step: drops gates staged outside a step.
  StepPlan begin_step(const char* caller) {
    check_observed(caller);
    const StepPlan plan = ask_policy([&] { return in_warmup() ? StepPlan::regular() : policy_.next_plan(); });
    check_plan(plan);
    for (auto& m : gate_means_) m->drop();
    release_step_outputs();
    pending_ = plan;
    return plan;
  }

  // The outputs `loss()` kept for the gradient hook belong to one step.
  void release_step_outputs() {
    staged_heads_.clear();
    staged_target_ = at::Tensor();
    staged_fused_gradients_.clear();
    staged_subset_outputs_.clear();
  }

  // The step's staged fused gradients plus ∂(scale·CE(y, target))/∂θ_k (several loss()
  // calls in one step: accumulated micro-batches, as backward() adds their gradients up).
  std::vector<std::vector<at::Tensor>> accumulated_fused_gradients(const NetOutput& out, const at::Tensor& target,
                                                                   double scale) const {
    std::vector<std::vector<at::Tensor>> sum = fused_gradients(out, target, scale);
    if (staged_fused_gradients_.empty()) return sum;
    for (std::size_t k = 0; k < sum.size(); ++k) {
      for (std::size_t i = 0; i < sum[k].size(); ++i) {
        if (sum[k][i].defined()) sum[k][i] = sum[k][i] + staged_fused_gradients_[k][i];
      }
    }
    return sum;
  }

  // ∂(scale·CE(y, target))/∂θ_k for every branch parameter that requires a gradient
  // (undefined for the others; zeros for one the fused output does not reach), the graph kept.
  std::vector<std::vector<at::Tensor>> fused_gradients(const NetOutput& out, const at::Tensor& target,
                                                       double scale) const {
    TORCH_CHECK(out.y.defined() && out.y.requires_grad(), "Balancer::loss: ", policy_type(),
                " needs the gradient of the fused output's loss, and the output does not "
                "require a gradient (computed under NoGradGuard, or every parameter frozen?)");
    std::vector<at::Tensor> inputs;
    for (const auto& group : branch_parameters_) {
      for (const at::Tensor& p : group) {
        if (p.requires_grad()) inputs.push_back(p);
      }
    }
    const at::Tensor fused = scale == 1.0 ? at::cross_entropy_loss(out.y, target)
                                          : at::cross_entropy_loss(out.y, target) * scale;
    const std::vector<at::Tensor> grads =
        inputs.empty() ? std::vector<at::Tensor>{}
                       : torch::autograd::grad({fused}, inputs, {}, /*retain_graph=*/true,
                                               /*create_graph=*/false, /*allow_unused=*/true);
    std::vector<std::vector<at::Tensor>> result(branch_parameters_.size());
    std::size_t next = 0;
    for (std::size_t k = 0; k < branch_parameters_.size(); ++k) {
      for (const at::Tensor& p : branch_parameters_[k]) {
        if (!p.requires_grad()) {
          result[k].emplace_back();
          continue;
        }
        const at::Tensor& g = grads[next++];
        result[k].push_back(g.defined() ? g : at::zeros_like(p));
      }
    }
    return result;
  }

  // Feeds the meter, running `modulate` once the raw gradients are measured (and checked)
  // and before the meter changes; returns, with checks off, the device flag of whether the
  // step was valid (undefined with checks on: an invalid step has thrown).
  template <class Modulate>
  at::Tensor observe_regular(const at::Tensor& loss, Modulate&& modulate) {
    const at::Tensor measurement = meter_.measure();
    const at::Tensor mu = LearningSpeedMeter::speeds(measurement);
    if (options_.check_every_step()) {
      // One read carries the loss, the squared norms and M + μ, which is what the
      // accumulators become if the step is accepted.
      const at::Tensor next = meter_.accumulated() + mu;
      const at::Tensor host =
          at::cat({loss.detach().reshape({1}).to(at::kDouble), measurement.flatten(), next})
              .to(at::kCPU);
      const double* v = host.data_ptr<double>();
      const std::size_t groups = meter_.num_groups();
      check_step(v[0], v + 1, v + 1 + groups, v + 1 + 2 * groups);
      modulate();
      meter_.accumulate(mu);
      record_speed(v + 1 + 2 * groups);
      return {};
    }
    const at::Tensor valid = at::isfinite(mu).all().logical_and(at::isfinite(loss.detach()));
    modulate();
    meter_.accumulate_if(mu, valid);
    if constexpr (kObservesSpeeds) {
      if (in_warmup()) return valid;
      if (options_.speed_read() == SpeedRead::previous_step) {
        launch_speed_copy();
      } else {
        const at::Tensor host = meter_.accumulated().to(at::kCPU);
        record_speed(host.data_ptr<double>());
      }
    }
    return valid;
  }

  // SpeedRead::previous_step: start copying M to the host; the copy is queued behind this
  // step's work and read when the next step is observed.
  void launch_speed_copy() {
    const at::Tensor& m = meter_.accumulated();
    // Pinned for a device meter, so the copy does not wait: also after a resume (load()
    // leaves pageable memory) or a move of the model to the device.
    if (!lagged_host_.defined() || (m.is_cuda() && !lagged_host_.is_pinned())) {
      lagged_host_ = at::empty({static_cast<std::int64_t>(meter_.num_groups())}, at::TensorOptions(at::kDouble).pinned_memory(m.is_cuda()));
    }
    lagged_host_.copy_(m, /*non_blocking=*/true);
    lagged_event_.reset();
    if (!m.is_cpu()) {
      lagged_event_.emplace(m.device().type());
      const c10::impl::VirtualGuardImpl guard(m.device().type());
      lagged_event_->record(guard.getStream(m.device()));
    }
    lagged_pending_ = true;
  }

  // Polled, on every LibTorch: 1.13's c10::Event has no blocking wait, and polling is not a
  // device synchronisation. By the time this runs the copy has landed.
  void wait_for_lagged_copy() const {
    if (!lagged_event_) return;
    while (!lagged_event_->query()) std::this_thread::yield();
  }

  // Hands the policy the speeds whose copy was started one step ago, unless the step
  // being observed is re-balancing: the policy has opened a window since, and a speed
  // measured before it must neither restart nor turn it. Waiting on the copy's event
  // costs nothing by now: a whole step was queued after it.
  void deliver_lagged_speed(const StepPlan& observed) {
    if (!lagged_pending_) return;
    wait_for_lagged_copy();
    lagged_pending_ = false;
    record_speed(lagged_host_.data_ptr<double>(), observed.is_regular());
  }

  // A re-balancing step feeds no accumulator, but a NaN gradient it let through would be
  // written into the parameters by the optimizer and stall every later step.
  void check_rebalancing_step(const at::Tensor& loss, const StepPlan& plan) {
    const at::Tensor host =
        at::cat({loss.detach().reshape({1}).to(at::kDouble), meter_.measure_gradients()}).to(at::kCPU);
    const double* v = host.data_ptr<double>();
    TORCH_CHECK(std::isfinite(v[0]), "Balancer: non-finite loss ", v[0], " in step ", step_,
                " (", to_string(plan), ")");
    for (std::size_t g = 0; g < meter_.num_groups(); ++g) {
      TORCH_CHECK(std::isfinite(v[1 + g]), "Balancer: non-finite gradient in group ",
                  meter_.group_name(g), " (squared norm ", v[1 + g], ") in step ", step_, " (",
                  to_string(plan), ")");
    }
  }

  void check_step(double loss, const double* grad_sq, const double* param_sq,
                  const double* next) const {
    TORCH_CHECK(std::isfinite(loss), "Balancer: non-finite loss ", loss, " in step ", step_,
                " (regular)");
    // A late-fusion network's fusion groups are empty: nothing there to check.
    const std::size_t checked = meter_.late_fusion() ? branches() : meter_.num_groups();
    for (std::size_t g = 0; g < checked; ++g) {
      const std::string group = meter_.group_name(g);
      TORCH_CHECK(std::isfinite(grad_sq[g]), "Balancer: non-finite gradient in group ", group,
                  " (squared norm ", grad_sq[g], ") in step ", step_);
      TORCH_CHECK(std::isfinite(param_sq[g]) && param_sq[g] > 0, "Balancer: parameter group ",
                  group, " has squared norm ", param_sq[g],
                  "; the learning speed ||G||^2/||theta||^2 is undefined. Initialise it "
                  "with non-zero values.");
      TORCH_CHECK(next[g] > 0, "Balancer: parameter group ", group,
                  " has had a zero gradient in every regular step so far (is it frozen, or "
                  "cut off from the loss?); its learning speed is 0 and the speeds would be "
                  "infinite. Every group must learn: unfreeze it, or train without a balancer.");
    }
  }

  void record_speed(const double* m, bool to_policy = true) {
    last_speed_ = SpeedSummary::from_accumulators({m, m + meter_.num_groups()});
    // Undefined speeds (NaN: a group that never had a gradient, checks off) are not a
    // measurement; the policy goes on as if nothing had been measured.
    if (!to_policy || in_warmup() || !std::isfinite(last_speed_.spread)) return;
    if constexpr (ObservesSpeeds<Policy>) policy_.observe_speeds(last_speed_);
  }

  // Regular: 0; branch k held: 1 + k (for two branches the `StepKind` values).
  static std::size_t plan_index(const StepPlan& plan) {
    return plan.is_regular() ? 0 : 1 + *plan.held_branch();
  }

  at::Tensor numel_tensor() const {
    const auto& n = meter_.group_numel();
    return at::tensor(std::vector<std::int64_t>(n.begin(), n.end()), at::kLong);
  }
  static std::string numel_string(const at::Tensor& t) {
    if (t.scalar_type() != at::kLong) return "(not integers: " + detail::shape_string(t) + ")";
    std::string s = "[";
    const at::Tensor c = t.to(at::kLong).contiguous();
    for (std::int64_t i = 0; i < c.numel(); ++i)
      s += (i ? ", " : "") + std::to_string(c.data_ptr<std::int64_t>()[i]);
    return s + "]";
  }
  static at::Tensor counts_tensor(const std::vector<std::int64_t>& c) {
    return at::tensor(c, at::kLong);
  }
  static std::string policy_type() { return c10::demangle(typeid(Policy).name()); }
  static std::string initial_key(std::size_t branch, std::size_t parameter) {
    return "b" + std::to_string(branch) + "_p" + std::to_string(parameter);
  }
  std::vector<std::int64_t> counts_vector(const at::Tensor& t) const {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong &&
                    t.numel() == static_cast<std::int64_t>(branches() + 1),
                "Balancer::load: step counts in checkpoint must be ", branches() + 1,
                " integers (regular, then each branch held), got ", detail::shape_string(t));
    const at::Tensor c = t.to(at::kLong).contiguous();
    std::vector<std::int64_t> out(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
    TORCH_CHECK(std::all_of(out.begin(), out.end(), [](std::int64_t n) { return n >= 0; }),
                "Balancer::load: negative step counts in checkpoint");
    return out;
  }
  StepCounts step_counts(const std::vector<std::int64_t>& counts) const {
    TORCH_CHECK(branches() == 2, "Balancer: step counts per StepKind are for two branches, "
                "this network has ", branches(), "; use epoch_plan_counts()/total_plan_counts()");
    return {counts[0], counts[1], counts[2]};
  }

  static constexpr bool kObservesSpeeds = ObservesSpeeds<Policy>;
  // Policies that need the loss formed by `loss()` (and the step's outputs it stages).
  static constexpr bool kFormsLoss =
      ModulatesGradients<Policy> || WeighsLosses<Policy> || AddsAuxiliaryLoss<Policy> || WeighsSamples<Policy>;

  BalancerOptions options_;
  Policy policy_;
  Policy policy_before_step_ = policy_;
  LearningSpeedMeter meter_;
  std::vector<std::vector<at::Tensor>> branch_parameters_;  // θ_k, for the gradient hook
  std::vector<RunningMean> gate_means_;
  // The step's detached heads and targets, from loss(), for a gradient-modulating policy.
  std::vector<at::Tensor> staged_heads_;
  at::Tensor staged_target_;
  // ∂CE(y)/∂θ_k of the step, for a policy that `NeedsFusedGradients` (after warm-up).
  std::vector<std::vector<at::Tensor>> staged_fused_gradients_;
  // y with modalities masked, for a policy that `NeedsMaskedOutputs` (after warm-up).
  std::vector<at::Tensor> staged_subset_outputs_;
  // θ_k as the balancer found them, for a policy that re-initializes branches.
  std::vector<std::vector<at::Tensor>> initial_branch_parameters_;
  // Runs the network for those masked passes (only for such a policy).
  std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> masked_forward_;
  std::optional<StepPlan> pending_;
  std::int64_t step_ = 0;
  std::int64_t epoch_ = 0;
  std::vector<std::int64_t> epoch_counts_;  // per plan, see plan_index
  std::vector<std::int64_t> total_counts_;
  SpeedSummary last_speed_ = SpeedSummary::from_speeds(std::vector<double>(branches(), NAN));
  // SpeedRead::previous_step: M copied to the host, not yet handed to the policy.
  at::Tensor lagged_host_;
  std::optional<c10::Event> lagged_event_;
  bool lagged_pending_ = false;
};

}  // namespace mmbalance
