#pragma once
/// \file
/// The `Balancer`'s speed monitor: measures each step's μ, checks the step, accumulates M,
/// and hands the speeds to whoever wants them, now or one step late without waiting.

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/balancer_options.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/detail/record_reader.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

namespace detail {

/// Owns the learning-speed meter, the last speeds read to the host and the lagged read of
/// `SpeedRead::previous_step`. Speeds go to a `deliver(const SpeedSummary&)` callable
/// only when they are defined (NaN speeds are not a measurement).
class SpeedMonitor {
 public:
  SpeedMonitor(const ParameterGroups& groups, bool check_every_step, SpeedRead read)
      : meter_(groups), check_every_step_(check_every_step), read_(read) {
    TORCH_CHECK(read == SpeedRead::same_step || !check_every_step, "Balancer: speed_read(SpeedRead::"
                "previous_step) avoids waiting for the device, which per-step checks must do; set "
                "check_every_step(false) too");
  }

  std::size_t branches() const { return meter_.num_groups() / 2; }
  const LearningSpeedMeter& meter() const { return meter_; }
  const SpeedSummary& last() const { return last_; }

  /// A regular step after `backward()`: measures μ; with checks on reads the loss, the
  /// norms and M + μ to the host in one read and refuses a bad step (nothing changed);
  /// runs `modulate` (the policy's gradient hook) on the raw gradients' measurement, hands
  /// the speeds to `deliver` when `wants_speeds` (now, or the lagged copy is started after),
  /// then accumulates: if `modulate` or `deliver` throws, M is as it was. Returns, with
  /// checks off, the device flag of whether the step counted.
  template <class Modulate, class Deliver>
  at::Tensor regular_step(const at::Tensor& loss, std::int64_t step, bool wants_speeds,
                          Modulate&& modulate, Deliver&& deliver) {
    const at::Tensor measurement = meter_.measure();
    const at::Tensor mu = LearningSpeedMeter::mu(measurement);
    if (check_every_step_) {
      const at::Tensor next = meter_.accumulated() + mu;
      const at::Tensor host =
          at::cat({loss.detach().reshape({1}).to(at::kDouble), measurement.flatten(), next})
              .to(at::kCPU);
      const double* v = host.data_ptr<double>();
      const std::size_t groups = meter_.num_groups();
      check_step(v[0], v + 1, v + 1 + groups, v + 1 + 2 * groups, step);
      modulate();
      record(v + 1 + 2 * groups, wants_speeds, deliver);
      meter_.accumulate(mu);
      return {};
    }
    const at::Tensor valid = at::isfinite(mu).all().logical_and(at::isfinite(loss.detach()));
    modulate();
    if (wants_speeds && read_ == SpeedRead::same_step) {  // M with this step in, before it is added
      const at::Tensor next = meter_.accumulated().to(mu.device()) + at::where(valid, mu, at::zeros_like(mu));
      const at::Tensor host = next.to(at::kCPU);
      record(host.data_ptr<double>(), true, deliver);
    }
    const bool lag = wants_speeds && read_ == SpeedRead::previous_step;
    if (lag) reserve_lagged_host();  // before M changes: it may fail
    meter_.accumulate_if(mu, valid);
    if (lag) launch_copy();
    return valid;
  }

  /// A step observed: the lagged speeds first (to `deliver` only for a regular step that
  /// `wants_speeds`), then a regular step measured (`regular_step`) or a re-balancing one
  /// checked (with checks on); `modulate` (the policy's gradient hook) runs after the
  /// checks and the reading of the raw gradients. Returns what `regular_step` does.
  /// If anything throws, M and the lagged speeds are as they were (the policy, rolled back
  /// by the balancer, gets those speeds again with the step retried).
  template <class Modulate, class Deliver>
  at::Tensor observe(const at::Tensor& loss, const StepPlan& plan, std::int64_t step, bool wants_speeds,
                     Modulate&& modulate, Deliver&& deliver) {
    const bool lagged = lagged_pending_;
    SpeedSummary last = last_;
    try {
      deliver_lagged(wants_speeds && plan.is_regular(), deliver);
      if (plan.is_regular()) return regular_step(loss, step, wants_speeds, modulate, deliver);
      if (check_every_step_) check_rebalancing_step(loss, plan, step);
      modulate();
      return {};
    } catch (...) {
      lagged_pending_ = lagged;  // its copy is overwritten only by the step's last act
      last_ = std::move(last);
      throw;
    }
  }

  /// A re-balancing step feeds no accumulator, but a NaN gradient it let through would be
  /// written into the parameters by the optimizer and stall every later step.
  void check_rebalancing_step(const at::Tensor& loss, const StepPlan& plan, std::int64_t step) {
    const at::Tensor host =
        at::cat({loss.detach().reshape({1}).to(at::kDouble), meter_.measure_gradients()}).to(at::kCPU);
    const double* v = host.data_ptr<double>();
    TORCH_CHECK(std::isfinite(v[0]), "Balancer: non-finite loss ", v[0], " in step ", step, " (",
                to_string(plan), ")");
    for (std::size_t g = 0; g < meter_.num_groups(); ++g) {
      TORCH_CHECK(std::isfinite(v[1 + g]), "Balancer: non-finite gradient in group ",
                  meter_.group_name(g), " (squared norm ", v[1 + g], ") in step ", step, " (",
                  to_string(plan), ")");
    }
  }

