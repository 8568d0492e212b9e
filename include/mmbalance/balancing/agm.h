#pragma once
/// \file
/// AGM (Li et al., "Boosting multi-modal model performance with adaptive gradient
/// modulation", ICCV 2023) as a policy: each branch's gradients are scaled by a
/// coefficient that pulls the gap between its mono-modal response's loss and the other
/// branches' back towards its running mean. The mono-modal responses are Shapley values of
/// the fused output over masked forward passes. docs/policies.md gives the rule and where
/// it differs from the original code.

#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/masked_outputs.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options of `AGMPolicy`.
///
/// Example:
/// ```
/// Balancer<AGMPolicy> balancer(net, AGMPolicy(AGMOptions().alpha(0.1)),
///                              BalancerOptions().warmup_epochs(0));
/// ```
struct AGMOptions {
  /// Strength of the modulation, >= 0 (0: every coefficient is 1). The original's
  /// CREMA-D runs and the public collection use 0.1.
  TORCH_ARG(double, alpha) = 0.1;
  /// The cap on r̄ − r in the coefficient exp(α·min(r̄ − r, max_gap)), > 0 (the original:
  /// 10; the public collection: 7).
  TORCH_ARG(double, max_gap) = 10.0;
  /// Which parameters of each branch are scaled (the public collection: every parameter
  /// of a modality's encoder whose gradient is not 1-d, i.e. no biases or norm scales).
  TORCH_ARG(ModulatedParameters, parameters) = ModulatedParameters::non_bias;
};

