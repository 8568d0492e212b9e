#pragma once
/// \file
/// OPM, on-the-fly prediction modulation (Wei, Hu, et al., "On-the-fly Modulation for
/// Balanced Multimodal Learning", TPAMI 2024; GeWu-Lab/BML_TPAMI2024, `calcu_q` and
/// `Modality_drop` in code/models/Classifier.py): after warm-up, with probability p_exe a
/// step drops the dominant branch's features, each sample with probability
/// q_k = q_base · (1 + λ · tanh(relu(ρ_k − 1))) (0 where ρ_k ≤ 1; ρ_k the branch's score
/// over the others'), and scales what it keeps by 1 / (1 − θ), θ = mean_k q_k. The loss
/// is the fused output's CE(y), as the original's.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/share_scores.h"
#include "mmbalance/detail/engine_state.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options for `OPMPolicy`, the original's defaults (code/scripts/train_opm.sh).
///
/// Example:
/// ```
/// Balancer<OPMPolicy> balancer(net, OPMPolicy(OPMOptions().q_base(0.5).lambda(0.5)),
///                              BalancerOptions().warmup_epochs(1));
/// ```
struct OPMOptions {
  /// Drop probability of a branch just ahead (`--q_base`), in [0, 1].
  TORCH_ARG(double, q_base) = 0.5;
  /// How much further the lead raises it (`--lam`), >= 0.
  TORCH_ARG(double, lambda) = 0.5;
  /// Probability that a step drops at all (`--p_exe`), in [0, 1): the scores come from the
  /// steps that drop nothing, so at 1 they would never change again.
  TORCH_ARG(double, p_exe) = 0.7;
  /// Seed of the per-step draw (the per-sample draws come from LibTorch's generator).
  TORCH_ARG(std::uint64_t, seed) = 0;
};

class OPMPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.opm", 1};
  /// A copy is a snapshot to roll back to (it holds no tensor).
  static constexpr bool copy_is_snapshot = true;
  /// The original trains the fused output's loss alone.
  static constexpr Objective objective = Objective::fused;

  explicit OPMPolicy(const OPMOptions& options = {}) : options(options), engine_(options.seed()) {
    TORCH_CHECK(options.q_base() >= 0 && options.q_base() <= 1, "OPMPolicy: q_base must be in [0, 1], got ",
                options.q_base());
    TORCH_CHECK(std::isfinite(options.lambda()) && options.lambda() >= 0,
                "OPMPolicy: lambda must be a finite number >= 0, got ", options.lambda());
    TORCH_CHECK(options.p_exe() >= 0 && options.p_exe() < 1, "OPMPolicy: p_exe must be in [0, 1), got ",
                options.p_exe(), " (the scores come from the steps that drop nothing: at 1 they would freeze)");
  }

  /// The network's branch count (the `Balancer` calls it).
  void set_branches(std::size_t branches) { detail::take_branch_count(branches_, branches, "OPMPolicy"); }

  /// q_k for every branch from its score s_k: the original's `calcu_q`, for N branches with
  /// ρ_k = s_k over the mean of the others' scores (for two: s_0 / s_1 and s_1 / s_0).
  static std::vector<double> drop_probabilities(const std::vector<double>& scores, double q_base, double lambda) {
    const at::Tensor ratio = detail::score_ratios(at::tensor(scores, at::kDouble));
    std::vector<double> q(scores.size(), 0.0);
    for (std::size_t k = 0; k < q.size(); ++k) {
      const double lead = std::tanh(std::max(ratio[static_cast<std::int64_t>(k)].item<double>() - 1.0, 0.0));
      q[k] = lead > 0 ? std::clamp(q_base * (1 + lambda * lead), 0.0, 1.0) : 0.0;
    }
    return q;
  }

  /// After warm-up: with probability p_exe (one draw from the policy's generator every
  /// step, the same on every rank), drop the branch with the largest q_k > 0 from the
  /// latest scores (the lowest index on a tie); otherwise, or before any score, a regular
  /// step. Use `Balancer::next_plan()`: a `StepKind` cannot carry a dropping plan.
  StepPlan next_plan() {
    TORCH_CHECK(branches_ != 0, "OPMPolicy: no branch count: a Balancer gives it (set_branches)");
    dropping_ = false;
    // 53 bits of one draw, so that the sequence is the same on every platform.
    const bool execute = static_cast<double>(engine_() >> 11) * 0x1.0p-53 < options.p_exe();
    if (!execute || scores_.empty()) return StepPlan::regular();
    const std::vector<double> q = drop_probabilities(scores_, options.q_base(), options.lambda());
    const auto top = static_cast<std::size_t>(std::max_element(q.begin(), q.end()) - q.begin());
    if (q[top] == 0) return StepPlan::regular();
    // θ, the share of the features dropped, over the branches' widths taken as equal (the
    // original's 512 and 512): q of the one branch dropped over N.
    const double theta = q[top] / static_cast<double>(q.size());
    dropping_ = true;
    return StepPlan::regular().modulating(top, 1 - q[top], 1 / (1 - theta));
  }

  /// Leaves the gradients as they are: scores the step's heads for the next plans, on
  /// steps that dropped nothing (a dropped branch's heads do not show its prediction).
  /// Data-parallel, every rank's share is added first. One host read per scored step.
  void modulate_gradients(const StepGradients& step) {
    TORCH_CHECK(step.heads.size() == branches_, "OPMPolicy: ", step.heads.size(), " heads for ", branches_,
                " branches");
    detail::check_share_heads(step.heads, step.target, "OPMPolicy");
    if (dropping_) return;  // the same on every rank: no rank waits on a sum the others skip
    const at::Tensor s = detail::share_scores(step.heads, step.target, step.sum_across_ranks, "OPMPolicy");
    const at::Tensor host = s.to(at::kCPU, at::kDouble);
    scores_.assign(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
  }

  /// The scores the next plan draws on (empty before the first scored step).
  const std::vector<double>& scores() const { return scores_; }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("engine", detail::engine_state(engine_));
    archive.write("scores", at::tensor(scores_, at::kDouble));
    archive.write("q_base", options.q_base());
    archive.write("lambda", options.lambda());
    archive.write("p_exe", options.p_exe());
    archive.write("seed", static_cast<std::int64_t>(options.seed()));
  }

  /// Restores the generator and scores; other options or another branch count throw and
  /// change nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, engine, q_base, lambda, p_exe, seed;
    at::Tensor scores;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() &&
                    archive.try_read("engine", engine) && engine.isString() &&
                    archive.try_read("scores", scores) && scores.scalar_type() == at::kDouble && scores.dim() == 1 &&
                    archive.try_read("q_base", q_base) && q_base.isDouble() &&
                    archive.try_read("lambda", lambda) && lambda.isDouble() &&
                    archive.try_read("p_exe", p_exe) && p_exe.isDouble() && archive.try_read("seed", seed) &&
                    seed.isInt(),
                "OPMPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "OPMPolicy: the checkpoint was made "
                "for ", branches.toInt(), " branches, this policy balances ", branches_);
    TORCH_CHECK(scores.numel() == 0 || scores.numel() == static_cast<std::int64_t>(branches_),
                "OPMPolicy: damaged state in checkpoint (", scores.numel(), " scores for ", branches_, " branches)");
    // A run resumes only with the options it was started with.
    for (const auto& [name, then, now] : {std::tuple{"q_base", q_base.toDouble(), options.q_base()},
                                          std::tuple{"lambda", lambda.toDouble(), options.lambda()},
                                          std::tuple{"p_exe", p_exe.toDouble(), options.p_exe()}}) {
      TORCH_CHECK(then == now, "OPMPolicy: the checkpoint was made with ", name, " ", then, ", this policy has ", now);
    }
    TORCH_CHECK(static_cast<std::uint64_t>(seed.toInt()) == options.seed(), "OPMPolicy: the checkpoint was made "
                "with seed ", static_cast<std::uint64_t>(seed.toInt()), ", this policy has seed ", options.seed());
    std::mt19937_64 restored = detail::engine_from_state(engine, "OPMPolicy");
    const at::Tensor host = scores.to(at::kCPU).contiguous();
    scores_.assign(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
    engine_ = restored;
    dropping_ = false;  // checkpoints are made between steps
  }

  OPMOptions options;

 private:
  std::size_t branches_ = 0;  // 0 until a Balancer gives the network's
  std::mt19937_64 engine_;
  std::vector<double> scores_;
  bool dropping_ = false;  // this step's plan drops a branch
};
template <>
inline constexpr bool detail::kLibraryPolicy<OPMPolicy> = true;

static_assert(BalancingPolicy<OPMPolicy> && TakesBranchCount<OPMPolicy> && ModulatesGradients<OPMPolicy> &&
              HasState<OPMPolicy> && !HoldsFusionGates<OPMPolicy>);

}  // namespace mmbalance