  /// Hands `deliver` the speeds whose copy was started one step ago, unless the step being
  /// observed is re-balancing (`to_policy` false): the policy has opened a window since,
  /// and a speed measured before it must neither restart nor turn it. Waiting on the
  /// copy's event costs nothing by now: a whole step was queued after it.
  template <class Deliver>
  void deliver_lagged(bool to_policy, Deliver&& deliver) {
    if (!lagged_pending_) return;
    wait_for_copy();
    lagged_pending_ = false;
    record(lagged_host_.data_ptr<double>(), to_policy, deliver);
  }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("branches", static_cast<std::int64_t>(branches()));
    archive.write("speed_read", static_cast<std::int64_t>(read_));
    archive.write("accumulated", meter_.accumulated().to(at::kCPU));
    archive.write("group_numel", at::tensor(meter_.group_numel(), at::kLong));
    archive.write("meter_steps", meter_.steps());
    archive.write("last_speeds", at::tensor(last_.speeds, at::kDouble));
    archive.write("skipped", meter_.skipped());
    if (lagged_pending_) {
      wait_for_copy();
      archive.write("lagged_accumulated", lagged_host_.clone());
    }
  }

  /// A record's speeds, read and checked (`read`), for `restore`.
  struct Saved {
    at::Tensor accumulated, lagged;
    std::int64_t steps = 0, skipped = 0;
    std::vector<double> last;
  };

  /// Refuses a record made for another number of branches (checked first of all the
  /// record); returns whether it names its branch count (older two-branch records do not,
  /// and keep the speeds as named numbers).
  bool check_branches(const RecordReader& in) const {
    c10::IValue saved;
    const bool has_branches = in.archive.try_read("branches", saved);
    TORCH_CHECK(!has_branches || saved.isInt(), "Balancer::load: 'branches' is not an integer");
    const std::int64_t count = has_branches ? saved.toInt() : 2;
    TORCH_CHECK(count == static_cast<std::int64_t>(branches()), "Balancer::load: the checkpoint was "
                "made for a network of ", count, " branches, this one has ", branches());
    return has_branches;
  }

  /// Refuses a record made with another `SpeedRead`.
  void check_speed_read(const RecordReader& in) const {
    const std::int64_t saved = in.integer("speed_read");
    const auto name = [](std::int64_t read) { return read == 0 ? "same_step" : "previous_step"; };
    TORCH_CHECK(saved == static_cast<std::int64_t>(read_), "Balancer::load: the checkpoint was made "
                "with speed_read ", name(saved), ", this balancer has ", name(static_cast<std::int64_t>(read_)),
                "; resume with the options the run started with");
  }

  /// Refuses a record made for other parameter groups.
  void check_groups(const RecordReader& in) const {
    const at::Tensor numel = in.tensor("group_numel");
    const at::Tensor mine = at::tensor(meter_.group_numel(), at::kLong);
    TORCH_CHECK(numel.scalar_type() == at::kLong && numel.numel() == mine.numel() &&
                    at::equal(numel, mine),
                "Balancer::load: the checkpoint was made for parameter groups with ",
                numel_string(numel), " elements, this model's groups have ", numel_string(mine));
  }