/// Adaptive gradient modulation for N branches (2 to `kMaxBranches`). After warm-up the
/// balancer's loss is the fused output's CE alone (the original trains the fused output;
/// in warm-up too), and `Balancer::loss(out, target, inputs)` runs the network on 2^N − 2
/// masked copies of the batch (eval mode, no gradient, the absent modalities' inputs
/// zeroed, the original's padding; stacked along the rows into passes of up to
/// `BalancerOptions::masked_rows_per_pass` rows) whose fused
/// outputs v(S) give each branch's mono-modal response, the Shapley value
///   φ_m = Σ_{S ⊆ others} |S|!(N − |S| − 1)!/N! · (v(S ∪ {m}) − v(S)),  v(∅) = 0,
/// v(all) = the step's own fused output. Then, per step:
/// - scores s_m = mean over rows of −log softmax(φ_m)[y], each capped at −log 1e-8;
/// - discrepancy ratios r_m = exp(N/(N−1) · (s̄ − s_m)) (s̄: the mean over branches; for
///   two branches exp(s_other − s_m), the original's);
/// - the same from the running means ŝ_m of the scores: r̄_m = exp(N/(N−1) · (mean ŝ − ŝ_m));
/// - coefficients k_m = exp(α · min(r̄_m − r_m, max_gap)); each selected gradient of
///   branch m becomes k_m · g;
/// - ŝ_m ← ŝ_m·(t − 1)/t + s_m/t over the t steps modulated so far (ŝ = 0 before the first).
/// A branch that pulls ahead of its usual lead is slowed, one that falls behind sped up.
/// k ≤ exp(α·max_gap), so α·max_gap ≤ `kMaxExponent` keeps k finite in float
/// (`kMaxHalfExponent` in half); k may
/// underflow to 0 (a branch far ahead of its usual lead gets no update that step, as in
/// the original). Computed on the device without a host read. A step whose scores are not finite is
/// left as it is (k = 1), does not move the running means and is counted in
/// `skipped_steps()`. Data-parallel: the scores' sums and row counts are added up over the
/// ranks, so every rank computes the same coefficients.
class AGMPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.agm", 1};
  /// A copy is a snapshot to roll back to (its tensors are replaced, never changed in place).
  static constexpr bool copy_is_snapshot = true;
  static constexpr bool needs_masked_outputs = true;
  /// 2^N − 2 masked copies of the batch per step: beyond this many branches that is absurd.
  static constexpr std::size_t kMaxBranches = 12;
  /// The largest α·max_gap: exp(80) ≈ 5.5e34 is finite in float and bfloat16.
  static constexpr double kMaxExponent = 80;
  /// The largest α·max_gap for half-precision gradients: log(65504), half's largest
  /// number (the hook refuses half gradients beyond it, before touching anything).
  static constexpr double kMaxHalfExponent = 11.0896;

  explicit AGMPolicy(const AGMOptions& options = {}) : options(options) {
    TORCH_CHECK(std::isfinite(options.alpha()) && options.alpha() >= 0,
                "AGMPolicy: alpha must be a finite number >= 0, got ", options.alpha());
    TORCH_CHECK(std::isfinite(options.max_gap()) && options.max_gap() > 0,
                "AGMPolicy: max_gap must be a finite number > 0, got ", options.max_gap());
    TORCH_CHECK(options.alpha() * options.max_gap() <= kMaxExponent, "AGMPolicy: alpha * max_gap must be <= ",
                kMaxExponent, " (the coefficient exp(alpha * max_gap) would overflow), got alpha ",
                options.alpha(), " and max_gap ", options.max_gap());
    TORCH_CHECK(to_string(options.parameters()) != "invalid", "AGMPolicy: parameters must be "
                "conv_weights, non_bias or all, got the value ", static_cast<int>(options.parameters()));
  }

  /// The network's branch count (the `Balancer` calls it): 2 to `kMaxBranches`, and the
  /// count the policy's state is for if it has one.
  void set_branches(std::size_t branches) {
    TORCH_CHECK(branches >= 2 && branches <= kMaxBranches, "AGMPolicy: needs 2 to ", kMaxBranches,
                " branches (it runs the network on 2^N - 2 masked copies of the batch per step), got ", branches);
    TORCH_CHECK(branches_ == 0 || branches_ == branches, "AGMPolicy: the policy was made for ",
                branches_, " branches, the network has ", branches);
    branches_ = branches;
  }

  StepPlan next_plan() const { return StepPlan::regular(); }

  /// The fused output's loss alone, as the original trains (warm-up included).
  static constexpr Objective objective = Objective::fused;

  /// Each branch's mono-modal response (Shapley value) from `subset_outputs`, indexed by
  /// the bit mask of the modalities present: [2^N − 1] is the full output, [0] (nothing
  /// present) is not read, v(∅) = 0. Each response is (rows, classes), in at least float.
  static std::vector<at::Tensor> mono_modal_responses(const std::vector<at::Tensor>& subset_outputs) {
    const std::size_t subsets = subset_outputs.size();
    std::size_t n = 0;
    while ((std::size_t{1} << n) < subsets) ++n;
    TORCH_CHECK(n >= 2 && (std::size_t{1} << n) == subsets, "AGMPolicy: the outputs of ", subsets,
                " subsets are not those of every subset of 2 or more modalities (2^N)");
    const at::Tensor& full = subset_outputs[subsets - 1];
    for (std::size_t s = 1; s < subsets; ++s) {
      const at::Tensor& v = subset_outputs[s];
      TORCH_CHECK(v.defined() && v.dim() == 2 && v.sizes() == full.sizes(), "AGMPolicy: the output "
                  "with modalities ", s, " (bit mask) is ", detail::shape_string(v), ", the full one ",
                  detail::shape_string(full), "; every subset needs (rows, classes) logits");
    }
    // |S|!(N − |S| − 1)!/N! for |S| = 0 .. N − 1. Factorials up to 12! are exact in a
    // double; no std::lgamma, which writes the global signgam (a data race across threads).
    std::vector<double> factorial(n + 1, 1.0);
    for (std::size_t i = 1; i <= n; ++i) factorial[i] = factorial[i - 1] * static_cast<double>(i);
    std::vector<double> weight(n);
    for (std::size_t size = 0; size < n; ++size) weight[size] = factorial[size] * factorial[n - size - 1] / factorial[n];
    const auto value = [&](std::size_t s) { return subset_outputs[s].to(detail::at_least_float(subset_outputs[s])); };
    std::vector<at::Tensor> responses;
    for (std::size_t m = 0; m < n; ++m) {
      const std::size_t bit = std::size_t{1} << m;
      at::Tensor phi = value(bit) * weight[0];  // S = ∅: v({m}) − v(∅), v(∅) = 0
      for (std::size_t s = 1; s < subsets; ++s) {
        if (s & bit) continue;
        phi = phi + (value(s | bit) - value(s)) * weight[static_cast<std::size_t>(std::popcount(s))];
      }
      responses.push_back(phi);
    }
    return responses;
  }

  void modulate_gradients(const StepGradients& step) {
    TORCH_CHECK(step.branch_parameters.size() == branches_, "AGMPolicy: gradients of ",
                step.branch_parameters.size(), " branches for a policy of ", branches_);
    TORCH_CHECK(step.subset_outputs.size() == (std::size_t{1} << branches_), "AGMPolicy: needs the "
                "masked outputs of all ", std::size_t{1} << branches_, " subsets of ", branches_,
                " modalities, got ", step.subset_outputs.size(),
                " (form the loss with balancer.loss(out, target, inputs))");
    check_fits_half(step.branch_parameters);
    const std::vector<at::Tensor> responses = mono_modal_responses(step.subset_outputs);
    const at::Tensor& target = step.target;
    TORCH_CHECK(target.defined() && target.dim() == 1 && target.scalar_type() == at::kLong &&
                    target.size(0) == responses[0].size(0),
                "AGMPolicy: the targets must be a (batch) int64 tensor of class indices for the ",
                responses[0].size(0), " rows");

    // Σ_rows capped −log softmax(φ_m)[y] per branch, then the row count: summed over ranks.
    const double cap = -std::log(1e-8);
    std::vector<at::Tensor> sums;
    for (const at::Tensor& phi : responses) {
      const at::Tensor nll = -at::log_softmax(phi, 1).gather(1, target.unsqueeze(1));
      sums.push_back(at::clamp_max(nll, cap).to(at::kDouble).sum());
    }
    sums.push_back(at::full({}, static_cast<double>(target.size(0)), sums[0].options()));
    at::Tensor totals = at::stack(sums);
    if (step.sum_across_ranks) step.sum_across_ranks(totals);
    const at::Tensor scores = totals.narrow(0, 0, static_cast<std::int64_t>(branches_)) / totals[-1];

    // Zeros before the first step made where the scores are: no copy to the device.
    const at::Tensor running = running_scores_.defined() ? running_scores_.to(scores.device())
                                                         : at::zeros({static_cast<std::int64_t>(branches_)}, scores.options());
    const at::Tensor steps = steps_.defined() ? steps_.to(scores.device()) : at::zeros({}, scores.options().dtype(at::kLong));
    const at::Tensor skipped = skipped_.defined() ? skipped_.to(scores.device()) : at::zeros_like(steps);
    const double spread = static_cast<double>(branches_) / static_cast<double>(branches_ - 1);
    const at::Tensor ratio = at::exp((scores.mean() - scores) * spread);
    const at::Tensor usual = at::exp((running.mean() - running) * spread);
    const at::Tensor valid = at::isfinite(scores).all();
    const at::Tensor k = at::where(valid, at::exp(at::clamp_max(usual - ratio, options.max_gap()) * options.alpha()),
                                   at::ones_like(scores));
    const at::Tensor t = (steps + 1).to(at::kDouble);
    // Out of place, as copy_is_snapshot declares: a copy from before the step keeps its values.
    running_scores_ = at::where(valid, running * ((t - 1) / t) + scores / t, running);
    steps_ = steps + valid.to(at::kLong);
    skipped_ = skipped + (~valid).to(at::kLong);
    last_scores_ = scores;
    last_coefficients_ = k;

    std::vector<at::Tensor> per_dtype;  // k in one gradient dtype, converted once
    for (std::size_t m = 0; m < branches_; ++m) {
      for (const at::Tensor& p : step.branch_parameters[m]) {
        at::Tensor g = p.grad();
        if (!g.defined() || !is_modulated(p, options.parameters())) continue;
        if (per_dtype.empty() || per_dtype.front().scalar_type() != g.scalar_type() ||
            per_dtype.front().device() != g.device()) {
          per_dtype = {k.to(g.device(), g.scalar_type())};
        }
        g.mul_(per_dtype.front()[static_cast<std::int64_t>(m)]);
      }
    }
  }

  /// k_m of the last step (N doubles; undefined before one; not part of the saved state).
  const at::Tensor& last_coefficients() const { return last_coefficients_; }
  /// s_m of the last step (N doubles; undefined before one; not part of the saved state).
  const at::Tensor& last_scores() const { return last_scores_; }
  /// The running means ŝ_m of the scores (N doubles; zeros before the first step).
  at::Tensor running_scores() const {
    return running_scores_.defined() ? running_scores_ : at::zeros({static_cast<std::int64_t>(branches_)}, at::kDouble);
  }
  /// Steps that moved the running means (an int64 scalar on the gradients' device).
  at::Tensor modulated_steps() const { return steps_.defined() ? steps_ : at::zeros({}, at::kLong); }
  /// Steps left as they were because their scores were not finite (int64 scalar).
  at::Tensor skipped_steps() const { return skipped_.defined() ? skipped_ : at::zeros({}, at::kLong); }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("alpha", options.alpha());
    archive.write("max_gap", options.max_gap());
    archive.write("parameters", static_cast<std::int64_t>(options.parameters()));
    archive.write("running_scores", running_scores().to(at::kCPU));
    archive.write("steps", modulated_steps().to(at::kCPU));
    archive.write("skipped_steps", skipped_steps().to(at::kCPU));
  }

  /// Restores the running means and counts; other options or another branch count throw,
  /// naming both values, and change nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue alpha, max_gap, parameters;
    at::Tensor running, steps, skipped;
    TORCH_CHECK(archive.try_read("alpha", alpha) && alpha.isDouble() &&
                    archive.try_read("max_gap", max_gap) && max_gap.isDouble() &&
                    archive.try_read("parameters", parameters) && parameters.isInt() &&
                    archive.try_read("running_scores", running) && archive.try_read("steps", steps) &&
                    archive.try_read("skipped_steps", skipped),
                "AGMPolicy: damaged state in checkpoint");
    TORCH_CHECK(alpha.toDouble() == options.alpha(), "AGMPolicy: the checkpoint was made with alpha ",
                alpha.toDouble(), ", this policy has alpha ", options.alpha());
    TORCH_CHECK(max_gap.toDouble() == options.max_gap(), "AGMPolicy: the checkpoint was made with "
                "max_gap ", max_gap.toDouble(), ", this policy has max_gap ", options.max_gap());
    TORCH_CHECK(parameters.toInt() == static_cast<std::int64_t>(options.parameters()),
                "AGMPolicy: the checkpoint was made modulating parameters ", parameters.toInt(),
                ", this policy modulates ", to_string(options.parameters()));
    TORCH_CHECK(running.dim() == 1 && running.scalar_type() == at::kDouble,
                "AGMPolicy: damaged running scores in checkpoint: ", detail::shape_string(running));
    TORCH_CHECK(running.numel() == static_cast<std::int64_t>(branches_), "AGMPolicy: the checkpoint "
                "has the running scores of ", running.numel(), " branches, this policy has ", branches_);
    // Means of capped losses: finite, in [0, −log 1e-8].
    TORCH_CHECK(((running >= 0) & (running <= -std::log(1e-8) * (1 + 1e-9))).all().item<bool>(),
                "AGMPolicy: running scores in checkpoint out of range [0, 18.42] or not finite");
    for (const at::Tensor* count : {&steps, &skipped}) {
      TORCH_CHECK(count->dim() == 0 && count->scalar_type() == at::kLong &&
                      count->item<std::int64_t>() >= 0 && count->item<std::int64_t>() < (std::int64_t{1} << 62),
                  "AGMPolicy: damaged step count in checkpoint: ", detail::shape_string(*count));
    }
    // Before the first step the running means are zeros.
    TORCH_CHECK(steps.item<std::int64_t>() > 0 || (running == 0).all().item<bool>(),
                "AGMPolicy: damaged state in checkpoint: running scores without a step");
    const at::Device device = running_scores_.defined() ? running_scores_.device() : at::Device(at::kCPU);
    running_scores_ = running.to(device).clone();
    steps_ = steps.to(device).clone();
    skipped_ = skipped.to(device).clone();
    last_scores_ = last_coefficients_ = at::Tensor();  // the last step's, not the loaded run's
  }

  AGMOptions options;

 private:
  // k up to exp(α·max_gap) must fit a half gradient's dtype, or the step would train on inf.
  void check_fits_half(const std::vector<std::vector<at::Tensor>>& branch_parameters) const {
    if (options.alpha() * options.max_gap() <= kMaxHalfExponent) return;
    for (std::size_t m = 0; m < branch_parameters.size(); ++m) {
      for (const at::Tensor& p : branch_parameters[m]) {
        const at::Tensor& g = p.grad();
        TORCH_CHECK(!g.defined() || g.scalar_type() != at::kHalf || !is_modulated(p, options.parameters()),
                    "AGMPolicy: branch ", m, " has half-precision gradients, where the coefficient up to "
                    "exp(alpha * max_gap) = exp(", options.alpha() * options.max_gap(), ") would overflow to "
                    "inf; keep alpha * max_gap <= ", kMaxHalfExponent, " (log of half's largest number), "
                    "or train the branch's parameters in float or bfloat16");
      }
    }
  }

  std::size_t branches_ = 0;  // given by the Balancer
  at::Tensor running_scores_, steps_, skipped_;
  at::Tensor last_scores_, last_coefficients_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<AGMPolicy> = true;

static_assert(BalancingPolicy<AGMPolicy> && TakesBranchCount<AGMPolicy> && !HoldsFusionGates<AGMPolicy> &&
              ModulatesGradients<AGMPolicy> && NeedsMaskedOutputs<AGMPolicy> && objective_of<AGMPolicy>() == Objective::fused &&
              HasState<AGMPolicy>);

}  // namespace mmbalance
