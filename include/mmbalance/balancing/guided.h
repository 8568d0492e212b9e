#pragma once
/// \file
/// Guided balancing (§4.2, Algorithm 1; docs/algorithm.md §6).

#include <cmath>
#include <cstdint>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy.h"

namespace mmbalance {

/// Options for `GuidedPolicy`.
///
/// Example:
/// ```
/// GuidedPolicy policy(GuidedOptions().alpha(0.1).Q(5));
/// ```
struct GuidedOptions {
  /// Tolerance on |d_speed| (log10 scale) before re-balancing starts; >= 0, may be
  /// infinite (never re-balance).
  TORCH_ARG(double, alpha) = 0.1;
  /// Number of re-balancing steps in one window.
  TORCH_ARG(std::int64_t, Q) = 5;
};

/// While |d_speed| <= alpha, regular steps. When a regular step leaves |d_speed| > alpha,
/// the next Q steps re-balance: accelerating m0 if d_speed > 0, else m1, where d_speed is
/// the value of the last regular step.
class GuidedPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.guided", 1};
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  enum class Mode : std::uint8_t { regular = 0, rebalance = 1 };

  explicit GuidedPolicy(const GuidedOptions& options = {}) : options(options) {
    // +infinity is allowed: a guided policy that never re-balances, measuring only.
    TORCH_CHECK(options.alpha() >= 0, "GuidedPolicy: alpha must be >= 0, got ", options.alpha());
    TORCH_CHECK(options.Q() >= 1, "GuidedPolicy: Q must be >= 1, got ", options.Q());
  }

  StepKind next_step() {
    if (mode_ == Mode::regular) return StepKind::regular;
    if (++window_step_ >= options.Q()) mode_ = Mode::regular;
    return last_d_speed_ > 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1;
  }

  void observe_d_speed(double d_speed) {
    last_d_speed_ = d_speed;
    if (std::abs(d_speed) > options.alpha()) {
      window_step_ = 0;
      mode_ = Mode::rebalance;
    }
  }

  Mode mode() const { return mode_; }
  std::int64_t window_step() const { return window_step_; }
  double last_d_speed() const { return last_d_speed_; }

  /// Writes the mode, the window counter, the last d_speed and the options (alpha, Q).
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("mode", static_cast<std::int64_t>(mode_));
    archive.write("window_step", window_step_);
    archive.write("last_d_speed", last_d_speed_);
    archive.write("alpha", options.alpha());
    archive.write("Q", options.Q());
  }

  /// Restores what `save` wrote. A run resumes only with the options it was saved with:
  /// another alpha or Q would change the decisions, so it throws naming the option and
  /// both values, and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue mode, window_step, last, alpha, q;
    TORCH_CHECK(archive.try_read("mode", mode) && archive.try_read("window_step", window_step) &&
                    archive.try_read("last_d_speed", last) && mode.isInt() &&
                    window_step.isInt() && last.isDouble(),
                "GuidedPolicy: damaged state in checkpoint");
    TORCH_CHECK(archive.try_read("alpha", alpha) && alpha.isDouble() &&
                    archive.try_read("Q", q) && q.isInt(),
                "GuidedPolicy: damaged options in checkpoint");
    TORCH_CHECK(alpha.toDouble() == options.alpha(), "GuidedPolicy: the checkpoint was made with "
                "alpha ", alpha.toDouble(), ", this policy has alpha ", options.alpha(),
                "; resume with the options the run started with");
    TORCH_CHECK(q.toInt() == options.Q(), "GuidedPolicy: the checkpoint was made with Q ",
                q.toInt(), ", this policy has Q ", options.Q(),
                "; resume with the options the run started with");
    TORCH_CHECK(mode.toInt() == 0 || mode.toInt() == 1, "GuidedPolicy: bad mode ",
                mode.toInt(), " in checkpoint");
    TORCH_CHECK(window_step.toInt() >= 0 && window_step.toInt() <= options.Q(),
                "GuidedPolicy: window step ", window_step.toInt(), " in checkpoint is outside [0, Q=",
                options.Q(), "]");
    mode_ = static_cast<Mode>(mode.toInt());
    window_step_ = window_step.toInt();
    last_d_speed_ = last.toDouble();
  }

  GuidedOptions options;

 private:
  Mode mode_ = Mode::regular;
  std::int64_t window_step_ = 0;
  double last_d_speed_ = 0.0;
};
template <>
inline constexpr bool detail::kLibraryPolicy<GuidedPolicy> = true;

static_assert(BalancingPolicy<GuidedPolicy> && ObservesSpeed<GuidedPolicy> &&
              HasState<GuidedPolicy> && HoldsFusionGates<GuidedPolicy>);

}  // namespace mmbalance
