#pragma once
/// \file
/// PMR, prototypical modal rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
/// Multimodal Learning", CVPR 2023; fanyunfeng-bit/Modal-Imbalance-PMR,
/// main_Prototype_grad.py): each branch k keeps per-class prototypes P_k (class means of
/// its features); the loss is CE(y) + α Σ_{k behind} CE(−‖f_k − P_k‖, y), the prototype
/// classification term of every branch whose prototype score s_k = Σ_i softmax(−‖f_k,i −
/// P_k‖)[y_i] is below the leader's, which pushes the slow branches' features toward
/// their classes without touching the fast one. Features of convolution branches (batch,
/// channels, space...) are averaged over space first, as their heads pool them.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// Options for `PMRPolicy`: the original's defaults (main_Prototype_grad.py's arguments)
/// but `modulation_ends`.
///
/// Example:
/// ```
/// Balancer<PMRPolicy> balancer(net, PMRPolicy(PMROptions().alpha(1.0).modulation_ends(5)),
///                              BalancerOptions().warmup_epochs(0));
/// ```
struct PMROptions {
  /// Weight of a slow branch's prototype term (`--alpha`), >= 0.
  TORCH_ARG(double, alpha) = 1.0;
  /// Share of the previous prototypes kept at each update (`--momentum_coef`), in [0, 1).
  TORCH_ARG(double, momentum) = 0.2;
  /// The last epoch (counting from 0, warm-up included) with the prototype term; later
  /// steps train CE(y) alone and the policy does no work. Default: never (the original's
  /// `--modulation_ends` defaults to 100 of its default 150 epochs; its bash.sh gives 60
  /// of 100 for colored-and-gray MNIST).
  TORCH_ARG(std::int64_t, modulation_ends) = std::numeric_limits<std::int64_t>::max();
};

class PMRPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.pmr", 1};
  /// A copy is a snapshot to roll back to: every state tensor is replaced, never changed
  /// in place.
  static constexpr bool copy_is_snapshot = true;
  /// The original trains the fused output's loss (plus its prototype term).
  static constexpr Objective objective = Objective::fused;

  explicit PMRPolicy(const PMROptions& options = {}) : options(options) {
    TORCH_CHECK(std::isfinite(options.alpha()) && options.alpha() >= 0,
                "PMRPolicy: alpha must be a finite number >= 0, got ", options.alpha());
    TORCH_CHECK(options.momentum() >= 0 && options.momentum() < 1, "PMRPolicy: momentum must be in [0, 1), got ",
                options.momentum());
    TORCH_CHECK(options.modulation_ends() >= 0, "PMRPolicy: modulation_ends must be an epoch >= 0, got ",
                options.modulation_ends());
  }

  /// The network's branch count (the `Balancer` calls it).
  void set_branches(std::size_t branches) { detail::take_branch_count(branches_, branches, "PMRPolicy"); }

  /// Every step is regular: PMR acts on the loss.
  StepPlan next_plan() const { return StepPlan::regular(); }

  /// α · CE(−cdist(f_k, P_k), y) summed over the branches behind the leader at the latest
  /// step; undefined (no term) before the first prototypes and after `modulation_ends`.
  at::Tensor auxiliary_loss(const NetOutput& out, const at::Tensor& target) const {
    if (prototypes_.empty() || epoch_ > options.modulation_ends()) return {};
    TORCH_CHECK(out.features.size() == branches_, "PMRPolicy: the output has ", out.features.size(),
                " features for ", branches_, " branches");
    TORCH_CHECK(!out.heads.empty() && out.heads[0].defined() && out.heads[0].dim() == 2, "PMRPolicy: the heads must "
                "be (batch, classes) logits");
    check_classes(out.heads[0].size(1));
    at::Tensor term;
    for (std::size_t k = 0; k < branches_; ++k) {
      const at::Tensor f = checked_features(out.features[k], k, target);
      const at::Tensor ce = at::cross_entropy_loss(similarity(f, prototypes_[k]), target);
      const at::Tensor weighted = ce * coefficients_[static_cast<std::int64_t>(k)].to(ce.device(), ce.scalar_type());
      term = term.defined() ? term + weighted : weighted;
    }
    return term;
  }

  /// Leaves the gradients as they are. Adds the step's features to the class sums of the
  /// next prototypes and, once there are prototypes, scores every branch for the next
  /// step's term (α on each branch whose score is below the largest). Data-parallel, one
  /// sum over the ranks of the step's scores and sums, so every rank decides alike.
  void modulate_gradients(const StepGradients& step) {
    TORCH_CHECK(step.features.size() == branches_, "PMRPolicy: ", step.features.size(), " features for ",
                branches_, " branches");
    TORCH_CHECK(!step.heads.empty() && step.heads[0].defined() && step.heads[0].dim() == 2, "PMRPolicy: the heads "
                "must be (batch, classes) logits");
    TORCH_CHECK(step.target.defined() && step.target.dim() == 1 && step.target.scalar_type() == at::kLong,
                "PMRPolicy: the targets must be a (batch) int64 tensor of class indices");
    const std::int64_t classes = step.heads[0].size(1);
    check_classes(classes);
    epoch_ = step.epoch;
    if (epoch_ > options.modulation_ends()) return;  // no term from here on: nothing to gather
    std::vector<at::Tensor> features;
    for (std::size_t k = 0; k < branches_; ++k) features.push_back(checked_features(step.features[k], k, step.target));
    const at::Tensor target = step.target;
    // One flat tensor for one sum over the ranks: [scores (N), counts (C), sums of each k].
    std::vector<at::Tensor> parts;
    const at::TensorOptions opts = features[0].options().dtype(at::kFloat);
    if (prototypes_.empty()) {
      parts.push_back(at::zeros({static_cast<std::int64_t>(branches_)}, opts));
    } else {
      std::vector<at::Tensor> scores;
      for (std::size_t k = 0; k < branches_; ++k) {
        const at::Tensor p = at::softmax(similarity(features[k], prototypes_[k].to(features[k].device())), 1);
        scores.push_back(p.gather(1, target.unsqueeze(1)).sum());
      }
      parts.push_back(at::stack(scores));
    }
    parts.push_back(at::zeros({classes}, opts).index_add(0, target, at::ones({target.size(0)}, opts)));
    for (const at::Tensor& f : features) {
      parts.push_back(at::zeros({classes, f.size(1)}, opts).index_add(0, target, f).flatten());
    }
    at::Tensor all = at::cat(parts);
    if (step.sum_across_ranks) step.sum_across_ranks(all);
    const auto n = static_cast<std::int64_t>(branches_);
    std::int64_t offset = n + classes;
    std::vector<at::Tensor> sums;
    for (const at::Tensor& f : features) {
      sums.push_back(all.slice(0, offset, offset + classes * f.size(1)).view({classes, f.size(1)}));
      offset += classes * f.size(1);
    }
    const at::Tensor counts = all.slice(0, n, n + classes);
    if (sums_.empty()) {
      sums_ = sums;
      counts_ = counts;
    } else {
      for (std::size_t k = 0; k < branches_; ++k) {
        TORCH_CHECK(sums_[k].sizes() == sums[k].sizes(), "PMRPolicy: branch ", k, "'s features are ",
                    sums[k].size(1), " wide, earlier steps' ", sums_[k].size(1));
        sums_[k] = sums_[k] + sums[k].to(sums_[k].device());
      }
      counts_ = counts_ + counts.to(counts_.device());
    }
    if (!prototypes_.empty()) {
      const at::Tensor s = all.slice(0, 0, n);
      coefficients_ = (s < s.max()).to(at::kFloat) * options.alpha();
    }
  }

  /// At every epoch boundary after warm-up: the class means of the features seen since
  /// the last update become the prototypes, P ← (1 − m)·mean + m·P (the first time, and
  /// for a class with no prototype yet, the mean; a class not seen keeps its prototype,
  /// or zeros before any).
  void start_epoch(std::int64_t) {
    if (epoch_ >= 0) ++epoch_;
    if (sums_.empty()) return;
    const at::Tensor seen = (counts_ > 0).unsqueeze(1);
    std::vector<at::Tensor> next;
    for (std::size_t k = 0; k < branches_; ++k) {
      const at::Tensor mean = sums_[k] / counts_.clamp_min(1).unsqueeze(1);
      at::Tensor p = mean;
      if (!prototypes_.empty()) {
        const at::Tensor old = prototypes_[k].to(mean.device());
        p = at::where(seen, at::where(had_.to(mean.device()).unsqueeze(1),
                                      (1 - options.momentum()) * mean + options.momentum() * old, mean),
                      old);
      }
      next.push_back(p);
    }
    had_ = had_.defined() ? had_.to(seen.device()).logical_or(seen.squeeze(1)) : seen.squeeze(1);
    prototypes_ = std::move(next);
    sums_.clear();
    counts_ = at::Tensor();
    if (!coefficients_.defined()) {
      coefficients_ = at::zeros({static_cast<std::int64_t>(branches_)}, prototypes_[0].options());
    }
  }

  /// Each branch's prototypes, (classes, width) (empty before the first update).
  const std::vector<at::Tensor>& prototypes() const { return prototypes_; }
  /// The coefficient of each branch's prototype term in the next step (α or 0; undefined
  /// before the first update; after `modulation_ends` the last ones, unused).
  const at::Tensor& coefficients() const { return coefficients_; }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("alpha", options.alpha());
    archive.write("momentum", options.momentum());
    archive.write("modulation_ends", options.modulation_ends());
    archive.write("epoch", epoch_);
    archive.write("has_prototypes", !prototypes_.empty());
    archive.write("has_sums", !sums_.empty());
    for (std::size_t k = 0; k < prototypes_.size(); ++k) archive.write(key("prototype", k), prototypes_[k]);
    for (std::size_t k = 0; k < sums_.size(); ++k) archive.write(key("sum", k), sums_[k]);
    if (!sums_.empty()) archive.write("counts", counts_);
    if (!prototypes_.empty()) {
      archive.write("seen", had_);
      archive.write("coefficients", coefficients_);
    }
  }

  /// Restores prototypes, sums and coefficients; other options or another branch count
  /// throw and change nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, alpha, momentum, ends, epoch, has_prototypes, has_sums;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() && archive.try_read("alpha", alpha) &&
                    alpha.isDouble() && archive.try_read("momentum", momentum) && momentum.isDouble() &&
                    archive.try_read("modulation_ends", ends) && ends.isInt() && archive.try_read("epoch", epoch) &&
                    epoch.isInt() && archive.try_read("has_prototypes", has_prototypes) && has_prototypes.isBool() &&
                    archive.try_read("has_sums", has_sums) && has_sums.isBool(),
                "PMRPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "PMRPolicy: the checkpoint was made "
                "for ", branches.toInt(), " branches, this policy balances ", branches_);
    for (const auto& [name, then, now] : {std::tuple{"alpha", alpha.toDouble(), options.alpha()},
                                          std::tuple{"momentum", momentum.toDouble(), options.momentum()}}) {
      TORCH_CHECK(then == now, "PMRPolicy: the checkpoint was made with ", name, " ", then, ", this policy has ", now);
    }
    TORCH_CHECK(ends.toInt() == options.modulation_ends(), "PMRPolicy: the checkpoint was made with "
                "modulation_ends ", ends.toInt(), ", this policy has ", options.modulation_ends());
    // Fresh tensors: read into a defined one, LibTorch would write in place.
    const auto read = [&](const std::string& name, std::int64_t dims) {
      at::Tensor t;
      TORCH_CHECK(archive.try_read(name, t) && t.defined() && t.dim() == dims && at::isFloatingType(t.scalar_type()) &&
                      at::isfinite(t).all().item<bool>(),
                  "PMRPolicy: damaged state in checkpoint (", name, ")");
      return t.detach();
    };
    std::vector<at::Tensor> prototypes, sums;
    at::Tensor counts, seen, coefficients;
    for (std::size_t k = 0; has_prototypes.toBool() && k < branches_; ++k) prototypes.push_back(read(key("prototype", k), 2));
    for (std::size_t k = 0; has_sums.toBool() && k < branches_; ++k) sums.push_back(read(key("sum", k), 2));
    if (has_sums.toBool()) counts = read("counts", 1);
    if (has_prototypes.toBool()) {
      TORCH_CHECK(archive.try_read("seen", seen) && seen.dim() == 1 && seen.scalar_type() == at::kBool,
                  "PMRPolicy: damaged state in checkpoint (seen)");
      coefficients = read("coefficients", 1);
      // Each is alpha or 0: a record of this policy, or damaged.
      TORCH_CHECK(((coefficients == 0) | (coefficients == options.alpha())).all().item<bool>(),
                  "PMRPolicy: damaged state in checkpoint (coefficients other than 0 and alpha ", options.alpha(),
                  ")");
    }
    const std::int64_t classes = !prototypes.empty() ? seen.size(0) : counts.defined() ? counts.size(0) : 0;
    bool consistent = (!coefficients.defined() || coefficients.size(0) == static_cast<std::int64_t>(branches_)) &&
                      ((prototypes.empty() && sums.empty()) || classes > 0) &&
                      (!counts.defined() || (counts >= 0).all().item<bool>());
    for (std::size_t k = 0; k < branches_; ++k) {
      if (!prototypes.empty()) consistent = consistent && prototypes[k].size(0) == classes;
      if (!sums.empty()) consistent = consistent && sums[k].size(0) == classes && counts.size(0) == classes;
      if (!prototypes.empty() && !sums.empty()) consistent = consistent && sums[k].size(1) == prototypes[k].size(1);
    }
    TORCH_CHECK(consistent, "PMRPolicy: damaged state in checkpoint (prototypes, sums and counts of different "
                "shapes)");
    prototypes_ = std::move(prototypes);
    sums_ = std::move(sums);
    counts_ = counts;
    had_ = seen;
    coefficients_ = coefficients;
    epoch_ = epoch.toInt();
  }

  PMROptions options;

 private:
  // −‖f_i − P_c‖ for every row i and class c: the original's `-EU_dist(f, proto)`.
  // The distances computed as differences, never through ‖x‖² + ‖p‖² − 2x·p (cdist's
  // default above 25 rows), which loses precision for nearby points.
  static at::Tensor similarity(const at::Tensor& f, const at::Tensor& prototypes) {
    return -at::cdist(f, prototypes.to(f.device(), f.scalar_type()), 2.0, /*donot_use_mm_for_euclid_dist*/ 2);
  }

  // The heads' class count against the prototypes' rows and the sums'.
  void check_classes(std::int64_t classes) const {
    const std::int64_t rows = !prototypes_.empty() ? prototypes_[0].size(0) : counts_.defined() ? counts_.size(0) : classes;
    TORCH_CHECK(rows == classes, "PMRPolicy: the heads have ", classes, " classes, the prototypes and sums ", rows);
  }

  // Branch k's features as (batch, width) floats: a map (batch, channels, space...) is
  // averaged over space, as the library's branches pool it for their heads (the
  // original's encoders hand over the pooled vector).
  at::Tensor checked_features(const at::Tensor& f, std::size_t k, const at::Tensor& target) const {
    TORCH_CHECK(f.defined() && f.dim() >= 2 && target.defined() && f.size(0) == target.size(0), "PMRPolicy: branch ",
                k, "'s features must be (batch, width) or (batch, channels, ...) for the ",
                target.defined() ? target.size(0) : 0, " targets, got ",
                f.defined() ? f.sizes().vec() : std::vector<std::int64_t>{});
    const at::Tensor v = pooled_features(f).to(at::kFloat);
    TORCH_CHECK(prototypes_.empty() || prototypes_[k].size(1) == v.size(1), "PMRPolicy: branch ", k,
                "'s features are ", v.size(1), " wide, its prototypes ", prototypes_[k].size(1));
    return v;
  }

  static std::string key(const char* name, std::size_t k) { return name + std::string("_") + std::to_string(k); }

  std::size_t branches_ = 0;  // 0 until a Balancer gives the network's
  std::int64_t epoch_ = -1;   // the epoch of the latest step (-1 before one)
  std::vector<at::Tensor> prototypes_, sums_;
  at::Tensor counts_, had_, coefficients_;  // rows per class since the update; classes with a prototype
};
template <>
inline constexpr bool detail::kLibraryPolicy<PMRPolicy> = true;

static_assert(BalancingPolicy<PMRPolicy> && TakesBranchCount<PMRPolicy> && ModulatesGradients<PMRPolicy> &&
              AddsAuxiliaryLoss<PMRPolicy> && HasEpochHook<PMRPolicy> && HasState<PMRPolicy>);

}  // namespace mmbalance
