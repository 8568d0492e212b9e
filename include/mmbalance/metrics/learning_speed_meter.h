#pragma once
/// \file
/// Conditional learning speed (docs/algorithm.md §4): μ(θ; i) = ||G||² / ||θ||² per parameter
/// group, accumulated over regular steps, all on the parameters' device.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/detail/cpu_sums_of_squares.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// The learning speeds of N branches derived from the accumulators M (host values;
/// docs/algorithm.md §4): s_k = log10(M(θ_k') / M(θ_k)), how fast branch k's fusion path
/// learns relative to branch k itself. Two measures of imbalance, kept apart: `d_speed`,
/// the paper's signed two-branch value, and `spread`, the unsigned one of any N.
struct SpeedSummary {
  std::vector<double> speeds;  ///< s_k; NaN where an accumulator is not positive and finite
  /// max_k s_k - min_k s_k (>= 0; for two branches |d_speed|). NaN if any s_k is.
  double spread = NAN;
  /// The branch with the largest s_k (the one whose fusion path outpaces it most; the
  /// lowest index on ties), or -1 when a speed is NaN.
  std::int64_t fastest = -1;
  /// Two branches only: s(m1|m0) - s(m0|m1) = s_0 - s_1, signed (> 0: branch 0 leans on
  /// m1). NaN if either speed is, and for N >= 3 (read `spread`).
  double d_speed = NAN;
  double s_m1_given_m0 = NAN;  ///< two branches: s_0 (NaN for N >= 3)
  double s_m0_given_m1 = NAN;  ///< two branches: s_1 (NaN for N >= 3)

  /// From 2N accumulators (N >= 2): θ_0 .. θ_{N-1}, then θ_0' .. θ_{N-1}'. A speed is NaN unless both of its accumulators are
  /// positive and finite: before any regular step, and for a group that never had a
  /// gradient (frozen), where log10 would give ±inf.
  static SpeedSummary from_accumulators(const std::vector<double>& m) {
    TORCH_CHECK(m.size() >= 4 && m.size() % 2 == 0, "SpeedSummary: needs 2N >= 4 "
                "accumulators (the branches', then the fusion paths'), got ", m.size());
    const std::size_t n = m.size() / 2;
    std::vector<double> speeds;
    for (std::size_t k = 0; k < n; ++k) {
      const double fusion = m[n + k], branch = m[k];
      const bool defined = std::isfinite(fusion) && std::isfinite(branch) && fusion > 0 && branch > 0;
      speeds.push_back(defined ? std::log10(fusion / branch) : NAN);
    }
    return from_speeds(std::move(speeds));
  }

  /// From the speeds s_0 .. s_{N-1} themselves (N >= 2).
  static SpeedSummary from_speeds(std::vector<double> speeds) {
    TORCH_CHECK(speeds.size() >= 2, "SpeedSummary: needs the speeds of N >= 2 branches, got ",
                speeds.size());
    SpeedSummary s;
    s.speeds = std::move(speeds);
    if (s.speeds.size() == 2) {
      s.s_m1_given_m0 = s.speeds[0];
      s.s_m0_given_m1 = s.speeds[1];
      s.d_speed = s.speeds[0] - s.speeds[1];
    }
    if (std::none_of(s.speeds.begin(), s.speeds.end(), [](double v) { return std::isnan(v); })) {
      const auto hi = std::max_element(s.speeds.begin(), s.speeds.end());  // first on ties
      s.spread = *hi - *std::min_element(s.speeds.begin(), s.speeds.end());
      s.fastest = hi - s.speeds.begin();
    }
    return s;
  }
};

/// The N-branch name of `SpeedSummary`, which now serves any number of branches.
using NWaySpeedSummary [[deprecated("use SpeedSummary (spread replaces imbalance for N >= 3, d_speed for N = 2)")]] =
    SpeedSummary;

