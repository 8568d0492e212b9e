#pragma once
// A balancing policy of your own, complete: every `period`-th step, if the spread of the
// branches' learning speeds last measured exceeds `threshold`, hold the fastest branch for
// that one step (a re-balancing step); otherwise regular steps. Any number of branches.
// Copy it and change `next_plan` and `observe_speeds`; docs/policies.md walks through it.
//
//   mmbalance::Balancer<DutyCyclePolicy> balancer(net, DutyCyclePolicy(4, 0.1));

#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include <mmbalance/mmbalance.h>

class DutyCyclePolicy {
 public:
  // How checkpoints know its state: a name of your own, and the format's version.
  static constexpr mmbalance::PolicyIdentity checkpoint_identity{"example.duty_cycle", 1};
  static constexpr bool holds_fusion_gates = true;  // it chooses re-balancing steps
  // A copy shares nothing it changes (no tensors): the balancer keeps the copy to roll back
  // to, not the state `save` writes (which it would serialize every step).
  static constexpr bool copy_is_snapshot = true;

  DutyCyclePolicy(std::int64_t period, double threshold) : period_(period), threshold_(threshold) {
    TORCH_CHECK(period >= 1, "DutyCyclePolicy: period must be >= 1, got ", period);
    TORCH_CHECK(threshold >= 0, "DutyCyclePolicy: threshold must be >= 0, got ", threshold);
  }

  // Called once per step after warm-up.
  mmbalance::StepPlan next_plan() {
    const bool due = ++steps_ % period_ == 0;
    if (due && fastest_ >= 0 && spread_ > threshold_) return mmbalance::StepPlan::hold(fastest_);
    return mmbalance::StepPlan::regular();
  }

  // Called after each regular step after warm-up whose speeds are defined. The spread is
  // max s_k - min s_k (for two branches |d_speed|; `speeds.d_speed` is the signed value).
  void observe_speeds(const mmbalance::SpeedSummary& speeds) {
    spread_ = speeds.spread;
    fastest_ = speeds.fastest;
  }

  // Its state in checkpoints; the options too, so that a resume with others is refused.
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("steps", steps_);
    archive.write("spread", spread_);
    archive.write("fastest", fastest_);
    archive.write("period", period_);
    archive.write("threshold", threshold_);
  }
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue steps, spread, fastest, period, threshold;
    TORCH_CHECK(archive.try_read("steps", steps) && steps.isInt() && archive.try_read("spread", spread) &&
                    spread.isDouble() && archive.try_read("fastest", fastest) && fastest.isInt() &&
                    archive.try_read("period", period) && period.isInt() &&
                    archive.try_read("threshold", threshold) && threshold.isDouble(),
                "DutyCyclePolicy: damaged state in checkpoint");
    TORCH_CHECK(steps.toInt() >= 0 && fastest.toInt() >= -1 && std::isfinite(spread.toDouble()) &&
                    spread.toDouble() >= 0,
                "DutyCyclePolicy: state out of range in checkpoint");
    TORCH_CHECK(period.toInt() == period_ && threshold.toDouble() == threshold_,
                "DutyCyclePolicy: the checkpoint was made with period ", period.toInt(), " and threshold ",
                threshold.toDouble(), ", this policy has ", period_, " and ", threshold_);
    steps_ = steps.toInt();
    spread_ = spread.toDouble();
    fastest_ = fastest.toInt();
  }

 private:
  std::int64_t period_;
  double threshold_;
  std::int64_t steps_ = 0;     // steps planned so far
  double spread_ = 0.0;        // the spread last measured
  std::int64_t fastest_ = -1;  // the fastest branch last measured; -1: none yet
};
