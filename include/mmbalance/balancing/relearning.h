#pragma once
/// \file
/// ReLearning, diagnosing and re-learning (Wei et al., "Diagnosing and Re-learning for
/// Balanced Multimodal Learning", ECCV 2024; GeWu-Lab/Diagnosing_Relearning_ECCV2024,
/// code/ours.py): the network trains the fused output's loss CE(y) alone; at a few epoch
/// boundaries each branch's representation is diagnosed by how much better its features
/// cluster by class on training data than on held-out data (k-means purity, a gap that
/// grows as a branch over-fits), and every branch is moved back toward its initial
/// parameters in proportion: θ_k ← w_k θ_k,init + (1 − w_k) θ_k with
/// w_k = tanh(λ |purity_train,k − purity_held_out,k|).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/epoch_features.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/reinitialization.h"
#include "mmbalance/metrics/cluster_purity.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options for `ReLearningPolicy`: the original's defaults (code/ours.py's arguments,
/// code/script/ours.sh).
///
/// Example:
/// ```
/// Balancer<ReLearningPolicy> balancer(net, ReLearningPolicy(ReLearningOptions().every(5).times(2)),
///                                     BalancerOptions().warmup_epochs(0));
/// ...
/// balancer.end_epoch(net, train_sample, held_out, optimizer);  // after each epoch
/// ```
struct ReLearningOptions {
  /// λ in w = tanh(λ |purity gap|) (`--move_lambda`), >= 0.
  TORCH_ARG(double, lambda) = 3.0;
  /// Re-initialize after the epochs numbered every, 2·every, ... from 0 after warm-up,
  /// that is after every + 1, 2·every + 1, ... epochs (`--reinit_epoch`: `epoch %
  /// reinit_epoch == 0 and epoch > 0` after training epoch `epoch`), >= 1.
  TORCH_ARG(std::int64_t, every) = 20;
  /// At most this many times (`--reinit_num`), >= 0.
  TORCH_ARG(std::int64_t, times) = 3;
  /// k-means starts per clustering (scikit-learn's `n_init`, 10 before its version 1.4;
  /// the original leaves it at the default).
  TORCH_ARG(std::int64_t, kmeans_runs) = 10;
};

/// One diagnosis: each branch's purity on the training sample and on the held-out data,
/// and the strength it gives.
struct ReLearningDiagnosis {
  std::int64_t epochs = -1;  // epochs after warm-up when it was made (-1: none yet)
  std::vector<double> train_purity, held_out_purity, strengths;
};

class ReLearningPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.relearning", 1};
  /// A copy is a snapshot to roll back to (it holds no tensor).
  static constexpr bool copy_is_snapshot = true;
  /// The original trains the fused output's loss alone.
  static constexpr Objective objective = Objective::fused;

  explicit ReLearningPolicy(const ReLearningOptions& options = {}) : options(options) {
    TORCH_CHECK(std::isfinite(options.lambda()) && options.lambda() >= 0,
                "ReLearningPolicy: lambda must be a finite number >= 0, got ", options.lambda());
    TORCH_CHECK(options.every() >= 1, "ReLearningPolicy: every must be >= 1 epoch, got ", options.every());
    TORCH_CHECK(options.times() >= 0, "ReLearningPolicy: times must be >= 0, got ", options.times());
    TORCH_CHECK(options.kmeans_runs() >= 1, "ReLearningPolicy: kmeans_runs must be >= 1, got ",
                options.kmeans_runs());
  }

  /// The network's branch count (the `Balancer` calls it).
  void set_branches(std::size_t branches) { detail::take_branch_count(branches_, branches, "ReLearningPolicy"); }

  /// Every step is regular: ReLearning acts at epoch boundaries.
  StepPlan next_plan() const { return StepPlan::regular(); }

  /// Whether `epochs` epochs after warm-up end at a re-initialization: the epoch just
  /// ended is numbered j·every from 0, j in 1..times.
  bool wants_epoch_features(std::int64_t epochs) const {
    const std::int64_t ended = epochs - 1;
    return ended > 0 && ended % options.every() == 0 && ended / options.every() <= options.times();
  }

  /// Diagnoses each branch: k-means with the heads' class count on its features scaled to
  /// [-1, 1] per dimension, on each set; the purity gap gives its strength. Data-parallel,
  /// the strengths are the ranks' average (equal where every rank measured the same data).
  void observe_epoch_features(const EpochFeatures& features) {
    TORCH_CHECK(branches_ > 0, "ReLearningPolicy: set_branches was not called (the Balancer calls it)");
    TORCH_CHECK(features.train.size() == branches_ && features.held_out.size() == branches_,
                "ReLearningPolicy: features of ", features.train.size(), " and ", features.held_out.size(),
                " branches for ", branches_);
    check_targets(features.train_target, features.classes, "training");
    check_targets(features.held_out_target, features.classes, "held-out");
    ReLearningDiagnosis d;
    d.epochs = features.epochs;
    for (std::size_t k = 0; k < branches_; ++k) {
      d.train_purity.push_back(purity(features.train[k], features.train_target, features.classes, k, "training"));
      d.held_out_purity.push_back(purity(features.held_out[k], features.held_out_target, features.classes, k, "held-out"));
      d.strengths.push_back(std::tanh(options.lambda() * std::abs(d.train_purity[k] - d.held_out_purity[k])));
    }
    if (features.sum_across_ranks) {
      std::vector<double> summed = d.strengths;
      summed.push_back(1);
      at::Tensor t = at::tensor(summed, at::kDouble);
      features.sum_across_ranks(t);
      const at::Tensor host = t.to(at::kCPU);
      const double ranks = host[static_cast<std::int64_t>(branches_)].item<double>();
      for (std::size_t k = 0; k < branches_; ++k) {
        d.strengths[k] = host[static_cast<std::int64_t>(k)].item<double>() / ranks;
      }
    }
    diagnosis_ = std::move(d);
  }

  /// The strengths of the diagnosis made at this boundary; none (zeros) elsewhere.
  std::vector<double> reinitialization(std::int64_t epochs) const {
    if (!wants_epoch_features(epochs)) return std::vector<double>(branches_, 0.0);
    TORCH_CHECK(diagnosis_.epochs == epochs, "ReLearningPolicy: no diagnosis at the end of epoch ", epochs,
                " after warm-up (the Balancer measures the features first)");
    return diagnosis_.strengths;
  }

  /// The latest diagnosis (`epochs` -1 before the first).
  const ReLearningDiagnosis& last_diagnosis() const { return diagnosis_; }

  /// The branch count and options: nothing else carries over a boundary (a diagnosis is
  /// used at the boundary that made it), so a run resumes as it would have gone on.
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("lambda", options.lambda());
    archive.write("every", options.every());
    archive.write("times", options.times());
    archive.write("kmeans_runs", options.kmeans_runs());
  }

  /// Refuses a checkpoint made with other options or another branch count, changing nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, lambda, every, times, runs;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() && archive.try_read("lambda", lambda) &&
                    lambda.isDouble() && archive.try_read("every", every) && every.isInt() &&
                    archive.try_read("times", times) && times.isInt() && archive.try_read("kmeans_runs", runs) &&
                    runs.isInt(),
                "ReLearningPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "ReLearningPolicy: the checkpoint was made "
                "for ", branches.toInt(), " branches, this policy balances ", branches_);
    TORCH_CHECK(lambda.toDouble() == options.lambda(), "ReLearningPolicy: the checkpoint was made with lambda ",
                lambda.toDouble(), ", this policy has ", options.lambda());
    for (const auto& [name, then, now] : {std::tuple{"every", every.toInt(), options.every()},
                                          std::tuple{"times", times.toInt(), options.times()},
                                          std::tuple{"kmeans_runs", runs.toInt(), options.kmeans_runs()}}) {
      TORCH_CHECK(then == now, "ReLearningPolicy: the checkpoint was made with ", name, " ", then, ", this policy has ",
                  now);
    }
  }

  ReLearningOptions options;

 private:
  // One set's targets: one class index in [0, classes) per row, at least a row per class.
  static void check_targets(const at::Tensor& target, std::int64_t classes, const char* set) {
    TORCH_CHECK(target.defined() && target.dim() == 1, "ReLearningPolicy: the ", set, " targets must be (rows)");
    TORCH_CHECK(classes >= 1 && target.size(0) >= classes, "ReLearningPolicy: ", target.size(0), " ", set,
                " rows for ", classes, " clusters (one per class); pass more data");
    TORCH_CHECK(target.min().item<std::int64_t>() >= 0 && target.max().item<std::int64_t>() < classes,
                "ReLearningPolicy: ", set, " targets outside the heads' ", classes, " classes");
  }

  // Purity of branch k's k-means clustering on one set, the features checked (the
  // targets are, once per set, by `check_targets`).
  double purity(const at::Tensor& f, const at::Tensor& target, std::int64_t classes, std::size_t k,
                const char* set) const {
    TORCH_CHECK(f.defined() && f.dim() == 2 && f.size(0) == target.size(0),
                "ReLearningPolicy: branch ", k, "'s ", set, " features must be (rows, width) with one target per row");
    TORCH_CHECK(at::isfinite(f).all().item<bool>(), "ReLearningPolicy: branch ", k, "'s ", set,
                " features are not finite");
    return cluster_purity(target, kmeans(min_max_scale(f), KMeansOptions(classes).runs(options.kmeans_runs())));
  }

  std::size_t branches_ = 0;  // 0 until a Balancer gives the network's
  ReLearningDiagnosis diagnosis_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<ReLearningPolicy> = true;

static_assert(BalancingPolicy<ReLearningPolicy> && TakesBranchCount<ReLearningPolicy> &&
              ObservesEpochFeatures<ReLearningPolicy> && ReinitializesBranches<ReLearningPolicy> &&
              HasState<ReLearningPolicy>);

}  // namespace mmbalance
