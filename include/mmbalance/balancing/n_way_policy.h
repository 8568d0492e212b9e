#pragma once
/// \file
/// Balancing policies for N branches: the `NWayBalancingPolicy` concept, and the guided
/// and random policies over the N + 1 step plans (docs/algorithm.md §6, "N branches").

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>

#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/guided.h"
#include "mmbalance/balancing/random.h"
#include "mmbalance/detail/engine_state.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Decides the step plan of each training step of an N-branch network after warm-up.
/// Required: `next_plan()`. Optional: `observe_speeds(const NWaySpeedSummary&)`, called
/// after every regular step whose speeds are defined; `start_epoch`, `save`/`load` as for
/// `BalancingPolicy`. Policies must be copyable.
template <class P>
concept NWayBalancingPolicy = std::copyable<P> && requires(P& p) {
  { p.next_plan() } -> std::same_as<StepPlan>;
};

template <class P>
concept ObservesBranchSpeeds = requires(P& p, const NWaySpeedSummary& s) { p.observe_speeds(s); };

/// Guided balancing for N branches: while the imbalance of the learning speeds is within
/// alpha, regular steps; when a regular step leaves |imbalance| > alpha, the next Q steps
/// hold the fastest branch (largest s_k: the branch that leans most on the others), so it
/// must learn from its own modality. For N = 2 this is `GuidedPolicy` step for step (the
/// imbalance is d_speed and the fastest branch is 0 exactly when d_speed > 0).
class NWayGuidedPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.guided_n_way", 1};
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  explicit NWayGuidedPolicy(std::size_t branches, const GuidedOptions& options = {})
      : options(options), branches_(branches) {
    TORCH_CHECK(branches >= 2, "NWayGuidedPolicy: needs at least 2 branches, got ", branches);
    TORCH_CHECK(options.alpha() >= 0, "NWayGuidedPolicy: alpha must be >= 0, got ", options.alpha());
    TORCH_CHECK(options.Q() >= 1, "NWayGuidedPolicy: Q must be >= 1, got ", options.Q());
  }

  StepPlan next_plan() {
    if (!window_open_) return StepPlan::regular();
    if (++window_step_ >= options.Q()) window_open_ = false;
    return StepPlan::hold(held_);
  }

  /// Opens a window of Q steps holding `speeds.fastest` when |imbalance| > alpha; speeds
  /// that are not defined (NaN) change nothing.
  void observe_speeds(const NWaySpeedSummary& speeds) {
    TORCH_CHECK(speeds.speeds.size() == branches_, "NWayGuidedPolicy: got the speeds of ",
                speeds.speeds.size(), " branches, the policy balances ", branches_);
    if (speeds.fastest < 0 || !(std::abs(speeds.imbalance) > options.alpha())) return;
    held_ = static_cast<std::size_t>(speeds.fastest);
    window_step_ = 0;
    window_open_ = true;
  }

  std::size_t branches() const { return branches_; }

  /// Writes the window (open or not, held branch, steps taken) and the options.
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches_));
    archive.write("window_open", window_open_);
    archive.write("held", static_cast<std::int64_t>(held_));
    archive.write("window_step", window_step_);
    archive.write("alpha", options.alpha());
    archive.write("Q", options.Q());
  }

  /// Restores what `save` wrote; another branch count, alpha or Q throws naming both
  /// values and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches, open, held, window_step, alpha, q;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt() &&
                    archive.try_read("window_open", open) && open.isBool() &&
                    archive.try_read("held", held) && held.isInt() &&
                    archive.try_read("window_step", window_step) && window_step.isInt() &&
                    archive.try_read("alpha", alpha) && alpha.isDouble() &&
                    archive.try_read("Q", q) && q.isInt(),
                "NWayGuidedPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "NWayGuidedPolicy: the "
                "checkpoint was made for ", branches.toInt(), " branches, this policy balances ",
                branches_);
    TORCH_CHECK(alpha.toDouble() == options.alpha(), "NWayGuidedPolicy: the checkpoint was made "
                "with alpha ", alpha.toDouble(), ", this policy has alpha ", options.alpha(),
                "; resume with the options the run started with");
    TORCH_CHECK(q.toInt() == options.Q(), "NWayGuidedPolicy: the checkpoint was made with Q ",
                q.toInt(), ", this policy has Q ", options.Q(),
                "; resume with the options the run started with");
    TORCH_CHECK(held.toInt() >= 0 && held.toInt() < static_cast<std::int64_t>(branches_),
                "NWayGuidedPolicy: held branch ", held.toInt(), " in checkpoint is outside 0..",
                branches_ - 1);
    TORCH_CHECK(window_step.toInt() >= 0 && window_step.toInt() <= options.Q(),
                "NWayGuidedPolicy: window step ", window_step.toInt(),
                " in checkpoint is outside [0, Q=", options.Q(), "]");
    window_open_ = open.toBool();
    held_ = static_cast<std::size_t>(held.toInt());
    window_step_ = window_step.toInt();
  }

  GuidedOptions options;

 private:
  std::size_t branches_;
  bool window_open_ = false;
  std::size_t held_ = 0;          // the branch the open (or last) window holds
  std::int64_t window_step_ = 0;  // steps of the window taken
};
template <>
inline constexpr bool detail::kLibraryPolicy<NWayGuidedPolicy> = true;

