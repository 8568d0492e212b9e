#pragma once
/// \file
/// Guided balancing (§4.2, Algorithm 1; docs/algorithm.md §6), for any number of branches.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"

namespace mmbalance {

/// Options for `GuidedPolicy`.
///
/// Example:
/// ```
/// GuidedPolicy policy(GuidedOptions().alpha(0.1).Q(5));
/// ```
struct GuidedOptions {
  /// Tolerance on the imbalance of the learning speeds (log10 scale: |d_speed| for two
  /// branches, the spread max_k s_k - min_k s_k for more) before re-balancing starts;
  /// >= 0, may be infinite (never re-balance).
  TORCH_ARG(double, alpha) = 0.1;
  /// Number of re-balancing steps in one window.
  TORCH_ARG(std::int64_t, Q) = 5;
};

/// While the speeds' spread is within alpha, regular steps. When a regular step leaves
/// spread > alpha, the next Q steps hold the fastest branch (largest s_k: the branch that
/// leans most on the others), so it must learn from its own modality. For two branches the
/// spread is |d_speed| and the fastest branch is 0 exactly when d_speed > 0: the paper's
/// rule, accelerating m0 if d_speed > 0, else m1.
class GuidedPolicy {
 public:
  /// Its name and state format in checkpoints: version 1 was the two-branch policy's
  /// (mode, last d_speed), which `load(archive, 1)` still reads.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.guided", 2};
  /// A copy is a snapshot to roll back to (it holds no tensor).
  static constexpr bool copy_is_snapshot = true;
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  explicit GuidedPolicy(const GuidedOptions& options = {}) : options(options) {
    // +infinity is allowed: a guided policy that never re-balances, measuring only.
    TORCH_CHECK(options.alpha() >= 0, "GuidedPolicy: alpha must be >= 0, got ", options.alpha());
    TORCH_CHECK(options.Q() >= 1, "GuidedPolicy: Q must be >= 1, got ", options.Q());
  }

  /// The constructor of `NWayGuidedPolicy`: the count is checked when a `Balancer` gives
  /// the network's.
  [[deprecated("construct GuidedPolicy(options): the Balancer gives the branch count")]]
  GuidedPolicy(std::size_t branches, const GuidedOptions& options) : GuidedPolicy(options) {
    set_branches(branches);
  }

  /// The network's branch count (the `Balancer` calls it): 2 or more, and the count the
  /// policy was made for if it was given one.
  void set_branches(std::size_t branches) { detail::take_branch_count(branches_, branches, "GuidedPolicy"); }

  StepPlan next_plan() {
    if (!window_open_) return StepPlan::regular();
    if (++window_step_ >= options.Q()) window_open_ = false;
    return StepPlan::hold(held_);
  }

  /// Opens a window of Q steps holding `speeds.fastest` when the spread exceeds alpha;
  /// speeds that are not defined (NaN) change nothing.
  void observe_speeds(const SpeedSummary& speeds) {
    TORCH_CHECK(speeds.speeds.size() == branches_, "GuidedPolicy: got the speeds of ",
                speeds.speeds.size(), " branches, the policy balances ", branches_,
                branches_ == 0 ? " (no Balancer has given it a count: set_branches)" : "");
    if (speeds.fastest < 0 || !(speeds.spread > options.alpha())) return;
    held_ = static_cast<std::size_t>(speeds.fastest);
    window_step_ = 0;
    window_open_ = true;
  }

  /// Whether the coming steps re-balance, the branch the open (or last) window holds, and
  /// the window's steps taken.
  bool window_open() const { return window_open_; }
  std::size_t held_branch() const { return held_; }
  std::int64_t window_step() const { return window_step_; }

  /// Writes the branch count, the window (open or not, held branch, steps taken) and the
  /// options.
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("window_open", window_open_);
    archive.write("held", static_cast<std::int64_t>(held_));
    archive.write("window_step", window_step_);
    archive.write("alpha", options.alpha());
    archive.write("Q", options.Q());
  }

