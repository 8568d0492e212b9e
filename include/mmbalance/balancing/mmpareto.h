#pragma once
/// \file
/// MMPareto (Wei & Hu, "MMPareto: Boosting multimodal learning with innocent unimodal
/// assistance", ICML 2024) as a policy: the loss is the fused output's CE plus every
/// head's; on each branch the gradient of the fused (multimodal) loss and that of the
/// uni-modal losses are combined with equal weights when they agree and with min-norm
/// (MGDA) weights when they conflict, then scaled by the magnitude rule. docs/policies.md
/// gives the rule and where it differs from the original code.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options of `MMParetoPolicy`.
///
/// Example:
/// ```
/// Balancer<MMParetoPolicy> balancer(net, MMParetoPolicy(MMParetoOptions().gamma(1.5)),
///                                   BalancerOptions().warmup_epochs(0));
/// ```
struct MMParetoOptions {
  /// The magnitude rule's factor γ > 0 on every combined gradient (the original: 1.5).
  TORCH_ARG(double, gamma) = 1.5;
  /// Which parameters of each branch are combined (the original: every encoder parameter).
  TORCH_ARG(ModulatedParameters, parameters) = ModulatedParameters::all;
  /// How many units ε·(‖g_m‖² + ‖g_m‖‖g_u‖) around 0 of g_m·g_u count as no conflict, ≥ 0
  /// (0: the sign alone, a dot product of exactly 0 no conflict). ε is the machine epsilon
  /// of the gradients' arithmetic: their dtype's, TF32's (2^-10) for float gradients on a
  /// GPU with TF32 convolutions or matrix products allowed. Measured in float on the CPU:
  /// at most 0.57 units of rounding against a double reference (docs/policies.md).
  TORCH_ARG(double, rounding_bound) = 16;
};

