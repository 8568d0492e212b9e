#pragma once
/// \file
/// Gradient-Blending (Wang, Tran, Feiszli, "What makes training multi-modal classification
/// networks hard?", CVPR 2020), online, as a policy: the loss is a weighted sum of every
/// head's CE and the fused output's, with weights w_k ∝ G_k / O_k² re-estimated every
/// super-epoch from training and held-out losses. docs/policies.md gives the rule and how
/// it differs from the original.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/epoch_losses.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Options of `GradientBlendingPolicy`.
///
/// Example:
/// ```
/// Balancer<GradientBlendingPolicy> balancer(
///     net, GradientBlendingPolicy(GradientBlendingOptions().super_epoch(3)));
/// ```
struct GradientBlendingOptions {
  /// Epochs per super-epoch: the weights are re-estimated at the end of every
  /// `super_epoch` epochs after warm-up (the online variant's N; tsai uses 5).
  TORCH_ARG(std::int64_t, super_epoch) = 5;
};

/// Online Gradient-Blending for N branches. The loss weights are N + 1 numbers: one per
/// branch head, then the fused output y; uniform (1 / (N + 1)) until the first estimate.
/// At the end of warm-up and of every super-epoch the `Balancer` hands the policy every
/// head's mean loss on a training sample (L^T) and on held-out data (L^V); from two
/// consecutive measurements (epochs n and n + S, S = `super_epoch`) of head k:
///   G_k = max(0, L^V_n − L^V_{n+S}),  O = L^V − L^T,
///   w_k = max(1e-8, G_k / max(1e-8, (O_{n+S} − O_n)²)),  normalised to sum 1
/// (the paper's w ∝ G / O² with tsai's online clamps). All regular steps.
class GradientBlendingPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.gradient_blending", 1};
  /// A copy is a snapshot to roll back to (it holds no tensor).
  static constexpr bool copy_is_snapshot = true;
  explicit GradientBlendingPolicy(const GradientBlendingOptions& options = {}) : options(options) {
    TORCH_CHECK(options.super_epoch() >= 1, "GradientBlendingPolicy: super_epoch must be >= 1 "
                "epoch, got ", options.super_epoch());
  }

  /// The network's branch count (the `Balancer` calls it): 2 to 4096, and the count the
  /// policy's state is for if it has one. The weights start uniform over the heads and the
  /// fused output.
  void set_branches(std::size_t branches) {
    TORCH_CHECK(branches >= 2 && branches <= 4096, "GradientBlendingPolicy: needs 2 to 4096 "
                "branches, got ", branches);
    TORCH_CHECK(branches_ == 0 || branches_ == branches, "GradientBlendingPolicy: the policy was "
                "made for ", branches_, " branches, the network has ", branches);
    if (branches_ == 0) weights_.assign(branches + 1, 1.0 / static_cast<double>(branches + 1));
    branches_ = branches;
  }

  StepPlan next_plan() const { return StepPlan::regular(); }

  /// The current weights: heads, then the fused output.
  LossWeights loss_weights() const {
    TORCH_CHECK(!weights_.empty(), "GradientBlendingPolicy: no branch count yet (a Balancer gives it: set_branches)");
    return {std::vector<double>(weights_.begin(), weights_.end() - 1), weights_.back()};
  }

  bool wants_epoch_losses(std::int64_t epochs) const { return epochs % options.super_epoch() == 0; }

  /// Takes a measurement; from the second on, re-estimates the weights from it and the
  /// one before. Non-finite or mis-sized losses throw, changing nothing.
  void observe_epoch_losses(const EpochLosses& losses) {
    for (const HeadLosses* l : {&losses.train, &losses.held_out}) {
      TORCH_CHECK(l->heads.size() == branches_, "GradientBlendingPolicy: losses of ",
                  l->heads.size(), " heads for ", branches_, " branches");
      for (const double v : flat(*l)) {
        TORCH_CHECK(std::isfinite(v), "GradientBlendingPolicy: non-finite loss ", v, " at the end "
                    "of epoch ", losses.epochs, " after warm-up (",
                    l == &losses.train ? "training sample" : "held-out data", ")");
      }
    }
    if (previous_) weights_ = blend_weights(*previous_, losses);
    previous_ = losses;
    ++measurements_;
  }

  /// The rule, from the measurements at the start and the end of a super-epoch: N + 1
  /// weights (heads, then the fused output), summing to 1.
  static std::vector<double> blend_weights(const EpochLosses& start, const EpochLosses& end) {
    const std::vector<double> t1 = flat(start.train), v1 = flat(start.held_out);
    const std::vector<double> t2 = flat(end.train), v2 = flat(end.held_out);
    TORCH_CHECK(t1.size() == v1.size() && t1.size() == t2.size() && t1.size() == v2.size(),
                "GradientBlendingPolicy::blend_weights: measurements of different head counts");
    std::vector<double> w(t1.size());
    double total = 0;
    for (std::size_t k = 0; k < w.size(); ++k) {
      const double gain = std::max(0.0, v1[k] - v2[k]);
      const double overfit_change = (v2[k] - t2[k]) - (v1[k] - t1[k]);
      w[k] = std::max(1e-8, gain / std::max(1e-8, overfit_change * overfit_change));
      total += w[k];
    }
    for (double& x : w) x /= total;
    return w;
  }

  /// How many times the weights were estimated (measurements - 1, from the second on).
  std::int64_t estimates() const { return std::max<std::int64_t>(0, measurements_ - 1); }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("super_epoch", options.super_epoch());
    archive.write("weights", at::tensor(weights_, at::kDouble));
    archive.write("measurements", measurements_);
    if (previous_) {
      archive.write("previous_epochs", previous_->epochs);
      archive.write("previous_train", at::tensor(flat(previous_->train), at::kDouble));
      archive.write("previous_held_out", at::tensor(flat(previous_->held_out), at::kDouble));
    }
  }

  /// Restores the weights and the last measurement; a record of other options or a
  /// damaged one throws, naming it, and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, super_epoch, measurements, previous_epochs;
    at::Tensor weights, previous_train, previous_held_out;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() &&
                    archive.try_read("super_epoch", super_epoch) && super_epoch.isInt() &&
                    archive.try_read("measurements", measurements) && measurements.isInt() &&
                    measurements.toInt() >= 0 && archive.try_read("weights", weights),
                "GradientBlendingPolicy: damaged state in checkpoint");
    TORCH_CHECK(static_cast<std::size_t>(branches.toInt()) == branches_, "GradientBlendingPolicy: "
                "the checkpoint was made for ", branches.toInt(), " branches, this policy has ", branches_);
    TORCH_CHECK(super_epoch.toInt() == options.super_epoch(), "GradientBlendingPolicy: the "
                "checkpoint was made with super_epoch ", super_epoch.toInt(), ", this policy has ",
                options.super_epoch());
    const std::vector<double> w = read_vector(weights, "weights");
    double total = 0;
    for (const double x : w) {
      TORCH_CHECK(std::isfinite(x) && x > 0, "GradientBlendingPolicy: damaged weights in checkpoint");
      total += x;
    }
    TORCH_CHECK(std::abs(total - 1.0) < 1e-6, "GradientBlendingPolicy: the checkpoint's weights "
                "sum to ", total, ", not 1");
    std::optional<EpochLosses> previous;
    if (measurements.toInt() > 0) {
      TORCH_CHECK(archive.try_read("previous_epochs", previous_epochs) && previous_epochs.isInt() &&
                      archive.try_read("previous_train", previous_train) &&
                      archive.try_read("previous_held_out", previous_held_out),
                  "GradientBlendingPolicy: damaged state in checkpoint (the last measurement)");
      previous = EpochLosses{unflat(read_vector(previous_train, "previous_train")),
                             unflat(read_vector(previous_held_out, "previous_held_out")),
                             previous_epochs.toInt()};
    }
    weights_ = w;
    previous_ = std::move(previous);
    measurements_ = measurements.toInt();
  }

  GradientBlendingOptions options;

 private:
  static std::vector<double> flat(const HeadLosses& l) {
    std::vector<double> v = l.heads;
    v.push_back(l.fused);
    return v;
  }

  static HeadLosses unflat(const std::vector<double>& v) {
    return {std::vector<double>(v.begin(), v.end() - 1), v.back(), 0};
  }

  // N + 1 finite doubles from a saved tensor; anything else throws.
  std::vector<double> read_vector(const at::Tensor& t, const char* key) const {
    TORCH_CHECK(t.defined() && t.dim() == 1 && t.scalar_type() == at::kDouble &&
                    t.numel() == static_cast<std::int64_t>(branches_ + 1),
                "GradientBlendingPolicy: '", key, "' in the checkpoint must hold ", branches_ + 1,
                " doubles, got ", t.defined() ? std::string(c10::toString(t.scalar_type())) : "",
                detail::shape_string(t));
    // A checkpoint loaded onto a GPU model holds its tensors there: read them on the host.
    const at::Tensor c = t.to(at::kCPU).contiguous();
    std::vector<double> v(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    for (const double x : v) {
      TORCH_CHECK(std::isfinite(x), "GradientBlendingPolicy: non-finite '", key, "' in checkpoint");
    }
    return v;
  }

  std::size_t branches_ = 0;               // given by the Balancer
  std::vector<double> weights_;            // heads, then the fused output; sum 1
  std::optional<EpochLosses> previous_;    // the last measurement
  std::int64_t measurements_ = 0;
};
template <>
inline constexpr bool detail::kLibraryPolicy<GradientBlendingPolicy> = true;

static_assert(BalancingPolicy<GradientBlendingPolicy> && TakesBranchCount<GradientBlendingPolicy> &&
              WeighsLosses<GradientBlendingPolicy> && ObservesEpochLosses<GradientBlendingPolicy> &&
              HasState<GradientBlendingPolicy> && !HoldsFusionGates<GradientBlendingPolicy>);

}  // namespace mmbalance