/// Random balancing for N branches: each step drawn uniformly from the N + 1 plans
/// (regular, hold 0, ..., hold N-1) with a seeded mt19937_64. For N = 2 the same draws as
/// `RandomPolicy` with the same seed, step for step.
class NWayRandomPolicy {
 public:
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.random_n_way", 1};
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  explicit NWayRandomPolicy(std::size_t branches, const RandomOptions& options = {})
      : options(options), branches_(branches), engine_(options.seed()) {
    TORCH_CHECK(branches >= 2, "NWayRandomPolicy: needs at least 2 branches, got ", branches);
  }

  StepPlan next_plan() {
    // mt19937_64's sequence is fixed by the standard; the modulo bias is below 2^-60.
    const auto draw = static_cast<std::size_t>(engine_() % (branches_ + 1));
    return draw == 0 ? StepPlan::regular() : StepPlan::hold(draw - 1);
  }

  std::size_t branches() const { return branches_; }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("engine", detail::engine_state(engine_));
    archive.write("seed", static_cast<std::int64_t>(options.seed()));
    archive.write("branches", static_cast<std::int64_t>(branches_));
  }

  /// Restores the generator; another seed or branch count throws and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue state, seed, branches;
    TORCH_CHECK(archive.try_read("engine", state) && state.isString() &&
                    archive.try_read("seed", seed) && seed.isInt() &&
                    archive.try_read("branches", branches) && branches.isInt(),
                "NWayRandomPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "NWayRandomPolicy: the "
                "checkpoint was made for ", branches.toInt(), " branches, this policy balances ",
                branches_);
    TORCH_CHECK(static_cast<std::uint64_t>(seed.toInt()) == options.seed(),
                "NWayRandomPolicy: the checkpoint was made with seed ",
                static_cast<std::uint64_t>(seed.toInt()), ", this policy has seed ", options.seed());
    engine_ = detail::engine_from_state(state, "NWayRandomPolicy");
  }

  RandomOptions options;

 private:
  std::size_t branches_;
  std::mt19937_64 engine_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<NWayRandomPolicy> = true;

static_assert(NWayBalancingPolicy<NWayGuidedPolicy> && ObservesBranchSpeeds<NWayGuidedPolicy> &&
              HasState<NWayGuidedPolicy> && HoldsFusionGates<NWayGuidedPolicy>);
static_assert(NWayBalancingPolicy<NWayRandomPolicy> && HasState<NWayRandomPolicy> &&
              HoldsFusionGates<NWayRandomPolicy>);

}  // namespace mmbalance