/// Measures μ for the 2N parameter groups of a network (`ParameterGroups`) with one fused
/// reduction over every distinct parameter and every gradient (`_foreach_norm` on a GPU;
/// on the CPU one pass of our own, accumulated in double across blocks, since LibTorch's
/// CPU `_foreach_norm` dispatches one reduction per tensor) and one masked sum per group.
/// A parameter in several groups (MMTM's joint layer) is reduced once. Nothing is read to
/// the host unless asked for.
///
/// Call `measure()` after `backward()` and before the optimizer step: ||θ|| is read at
/// the point where the gradient was taken, as the official code does.
class LearningSpeedMeter {
 public:
  /// The 2N groups of an N-branch network: θ_0 .. θ_{N-1}, then θ_0' .. θ_{N-1}'. Every tensor the meter returns has one entry per group. A
  /// late-fusion network has no fusion paths: all of θ_k' empty; such a group's μ is 0
  /// (nothing moves), so the speeds s_k are undefined (NaN) rather than the step.
  explicit LearningSpeedMeter(const ParameterGroups& groups) {
    TORCH_CHECK(groups.branch.size() >= 2 && groups.fusion.size() == groups.branch.size(),
                "LearningSpeedMeter: needs the groups of N >= 2 branches and as many fusion "
                "paths, got ", groups.branch.size(), " and ", groups.fusion.size());
    branches_ = groups.branch.size();
    late_fusion_ = std::all_of(groups.fusion.begin(), groups.fusion.end(),
                               [](const auto& g) { return g.empty(); });
    std::vector<const std::vector<at::Tensor>*> lists;
    for (const auto& g : groups.branch) lists.push_back(&g);
    for (const auto& g : groups.fusion) lists.push_back(&g);
    const std::size_t count = lists.size();
    std::unordered_map<const void*, std::int64_t> index;
    std::vector<std::vector<bool>> member;
    group_numel_.assign(count, 0);
    for (std::size_t g = 0; g < count; ++g) {
      TORCH_CHECK(!lists[g]->empty() || (late_fusion_ && g >= branches_),
                  "LearningSpeedMeter: parameter group ", group_name(g), " is empty",
                  g >= branches_ ? " (a late-fusion network has no fusion path at all; this "
                                   "one has some)" : "");
      for (const auto& p : *lists[g]) {
        TORCH_CHECK(p.defined(), "LearningSpeedMeter: undefined parameter in group ",
                    group_name(g));
        auto [it, inserted] =
            index.emplace(p.unsafeGetTensorImpl(), static_cast<std::int64_t>(params_.size()));
        if (inserted) {
          params_.push_back(p);
          member.emplace_back(count, false);
        }
        member[static_cast<std::size_t>(it->second)][g] = true;
        group_numel_[g] += p.numel();
      }
    }
    const auto n = static_cast<std::int64_t>(params_.size());
    membership_ = at::zeros({n, static_cast<std::int64_t>(count)}, at::kBool);
    auto acc = membership_.accessor<bool, 2>();
    for (std::int64_t i = 0; i < n; ++i)
      for (std::size_t g = 0; g < count; ++g) acc[i][static_cast<std::int64_t>(g)] = member[static_cast<std::size_t>(i)][g];
    accumulated_ = at::zeros({static_cast<std::int64_t>(count)}, at::kDouble);
    if (late_fusion_) {  // ||θ||² of an empty group reads 1, so its μ = 0 / 1
      empty_groups_ = at::zeros({static_cast<std::int64_t>(count)}, at::kDouble);
      empty_groups_.narrow(0, static_cast<std::int64_t>(branches_), static_cast<std::int64_t>(branches_)).fill_(1.0);
    }
    follow_device();
  }

  /// Whether the network has no fusion paths (late fusion): every θ_k' is empty.
  bool late_fusion() const { return late_fusion_; }

  /// How many groups (2N for N branches).
  std::size_t num_groups() const { return 2 * branches_; }

  /// "theta<k> (branch <k>)" or "theta<k>' (fusion path into branch <k>)" for group g.
  std::string group_name(std::size_t g) const {
    const std::size_t k = g % branches_;
    return g < branches_ ? "theta" + std::to_string(k) + " (branch " + std::to_string(k) + ")"
                         : "theta" + std::to_string(k) + "' (fusion path into branch " +
                               std::to_string(k) + ")";
  }

  /// Squared norms of this step, a (2, groups) double tensor on the parameters' device:
  /// row 0 ||G||² and row 1 ||θ||² per group. An undefined gradient counts as zero.
  at::Tensor measure() { return squared_norms(/*with_parameters=*/true); }

  /// Row 0 of `measure()` alone, ||G||² per group (doubles on the device), in a pass over
  /// the gradients only: what a re-balancing step's check needs.
  at::Tensor measure_gradients() { return squared_norms(/*with_parameters=*/false)[0]; }

  /// μ = ||G||² / ||θ||² per group from a measurement (device tensor, one entry a group):
  /// a step's ratio, which M adds up; the learning speeds s_k are derived from M.
  static at::Tensor mu(const at::Tensor& measurement) { return measurement[0] / measurement[1]; }
  [[deprecated("LearningSpeedMeter::speeds returned μ, not the speeds s_k: call mu()")]]
  static at::Tensor speeds(const at::Tensor& measurement) { return mu(measurement); }

  /// Adds `mu` (from `mu()`) to the accumulators M.
  void accumulate(const at::Tensor& mu) {
    follow_device();
    accumulated_.add_(mu);
    ++observed_;
  }