  /// Reads and checks the monitor's other entries; `has_branches` as `check_branches` said.
  Saved read(const RecordReader& in, bool has_branches) const {
    Saved s;
    s.accumulated = in.tensor("accumulated");
    TORCH_CHECK(s.accumulated.dim() == 1 && s.accumulated.is_floating_point() &&
                    s.accumulated.numel() == static_cast<std::int64_t>(meter_.num_groups()),
                "Balancer::load: accumulators must have ", meter_.num_groups(), " entries, got ",
                shape_string(s.accumulated));
    s.steps = in.integer("meter_steps");
    s.skipped = in.integer("skipped");
    TORCH_CHECK(s.steps >= 0 && s.skipped >= 0, "Balancer::load: negative counters (meter steps ",
                s.steps, ", skipped ", s.skipped, ")");
    TORCH_CHECK(s.steps <= std::numeric_limits<std::int64_t>::max() - s.skipped, "Balancer::load: meter "
                "steps ", s.steps, " and skipped ", s.skipped, " add up past the largest count");
    if (has_branches) {
      const at::Tensor t = in.tensor("last_speeds");
      TORCH_CHECK(t.dim() == 1 && t.numel() == static_cast<std::int64_t>(branches()) && t.is_floating_point(),
                  "Balancer::load: 'last_speeds' must hold ", branches(), " numbers, got ",
                  shape_string(t));
      const at::Tensor c = t.to(at::kDouble).contiguous();
      s.last.assign(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    } else {
      s.last = {in.number("s_m1_given_m0"), in.number("s_m0_given_m1")};
    }
    if (in.archive.try_read("lagged_accumulated", s.lagged)) {
      TORCH_CHECK(s.lagged.dim() == 1 && s.lagged.is_floating_point() &&
                      s.lagged.numel() == static_cast<std::int64_t>(meter_.num_groups()),
                  "Balancer::load: the pending speeds record must hold ", meter_.num_groups(),
                  " numbers, got ", shape_string(s.lagged));
      TORCH_CHECK(read_ == SpeedRead::previous_step, "Balancer::load: the record holds speeds "
                  "pending for SpeedRead::previous_step, this balancer reads them with same_step");
      s.lagged = s.lagged.to(at::kCPU, at::kDouble).contiguous();
    }
    return s;
  }

  void restore(Saved s) {
    meter_.restore(s.accumulated, s.steps, s.skipped);
    last_ = SpeedSummary::from_speeds(std::move(s.last));
    lagged_pending_ = s.lagged.defined();
    if (lagged_pending_) {
      lagged_host_ = s.lagged;
      lagged_event_.reset();
    }
  }

 private:
  void check_step(double loss, const double* grad_sq, const double* param_sq, const double* next,
                  std::int64_t step) const {
    TORCH_CHECK(std::isfinite(loss), "Balancer: non-finite loss ", loss, " in step ", step,
                " (regular)");
    // A late-fusion network's fusion groups are empty: nothing there to check.
    const std::size_t checked = meter_.late_fusion() ? branches() : meter_.num_groups();
    for (std::size_t g = 0; g < checked; ++g) {
      const std::string group = meter_.group_name(g);
      TORCH_CHECK(std::isfinite(grad_sq[g]), "Balancer: non-finite gradient in group ", group,
                  " (squared norm ", grad_sq[g], ") in step ", step);
      TORCH_CHECK(std::isfinite(param_sq[g]) && param_sq[g] > 0, "Balancer: parameter group ",
                  group, " has squared norm ", param_sq[g],
                  "; the learning speed ||G||^2/||theta||^2 is undefined. Initialise it "
                  "with non-zero values.");
      TORCH_CHECK(next[g] > 0, "Balancer: parameter group ", group,
                  " has had a zero gradient in every regular step so far (is it frozen, or "
                  "cut off from the loss?); its learning speed is 0 and the speeds would be "
                  "infinite. Every group must learn: unfreeze it, or train without a balancer.");
    }
  }

  template <class Deliver>
  void record(const double* m, bool to_policy, Deliver& deliver) {
    SpeedSummary speeds = SpeedSummary::from_accumulators({m, m + meter_.num_groups()});
    if (to_policy && std::isfinite(speeds.spread)) deliver(speeds);  // may throw: nothing kept yet
    last_ = std::move(speeds);
  }

  // SpeedRead::previous_step: start copying M to the host; the copy is queued behind this
  // step's work and read when the next step is observed.
  // Pinned for a device meter, so the copy does not wait: also after a resume (load()
  // leaves pageable memory) or a move of the model to the device.
  void reserve_lagged_host() {
    const bool cuda = meter_.accumulated().is_cuda();
    if (!lagged_host_.defined() || (cuda && !lagged_host_.is_pinned())) {
      lagged_host_ = at::empty({static_cast<std::int64_t>(meter_.num_groups())},
                               at::TensorOptions(at::kDouble).pinned_memory(cuda));
    }
  }

  void launch_copy() {
    reserve_lagged_host();  // again: accumulating may have moved M to the model's device
    const at::Tensor& m = meter_.accumulated();
    lagged_host_.copy_(m, /*non_blocking=*/true);
    lagged_event_.reset();
    if (!m.is_cpu()) {
      lagged_event_.emplace(m.device().type());
      const c10::impl::VirtualGuardImpl guard(m.device().type());
      lagged_event_->record(guard.getStream(m.device()));
    }
    lagged_pending_ = true;
  }

  // Polled, on every LibTorch: 1.13's c10::Event has no blocking wait, and polling is not a
  // device synchronisation. By the time this runs the copy has landed.
  void wait_for_copy() const {
    if (!lagged_event_) return;
    while (!lagged_event_->query()) std::this_thread::yield();
  }

  static std::string numel_string(const at::Tensor& t) {
    if (t.scalar_type() != at::kLong) return "(not integers: " + shape_string(t) + ")";
    std::string s = "[";
    const at::Tensor c = t.contiguous();
    for (std::int64_t i = 0; i < c.numel(); ++i)
      s += (i ? ", " : "") + std::to_string(c.data_ptr<std::int64_t>()[i]);
    return s + "]";
  }

  LearningSpeedMeter meter_;
  bool check_every_step_;
  SpeedRead read_;
  SpeedSummary last_ = SpeedSummary::from_speeds(std::vector<double>(meter_.num_groups() / 2, NAN));
  // SpeedRead::previous_step: M copied to the host, not yet handed on.
  at::Tensor lagged_host_;
  std::optional<c10::Event> lagged_event_;
  bool lagged_pending_ = false;
};

}  // namespace detail
}  // namespace mmbalance