  /// Restores what `save` wrote. A run resumes only with the options and branch count it
  /// was saved with: anything else throws naming both values, and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, open, held;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() &&
                    archive.try_read("window_open", open) && open.isBool() &&
                    archive.try_read("held", held) && held.isInt(),
                "GuidedPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "GuidedPolicy: the "
                "checkpoint was made for ", branches.toInt(), " branches, this policy balances ",
                branches_);
    TORCH_CHECK(held.toInt() >= 0 && held.toInt() < static_cast<std::int64_t>(branches_),
                "GuidedPolicy: held branch ", held.toInt(), " in checkpoint is outside 0..",
                branches_ - 1);
    restore(archive, open.toBool(), static_cast<std::size_t>(held.toInt()));
  }

  /// Reads the two-branch format of version 1 (mode, window step, last d_speed): the window
  /// holds branch 0 where that d_speed was > 0, else branch 1, as the two-branch policy
  /// decided each of its steps.
  void load(torch::serialize::InputArchive& archive, std::int64_t version) {
    TORCH_CHECK(version == 1, "GuidedPolicy: no format version ", version);
    TORCH_CHECK(branches_ == 2, "GuidedPolicy: the checkpoint holds a two-branch state, this "
                "policy balances ", branches_, " branches");
    c10::IValue mode, last;
    TORCH_CHECK(archive.try_read("mode", mode) && mode.isInt() &&
                    archive.try_read("last_d_speed", last) && last.isDouble(),
                "GuidedPolicy: damaged state in checkpoint");
    TORCH_CHECK(mode.toInt() == 0 || mode.toInt() == 1, "GuidedPolicy: bad mode ", mode.toInt(),
                " in checkpoint");
    restore(archive, mode.toInt() == 1, last.toDouble() > 0 ? 0 : 1);
  }

  GuidedOptions options;

 private:
  // The window step and options, common to both formats; then commits.
  void restore(torch::serialize::InputArchive& archive, bool open, std::size_t held) {
    c10::IValue window_step, alpha, q;
    TORCH_CHECK(archive.try_read("window_step", window_step) && window_step.isInt() &&
                    archive.try_read("alpha", alpha) && alpha.isDouble() &&
                    archive.try_read("Q", q) && q.isInt(),
                "GuidedPolicy: damaged state in checkpoint");
    TORCH_CHECK(alpha.toDouble() == options.alpha(), "GuidedPolicy: the checkpoint was made with "
                "alpha ", alpha.toDouble(), ", this policy has alpha ", options.alpha(),
                "; resume with the options the run started with");
    TORCH_CHECK(q.toInt() == options.Q(), "GuidedPolicy: the checkpoint was made with Q ",
                q.toInt(), ", this policy has Q ", options.Q(),
                "; resume with the options the run started with");
    TORCH_CHECK(window_step.toInt() >= 0 && window_step.toInt() <= options.Q(),
                "GuidedPolicy: window step ", window_step.toInt(), " in checkpoint is outside [0, Q=",
                options.Q(), "]");
    window_open_ = open;
    held_ = held;
    window_step_ = window_step.toInt();
  }

  std::size_t branches_ = 0;      // 0 until a Balancer gives the network's
  bool window_open_ = false;
  std::size_t held_ = 0;          // the branch the open (or last) window holds
  std::int64_t window_step_ = 0;  // steps of the window taken
};
template <>
inline constexpr bool detail::kLibraryPolicy<GuidedPolicy> = true;

/// The N-branch name of `GuidedPolicy`, which now balances any number of branches.
using NWayGuidedPolicy [[deprecated("use GuidedPolicy(options): it balances any number of branches")]] =
    GuidedPolicy;

static_assert(BalancingPolicy<GuidedPolicy> && TakesBranchCount<GuidedPolicy> &&
              ObservesSpeeds<GuidedPolicy> && HasState<GuidedPolicy> && HoldsFusionGates<GuidedPolicy>);

}  // namespace mmbalance