  /// Adds `mu` to M only where `valid` (a bool scalar on the device) is true, without
  /// reading it: a step left out is counted in `skipped()` instead of `steps()`.
  void accumulate_if(const at::Tensor& mu, const at::Tensor& valid) {
    follow_device();
    accumulated_.add_(at::where(valid, mu, at::zeros_like(mu)));
    if (!skipped_.defined()) skipped_ = at::zeros({}, at::TensorOptions(at::kLong).device(device_));
    skipped_.add_(valid.logical_not());
    ++observed_;
  }

  /// M(θ) per group: a device tensor of `num_groups()` doubles.
  const at::Tensor& accumulated() const { return accumulated_; }

  /// Regular steps accumulated so far (reads one number from the device once a step has
  /// gone through `accumulate_if`).
  std::int64_t steps() const { return observed_ - skipped(); }

  /// Regular steps `accumulate_if` left out (reads one number from the device).
  std::int64_t skipped() const { return skipped_.defined() ? skipped_.item<std::int64_t>() : 0; }

  /// Reads M to the host (one small read) and derives every branch's speed.
  SpeedSummary summary() const {
    const at::Tensor m = accumulated_.to(at::kCPU).contiguous();
    const double* v = m.data_ptr<double>();
    return SpeedSummary::from_accumulators({v, v + m.numel()});
  }

  /// Elements per group; a checkpoint made for other groups is rejected on load.
  const std::vector<std::int64_t>& group_numel() const { return group_numel_; }

  /// Restores M and the step counts (a loaded tensor may live on any device).
  void restore(const at::Tensor& m, std::int64_t steps, std::int64_t skipped) {
    TORCH_CHECK(m.dim() == 1 && m.size(0) == static_cast<std::int64_t>(num_groups()),
                "LearningSpeedMeter: accumulators must have ", num_groups(), " entries, got ",
                detail::shape_string(m));
    TORCH_CHECK(steps >= 0 && skipped >= 0 &&
                    steps <= std::numeric_limits<std::int64_t>::max() - skipped,
                "LearningSpeedMeter: step counts must be >= 0 and their sum representable, got ",
                steps, " accumulated and ", skipped, " skipped");
    accumulated_ = m.to(at::kDouble).to(device_);
    observed_ = steps + skipped;
    skipped_ = skipped > 0 ? at::full({}, skipped, at::TensorOptions(at::kLong).device(device_))
                           : at::Tensor();
  }

  void reset() {
    accumulated_.zero_();
    observed_ = 0;
    skipped_ = at::Tensor();
  }

 private:
  // One fused reduction over every distinct gradient (and parameter), then a masked sum
  // per group: (2 or 1, groups).
  at::Tensor squared_norms(bool with_parameters) {
    at::NoGradGuard no_grad;
    follow_device();
    std::vector<at::Tensor> tensors;
    tensors.reserve(2 * params_.size());
    for (const auto& p : params_) {
      const at::Tensor& g = p.grad();
      tensors.push_back(g.defined() ? g : zero_);
    }
    if (with_parameters) {
      for (const auto& p : params_) tensors.push_back(p);
    }
    at::Tensor sq;
    if (detail::cpu_sums_of_squares_apply(tensors)) {
      sq = detail::cpu_sums_of_squares(tensors);
    } else {
      sq = at::stack(at::_foreach_norm(tensors)).to(at::kDouble).square();
    }
    sq = sq.view({with_parameters ? 2 : 1, -1, 1});
    // A masked sum, not a product with a 0/1 matrix: 0 * NaN would spread one bad
    // gradient into every group.
    at::Tensor sums = at::where(membership_, sq, 0.0).sum(1);
    if (with_parameters && late_fusion_) sums[1].add_(empty_groups_);
    return sums;
  }

  // Keeps the accumulators where the parameters are; a model moved after the meter was
  // built (`net->to(device)`) is followed on the next call. Device checks are host-side.
  void follow_device() {
    const at::Device device = params_.front().device();
    if (zero_.defined() && device == device_) return;
    device_ = device;
    membership_ = membership_.to(device);
    accumulated_ = accumulated_.to(device);
    if (skipped_.defined()) skipped_ = skipped_.to(device);
    if (empty_groups_.defined()) empty_groups_ = empty_groups_.to(device);
    zero_ = at::zeros({}, params_.front().options());
  }

  std::vector<at::Tensor> params_;
  at::Tensor membership_;   // (distinct parameters, groups): true where a parameter is in a group
  at::Tensor accumulated_;  // M per group
  at::Tensor zero_;         // stands in for a missing gradient
  bool late_fusion_ = false;
  at::Tensor empty_groups_;  // late fusion: 1 for each (empty) fusion group, else 0
  at::Device device_{at::kCPU};
  std::size_t branches_ = 0;
  std::vector<std::int64_t> group_numel_;
  std::int64_t observed_ = 0;  // regular steps given to accumulate or accumulate_if
  at::Tensor skipped_;         // of those, left out by accumulate_if (device, lazily made)
};

}  // namespace mmbalance