/// MMPareto for N branches. The balancer's loss is CE(y) + Σ_k CE(head_k) (y: the fused
/// output), warm-up included. On each branch k, over its selected parameters, with
/// g_m = ∂CE(y)/∂θ_k (the multimodal gradient), g = the step's whole gradient and
/// g_u = g − g_m (the uni-modal losses' gradient: CE(head_k)'s alone in late fusion):
/// - g_m·g_u ≥ −b (no conflict): weights (½, ½), where b bounds the rounding of g_m·g_u:
///   g − g_m carries the roundings of two backward passes, so where g_u is much smaller
///   than g_m the sign of g_m·g_u within b is noise (`MMParetoOptions::rounding_bound`);
/// - otherwise (conflict) the min-norm point of the segment between g_m and g_u (MGDA
///   for two): c = (‖g_u‖² − g_m·g_u) / ‖g_m − g_u‖², weights (c, 1 − c);
/// then each selected parameter's gradient becomes, with new = 2(c_m g_m + c_u g_u)
/// restricted to that parameter, γ · new · max(1, ‖g‖ / ‖new‖) (the magnitude rule, per
/// parameter tensor as the original; a zero `new` stays zero). Without conflict that is
/// γ·g. All regular steps; computed on the gradients' device without a host read.
/// Data-parallel: each rank's g_m is averaged over the ranks as `DataParallel` averages the
/// gradients, so every rank combines the same gradients identically.
class MMParetoPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.mmpareto", 1};
  /// A copy is a snapshot to roll back to (its tensors are replaced, never changed in place).
  static constexpr bool copy_is_snapshot = true;
  static constexpr bool needs_fused_gradients = true;

  explicit MMParetoPolicy(const MMParetoOptions& options = {}) : options(options) {
    TORCH_CHECK(std::isfinite(options.gamma()) && options.gamma() > 0,
                "MMParetoPolicy: gamma must be a finite number > 0, got ", options.gamma());
    TORCH_CHECK(to_string(options.parameters()) != "invalid", "MMParetoPolicy: parameters must "
                "be conv_weights, non_bias or all, got the value ",
                static_cast<int>(options.parameters()));
    TORCH_CHECK(std::isfinite(options.rounding_bound()) && options.rounding_bound() >= 0,
                "MMParetoPolicy: rounding_bound must be a finite number >= 0, got ", options.rounding_bound());
  }

  /// The network's branch count (the `Balancer` calls it): 2 or more, and the count the
  /// policy's state is for if it has one.
  void set_branches(std::size_t branches) {
    TORCH_CHECK(branches >= 2, "MMParetoPolicy: needs 2 or more branches, got ", branches);
    TORCH_CHECK(branches_ == 0 || branches_ == branches, "MMParetoPolicy: the policy was made for ",
                branches_, " branches, the network has ", branches);
    branches_ = branches;
  }

  StepPlan next_plan() const { return StepPlan::regular(); }

  /// The multimodal loss and every uni-modal loss, each with weight 1 (the original's sum),
  /// warm-up included.
  static constexpr Objective objective = Objective::fused_and_modality_specific;

  void modulate_gradients(const StepGradients& step) {
    TORCH_CHECK(step.branch_parameters.size() == branches_ && step.fused_gradients.size() == branches_,
                "MMParetoPolicy: gradients of ", step.branch_parameters.size(), " branches (",
                step.fused_gradients.size(), " fused) for a policy of ", branches_);
    // The selected parameters of each branch: (whole gradient, fused gradient).
    std::vector<std::vector<std::pair<at::Tensor, at::Tensor>>> selected(branches_);
    for (std::size_t k = 0; k < branches_; ++k) {
      const auto& params = step.branch_parameters[k];
      TORCH_CHECK(step.fused_gradients[k].size() == params.size(), "MMParetoPolicy: branch ", k,
                  " has ", params.size(), " parameters and ", step.fused_gradients[k].size(),
                  " fused gradients");
      for (std::size_t i = 0; i < params.size(); ++i) {
        const at::Tensor g = params[i].grad();
        const at::Tensor& m = step.fused_gradients[k][i];
        if (!g.defined() || !m.defined() || !is_modulated(params[i], options.parameters())) continue;
        TORCH_CHECK(!g.is_sparse() && !m.is_sparse(), "MMParetoPolicy: branch ", k, " parameter ", i,
                    " has a sparse gradient, which the combination does not take (use a dense one, "
                    "or leave the parameter out with MMParetoOptions::parameters)");
        TORCH_CHECK(m.sizes() == g.sizes(), "MMParetoPolicy: branch ", k, " parameter ", i,
                    ": the fused gradient is ", detail::shape_string(m), ", the gradient ",
                    detail::shape_string(g));
        selected[k].emplace_back(g, m);
      }
      TORCH_CHECK(!selected[k].empty(), "MMParetoPolicy: branch ", k, " has no ",
                  to_string(options.parameters()), " parameter with a gradient to combine");
    }
    if (step.sum_across_ranks) average_over_ranks(selected, step.sum_across_ranks);

    std::vector<at::Tensor> fused_weights, conflicts;
    for (auto& branch : selected) {
      // In float at least: half-precision squares and ratios underflow and overflow.
      std::vector<at::Tensor> products;
      for (const auto& [g, m] : branch) {
        const at::Tensor mw = m.to(detail::at_least_float(m)), uw = g.to(detail::at_least_float(g)) - mw;
        products.push_back(at::stack({(mw * mw).sum(), (mw * uw).sum(), (uw * uw).sum()}));
      }
      // g_m·g_m, g_m·g_u, g_u·g_u over the branch.
      const at::Tensor dots = products.size() == 1 ? products[0] : at::stack(products).sum(0);
      const at::Tensor mm = dots[0], mu = dots[1], uu = dots[2];
      const at::Tensor rounding = (mm + at::sqrt(mm) * at::sqrt(uu)) * (options.rounding_bound() * epsilon_of(branch));
      const at::Tensor conflict = mu < -rounding;
      const at::Tensor c = at::where(conflict, min_norm_weight(mm, mu, uu), at::full_like(mm, 0.5));
      for (const auto& [g, m] : branch) {
        const at::Tensor gw = g.to(detail::at_least_float(g)), mw = m.to(detail::at_least_float(m));
        const at::Tensor combined = (mw * c.to(gw.scalar_type()) + (gw - mw) * (1 - c).to(gw.scalar_type())) * 2;
        const at::Tensor whole_norm = gw.norm(), new_norm = combined.norm();
        const at::Tensor stretch = at::where(new_norm > 0, at::clamp_min(whole_norm / new_norm, 1),
                                             at::ones_like(new_norm));
        g.copy_(combined * (stretch * options.gamma()));
      }
      fused_weights.push_back(c);
      conflicts.push_back(conflict.to(at::kLong));
    }
    last_fused_weights_ = at::stack(fused_weights);
    const at::Tensor now = at::stack(conflicts);
    // Out of place, as copy_is_snapshot declares: a copy from before the step keeps its values.
    conflict_steps_ = conflict_steps_.defined() ? conflict_steps_.to(now.device()) + now : now;
  }

  /// The weight c_m of the multimodal gradient on each branch in the last step (½ where
  /// the gradients agreed; undefined before a step; not part of the saved state).
  const at::Tensor& last_fused_weights() const { return last_fused_weights_; }

  /// Steps in which each branch's multimodal and uni-modal gradients conflicted (N int64
  /// on the gradients' device; zeros before a step).
  at::Tensor conflict_steps() const {
    return conflict_steps_.defined() ? conflict_steps_ : at::zeros({static_cast<std::int64_t>(branches_)}, at::kLong);
  }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("gamma", options.gamma());
    archive.write("parameters", static_cast<std::int64_t>(options.parameters()));
    archive.write("rounding_bound", options.rounding_bound());
    archive.write("conflict_steps", conflict_steps().to(at::kCPU));
  }

  /// Restores the conflict counts; another gamma, parameter choice or branch count throws,
  /// naming both values, and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue gamma, parameters;
    at::Tensor conflicts;
    TORCH_CHECK(archive.try_read("gamma", gamma) && gamma.isDouble() &&
                    archive.try_read("parameters", parameters) && parameters.isInt() &&
                    archive.try_read("conflict_steps", conflicts),
                "MMParetoPolicy: damaged state in checkpoint");
    TORCH_CHECK(gamma.toDouble() == options.gamma(), "MMParetoPolicy: the checkpoint was made "
                "with gamma ", gamma.toDouble(), ", this policy has gamma ", options.gamma());
    TORCH_CHECK(parameters.toInt() == static_cast<std::int64_t>(options.parameters()),
                "MMParetoPolicy: the checkpoint was made combining parameters ", parameters.toInt(),
                ", this policy combines ", to_string(options.parameters()));
    // Records from before the bound existed decided on the sign alone; a run resumed from
    // one goes on with this policy's bound (the two differ only within rounding).
    c10::IValue bound;
    if (archive.try_read("rounding_bound", bound)) {
      TORCH_CHECK(bound.isDouble(), "MMParetoPolicy: damaged state in checkpoint");
      TORCH_CHECK(bound.toDouble() == options.rounding_bound(), "MMParetoPolicy: the checkpoint was made "
                  "with rounding_bound ", bound.toDouble(), ", this policy has rounding_bound ",
                  options.rounding_bound());
    }
    TORCH_CHECK(conflicts.dim() == 1 && conflicts.scalar_type() == at::kLong,
                "MMParetoPolicy: damaged conflict counts in checkpoint: ", detail::shape_string(conflicts));
    TORCH_CHECK(conflicts.numel() == static_cast<std::int64_t>(branches_), "MMParetoPolicy: the "
                "checkpoint counts conflicts of ", conflicts.numel(), " branches, this policy has ",
                branches_);
    // Counts a run could reach (and add to without overflow), not a damaged number.
    TORCH_CHECK(((conflicts >= 0) & (conflicts < (std::int64_t{1} << 62))).all().item<bool>(),
                "MMParetoPolicy: negative or absurd conflict counts in checkpoint");
    const at::Device device = conflict_steps_.defined() ? conflict_steps_.device() : at::Device(at::kCPU);
    conflict_steps_ = conflicts.to(device).clone();
  }

  MMParetoOptions options;

 private:
  // The weight of x1 = g_m in min_c ‖c·x1 + (1 − c)·x2‖², as the original's two-vector
  // solver (MinNormSolver._min_norm_element_from2), on the device. Used on conflicts
  // (v12 < 0), where the minimum lies inside the segment: the solver's ends (0.999 where
  // v12 ≥ v11, 0.001 where v12 ≥ v22) are reached only with a zero gradient, no conflict here.
  static at::Tensor min_norm_weight(const at::Tensor& v11, const at::Tensor& v12, const at::Tensor& v22) {
    return (v22 - v12) / (v11 + v22 - 2 * v12);
  }

  // The largest machine epsilon of a branch's gradient arithmetic (its coarsest rounding):
  // the dtype's, or TF32's for float gradients on a GPU that allows it.
  static double epsilon_of(const std::vector<std::pair<at::Tensor, at::Tensor>>& branch) {
    double eps = 0;
    for (const auto& [g, m] : branch) {
      for (const at::Tensor& t : {g, m}) {
        const at::ScalarType type = t.scalar_type();
        const bool tf32 = type == at::kFloat && t.is_cuda() &&
                          (at::globalContext().allowTF32CuDNN() || at::globalContext().allowTF32CuBLAS());
        eps = std::max(eps, type == at::kDouble ? std::numeric_limits<double>::epsilon()
                            : tf32              ? 0x1p-10
                            : type == at::kFloat ? double{std::numeric_limits<float>::epsilon()}
                            : type == at::kHalf  ? 0x1p-10
                                                 : 0x1p-7);  // bfloat16 (or anything coarser)
      }
    }
    return eps;
  }

  // Replaces each rank's fused gradients by their average over the ranks, as
  // `DataParallel::synchronize` averages the whole gradients: one all-reduce, whose last
  // element counts the ranks.
  static void average_over_ranks(std::vector<std::vector<std::pair<at::Tensor, at::Tensor>>>& selected,
                                 const std::function<void(at::Tensor&)>& sum_across_ranks) {
    std::vector<at::Tensor> parts;
    for (const auto& branch : selected) {
      for (const auto& [g, m] : branch) parts.push_back(m.flatten().to(detail::at_least_float(m)));
    }
    parts.push_back(at::ones({1}, parts.front().options()));
    at::Tensor flat = at::cat(parts);
    sum_across_ranks(flat);
    flat = flat.narrow(0, 0, flat.numel() - 1) / flat[-1];
    std::int64_t offset = 0;
    for (auto& branch : selected) {
      for (auto& [g, m] : branch) {
        m = flat.narrow(0, offset, m.numel()).view(m.sizes());
        offset += m.numel();
      }
    }
  }

  std::size_t branches_ = 0;  // given by the Balancer
  at::Tensor last_fused_weights_;
  at::Tensor conflict_steps_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<MMParetoPolicy> = true;

static_assert(BalancingPolicy<MMParetoPolicy> && TakesBranchCount<MMParetoPolicy> &&
              !HoldsFusionGates<MMParetoPolicy> && ModulatesGradients<MMParetoPolicy> &&
              NeedsFusedGradients<MMParetoPolicy> && HasState<MMParetoPolicy> &&
              objective_of<MMParetoPolicy>() == Objective::fused_and_modality_specific);

}  // namespace mmbalance
