#pragma once
/// \file
/// OGM-GE (Peng et al., "Balanced multimodal learning via on-the-fly gradient modulation",
/// CVPR 2022) as a policy: the network trains on its fused output's loss CE(y) alone, and
/// every step from the end of the balancer's warm-up to the epoch `modulation_ends` the
/// dominant modality's gradients are scaled down by 1 − tanh(α·ρ), and Gaussian noise with
/// the gradient's own standard deviation is added (generalization enhancement).
/// docs/policies.md gives the rule, its N-branch form and where it differs from the
/// original code.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/share_scores.h"
#include "mmbalance/detail/engine_state.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options of `OGMGEPolicy`.
///
/// Example:
/// ```
/// Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy(OGMGEOptions().alpha(0.8).seed(7)),
///                                BalancerOptions().warmup_epochs(0));
/// ```
struct OGMGEOptions {
  /// Strength of the modulation, >= 0 (the original uses 0.1 on VGGSound to 0.8 on CREMA-D).
  TORCH_ARG(double, alpha) = 0.1;
  /// Generalization enhancement: add N(0, std(g)) to each selected gradient g (std of g
  /// before scaling), in both branches (OGM-GE); false scales only (OGM).
  TORCH_ARG(bool, noise) = true;
  /// Which parameters of each branch are modulated (the original: conv weights).
  TORCH_ARG(ModulatedParameters, parameters) = ModulatedParameters::conv_weights;
  /// Seed of the noise.
  TORCH_ARG(std::uint64_t, seed) = 0;
  /// The last epoch (counting from 0, warm-up included) that modulates; later steps are
  /// plain (the original's `--modulation_ends`, 50 there). Modulation starts after the
  /// balancer's warm-up (`BalancerOptions::warmup_epochs`, the original's
  /// `--modulation_starts`). Default: never ends.
  TORCH_ARG(std::int64_t, modulation_ends) = std::numeric_limits<std::int64_t>::max();
};

/// On-the-fly gradient modulation with generalization enhancement, for any number of
/// branches. The loss is CE(y) of the fused output y = Σ_k h_k / N (the original's
/// `loss = criterion(out)`), in warm-up too. Per step, from each branch k's share of y,
/// h_k / N (the original's `out_a`, its half of the concatenation head): the score
/// s_k = Σ_i softmax(h_k / N)_i[y_i] over the batch, the discrepancy ratio ρ_k = s_k / mean_{j≠k} s_j (for two branches
/// s_0 / s_1 and its inverse, the original's), and the coefficient k_k = 1 − tanh(α·ρ_k)
/// where ρ_k > 1, else 1. Each selected parameter's gradient g of branch k becomes
/// k_k·g, plus (noise) N(0, std(g) + 1e-8) drawn from the policy's seeded generator.
/// All regular steps (no gates held). Computed on the gradients' device without a host
/// read; the noise is drawn on the CPU (in float for half and bfloat16 gradients) and
/// copied to the device. Data-parallel: the
/// scores are added up over the ranks, and every rank draws the same noise (construct the
/// policy with the same seed on every rank, e.g. from `agree_on_seed`), so all ranks
/// apply the same change to their identical averaged gradients.
class OGMGEPolicy {
 public:
  /// Its name and state format in checkpoints.
  /// Format 2: trains CE(y) and scores h_k / N (format 1 trained Σ_k CE(head_k)).
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.ogm_ge", 2};
  /// A copy is a snapshot to roll back to (its tensors are replaced, never changed in place).
  static constexpr bool copy_is_snapshot = true;
  /// The original trains the fused output's loss alone.
  static constexpr Objective objective = Objective::fused;
  explicit OGMGEPolicy(const OGMGEOptions& options = {}) : options(options), engine_(options.seed()) {
    TORCH_CHECK(std::isfinite(options.alpha()) && options.alpha() >= 0,
                "OGMGEPolicy: alpha must be a finite number >= 0, got ", options.alpha());
    TORCH_CHECK(options.modulation_ends() >= 0, "OGMGEPolicy: modulation_ends must be an "
                "epoch >= 0, got ", options.modulation_ends());
    TORCH_CHECK(to_string(options.parameters()) != "invalid", "OGMGEPolicy: parameters must be "
                "conv_weights, non_bias or all, got the value ",
                static_cast<int>(options.parameters()));
  }

