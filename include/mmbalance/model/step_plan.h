#pragma once
/// \file
/// The steps of balanced learning for N branches: regular, or hold branch k (the N-branch
/// form of `StepKind`; docs/algorithm.md §5).

#include <cmath>
#include <cstddef>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>

#include <c10/util/Exception.h>

#include "mmbalance/model/step_kind.h"

namespace mmbalance {

/// Which branch, if any, a training step of an N-branch network re-balances: every fusion
/// module holds that branch's gate at its running average, so the branch hears no other
/// modality and must learn from its own. N branches have N + 1 plans; a `StepKind` is one
/// of them wherever a plan is expected (`return StepKind::regular;` from `next_plan()`).
class StepPlan {
 public:
  /// Every branch live; feeds the learning-speed meter.
  static constexpr StepPlan regular() { return StepPlan(); }
  /// Branch `branch` held (re-balanced).
  static constexpr StepPlan hold(std::size_t branch) { return StepPlan(branch); }
  /// The two-branch step kinds: rebalance_m0 holds branch 0, rebalance_m1 branch 1.
  constexpr StepPlan(StepKind kind) {  // implicit: a kind is a plan
    if (kind == StepKind::rebalance_m0) held_ = 0;
    if (kind == StepKind::rebalance_m1) held_ = 1;
  }

  /// This plan with branch `branch` modulated in the forward pass: each sample is kept
  /// with probability `keep` (drawn per sample from LibTorch's generator, as dropout
  /// draws), its features (the tensor the branch's head reads) multiplied by `scale`, or
  /// dropped: zero wherever a fusion module reads the branch and where its head does. A
  /// policy's forward-side intervention (e.g. dropping the dominant modality); one branch
  /// a step.
  constexpr StepPlan modulating(std::size_t branch, double keep, double scale = 1.0) const {
    StepPlan plan = *this;
    plan.modulated_ = branch;
    plan.keep_ = keep;
    plan.scale_ = scale;
    return plan;
  }

  /// Why a network of `branches` branches cannot run this plan ("holds branch 3, ..."), or
  /// an empty string when it can.
  std::string problem(std::size_t branches) const {
    const bool bad_hold = held_ && *held_ >= branches;
    const bool bad_modulation =
        modulated_ && (*modulated_ >= branches || !(keep_ >= 0 && keep_ <= 1) || !std::isfinite(scale_));
    if (!bad_hold && !bad_modulation) return {};
    std::ostringstream why;
    if (bad_hold) {
      why << "holds branch " << *held_;
    } else {
      why << "modulates branch " << *modulated_ << "'s features (kept with probability " << keep_
          << ", scaled by " << scale_ << ")";
    }
    why << ", the network has " << branches << " branches (0.." << branches - 1 << ")";
    if (!bad_hold) why << ", and a probability in [0, 1] and a finite scale are needed";
    return why.str();
  }

  constexpr bool is_regular() const { return !held_.has_value(); }
  /// The held branch; empty for a regular step.
  constexpr std::optional<std::size_t> held_branch() const { return held_; }
  /// The branch whose features are modulated (`modulating`); empty for none.
  constexpr std::optional<std::size_t> modulated_branch() const { return modulated_; }
  constexpr double keep_probability() const { return keep_; }
  constexpr double feature_scale() const { return scale_; }

  friend constexpr bool operator==(const StepPlan&, const StepPlan&) = default;

 private:
  constexpr StepPlan() = default;
  constexpr explicit StepPlan(std::size_t branch) : held_(branch) {}
  std::optional<std::size_t> held_;
  std::optional<std::size_t> modulated_;
  double keep_ = 1.0;
  double scale_ = 1.0;
};

/// The `StepKind` of a plan of a two-branch network (the inverse of `StepPlan(StepKind)`); a
/// plan holding a branch other than 0 or 1 throws, naming it.
inline StepKind to_step_kind(const StepPlan& plan) {
  if (plan.is_regular()) return StepKind::regular;
  const std::size_t held = *plan.held_branch();
  TORCH_CHECK(held < 2, "to_step_kind: the plan holds branch ", held,
              "; a two-branch step holds branch 0 or 1");
  return held == 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1;
}

/// "regular" or "rebalance_m<k>" (branch k held), the names of `StepKind` for N = 2 (the
/// modulation of features is not part of the name: plans are counted by what they hold).
inline std::string to_string(const StepPlan& plan) {
  return plan.is_regular() ? "regular" : "rebalance_m" + std::to_string(*plan.held_branch());
}

inline std::ostream& operator<<(std::ostream& os, const StepPlan& plan) {
  return os << to_string(plan);
}

}  // namespace mmbalance