  StepPlan next_plan() const { return StepPlan::regular(); }

  /// The coefficients k_k of one step from the branches' heads h_k (a tensor of N numbers
  /// on the heads' device, float); data-parallel, `sum_across_ranks` adds the scores of
  /// every rank's share first.
  static at::Tensor coefficients(const std::vector<at::Tensor>& heads, const at::Tensor& target,
                                 double alpha,
                                 const std::function<void(at::Tensor&)>& sum_across_ranks = {}) {
    const at::Tensor ratio = detail::score_ratios(detail::share_scores(heads, target, sum_across_ranks, "OGMGEPolicy"));
    return at::where(ratio > 1, 1 - at::tanh(alpha * ratio), at::ones_like(ratio));
  }

  void modulate_gradients(const StepGradients& step) {
    TORCH_CHECK(step.heads.size() == step.branch_parameters.size(), "OGMGEPolicy: ",
                step.heads.size(), " heads for ", step.branch_parameters.size(), " branches");
    // Checked in every epoch, so that bad heads are named before the window ends too.
    detail::check_share_heads(step.heads, step.target, "OGMGEPolicy");
    for (std::size_t k = 0; k < step.branch_parameters.size(); ++k) {
      const auto& params = step.branch_parameters[k];
      TORCH_CHECK(std::any_of(params.begin(), params.end(),
                              [&](const at::Tensor& p) { return is_modulated(p, options.parameters()); }),
                  "OGMGEPolicy: branch ", k, " has no ", to_string(options.parameters()), " parameter to "
                  "modulate (conv_weights: 3 or more dimensions), so its gradient would never be scaled; "
                  "choose OGMGEOptions().parameters(ModulatedParameters::non_bias) or ::all");
    }
    if (step.epoch > options.modulation_ends()) {  // past the modulation epochs: plain SGD
      last_coefficients_ = at::ones({static_cast<std::int64_t>(step.heads.size())},
                                    step.heads.front().options().dtype(at::kFloat));
      return;
    }
    last_coefficients_ = coefficients(step.heads, step.target, options.alpha(), step.sum_across_ranks);
    at::Generator gen = at::detail::createCPUGenerator(engine_());
    for (std::size_t k = 0; k < step.branch_parameters.size(); ++k) {
      const at::Tensor coefficient = last_coefficients_[static_cast<std::int64_t>(k)];
      for (const at::Tensor& p : step.branch_parameters[k]) {
        at::Tensor g = p.grad();
        if (!g.defined() || !is_modulated(p, options.parameters())) continue;
        // The noise has the std of the gradient before scaling (the original's fixed code:
        // grad * coeff + N(0, grad.std() + 1e-8)); std of a single number is undefined:
        // such a gradient gets no noise.
        const bool noisy = options.noise() && g.numel() > 1;
        // Half and bfloat16: the std, the draw and k·g + noise in float, rounded once into
        // the gradient (a draw in half is not float's draw rounded on every LibTorch, and
        // half's 1e-8 is 0).
        const at::ScalarType wide = detail::at_least_float(g);
        const bool reduced = wide != g.scalar_type();
        const at::Tensor spread = noisy ? g.to(wide).std() : at::Tensor();
        const at::Tensor noise = noisy ? at::randn(g.sizes(), gen, at::TensorOptions(wide))
                                             .to(g.device(), /*non_blocking=*/true) * (spread + 1e-8)
                                       : at::Tensor();
        if (reduced) {  // k·g + noise in float, rounded once
          const at::Tensor scaled = g.to(wide) * coefficient;
          g.copy_(noisy ? scaled + noise : scaled);
        } else {
          g.mul_(coefficient.to(g.scalar_type()));
          if (noisy) g.add_(noise);
        }
      }
    }
  }

  /// k_k of the last step (undefined before one; all 1 after `modulation_ends`; not part
  /// of the saved state).
  const at::Tensor& last_coefficients() const { return last_coefficients_; }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("engine", detail::engine_state(engine_));
    archive.write("alpha", options.alpha());
    archive.write("noise", static_cast<std::int64_t>(options.noise()));
    archive.write("parameters", static_cast<std::int64_t>(options.parameters()));
    archive.write("seed", static_cast<std::int64_t>(options.seed()));
    archive.write("modulation_ends", options.modulation_ends());
  }

  /// Restores the noise generator; other options throw, naming both values, and change
  /// nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue state, alpha, noise, parameters, seed, ends;
    TORCH_CHECK(archive.try_read("engine", state) && state.isString() &&
                    archive.try_read("alpha", alpha) && alpha.isDouble() &&
                    archive.try_read("noise", noise) && noise.isInt() &&
                    archive.try_read("parameters", parameters) && parameters.isInt() &&
                    archive.try_read("seed", seed) && seed.isInt(),
                "OGMGEPolicy: damaged state in checkpoint");
    // Records written before modulation_ends existed modulate in every epoch.
    const bool has_ends = archive.try_read("modulation_ends", ends);
    TORCH_CHECK(!has_ends || ends.isInt(), "OGMGEPolicy: damaged state in checkpoint");
    const std::int64_t saved_ends = has_ends ? ends.toInt() : std::numeric_limits<std::int64_t>::max();
    TORCH_CHECK(alpha.toDouble() == options.alpha(), "OGMGEPolicy: the checkpoint was made with "
                "alpha ", alpha.toDouble(), ", this policy has alpha ", options.alpha());
    TORCH_CHECK(noise.toInt() == static_cast<std::int64_t>(options.noise()), "OGMGEPolicy: the "
                "checkpoint was made with noise ", noise.toInt() != 0 ? "on" : "off",
                ", this policy has it ", options.noise() ? "on" : "off");
    TORCH_CHECK(parameters.toInt() == static_cast<std::int64_t>(options.parameters()),
                "OGMGEPolicy: the checkpoint was made modulating parameters ",
                parameters.toInt(), ", this policy modulates ", to_string(options.parameters()));
    TORCH_CHECK(static_cast<std::uint64_t>(seed.toInt()) == options.seed(), "OGMGEPolicy: the "
                "checkpoint was made with seed ", static_cast<std::uint64_t>(seed.toInt()),
                ", this policy has seed ", options.seed());
    TORCH_CHECK(saved_ends == options.modulation_ends(), "OGMGEPolicy: the checkpoint was "
                "made with modulation_ends ", epoch_text(saved_ends), ", this policy has ",
                epoch_text(options.modulation_ends()));
    engine_ = detail::engine_from_state(state, "OGMGEPolicy");
  }

  /// A record of format 1 is refused: that OGM-GE trained Σ_k CE(head_k) and scored each
  /// head's own softmax, so a resumed run would change its loss half-way.
  void load(torch::serialize::InputArchive&, std::int64_t version) {
    TORCH_CHECK(false, "OGMGEPolicy: the checkpoint holds OGM-GE state of format ", version,
                ", whose runs trained the sum of the heads' losses and scored each head on its own; "
                "this OGM-GE trains the fused output's loss CE(y) and scores each branch's share of "
                "y, as the original does (docs/policies.md), so the run cannot continue as it "
                "began: finish it with the mmbalance that wrote it, or start it again");
  }

  OGMGEOptions options;

 private:
  // modulation_ends as a person reads it: the default never ends.
  static std::string epoch_text(std::int64_t epoch) {
    return epoch == std::numeric_limits<std::int64_t>::max() ? "never (the default)"
                                                             : std::to_string(epoch);
  }

  std::mt19937_64 engine_;  // one draw per step seeds that step's noise
  at::Tensor last_coefficients_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<OGMGEPolicy> = true;

static_assert(BalancingPolicy<OGMGEPolicy> && !HoldsFusionGates<OGMGEPolicy> &&
              ModulatesGradients<OGMGEPolicy> && HasState<OGMGEPolicy>);

}  // namespace mmbalance
