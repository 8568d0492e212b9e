#pragma once
/// \file
/// The `Balancer`'s epoch clock: steps and epochs so far, per plan, and the warm-up.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/balancer_options.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/detail/record_reader.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance::detail {

class EpochClock {
 public:
  EpochClock(std::size_t branches, std::int64_t warmup_epochs)
      : warmup_(warmup_epochs), epoch_counts_(branches + 1, 0), total_counts_(branches + 1, 0) {
    TORCH_CHECK(warmup_epochs >= 0, "Balancer: warmup_epochs must be >= 0, got ", warmup_epochs);
  }

  bool in_warmup() const { return epoch_ < warmup_; }
  std::int64_t epoch() const { return epoch_; }
  std::int64_t step() const { return step_; }
  /// Epochs after warm-up done at the end of the current epoch (0 at the end of warm-up,
  /// negative before).
  std::int64_t epochs_done_after_warmup() const { return epoch_ + 1 - warmup_; }
  /// Steps per plan, [regular, branch 0 held, ..., branch N-1 held].
  const std::vector<std::int64_t>& epoch_counts() const { return epoch_counts_; }
  const std::vector<std::int64_t>& total_counts() const { return total_counts_; }
  /// `counts` per `StepKind` (two branches).
  static StepCounts per_step_kind(const std::vector<std::int64_t>& counts) {
    TORCH_CHECK(counts.size() == 3, "Balancer: step counts per StepKind are for two branches, this "
                "network has ", counts.size() - 1, "; use epoch_plan_counts()/total_plan_counts()");
    return {counts[0], counts[1], counts[2]};
  }

  void count(const StepPlan& plan) {
    const std::size_t i = plan.is_regular() ? 0 : 1 + *plan.held_branch();
    ++step_;
    ++epoch_counts_[i];
    ++total_counts_[i];
  }

  void next_epoch() {
    ++epoch_;
    std::fill(epoch_counts_.begin(), epoch_counts_.end(), 0);
  }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("step", step_);
    archive.write("epoch", epoch_);
    archive.write("epoch_counts", at::tensor(epoch_counts_, at::kLong));
    archive.write("total_counts", at::tensor(total_counts_, at::kLong));
    archive.write("warmup_epochs", warmup_);
  }

  /// Reads and checks the clock's entries (a record of another warm-up is refused); the
  /// clock as it would be after `restore`.
  EpochClock read(const RecordReader& in) const {
    const std::int64_t warmup = in.integer("warmup_epochs");
    TORCH_CHECK(warmup == warmup_, "Balancer::load: the checkpoint was made with warmup_epochs ",
                warmup, ", this balancer has warmup_epochs ", warmup_,
                "; resume with the options the run started with");
    EpochClock c = *this;
    c.epoch_counts_ = counts(in.tensor("epoch_counts"));
    c.total_counts_ = counts(in.tensor("total_counts"));
    c.step_ = in.integer("step");
    c.epoch_ = in.integer("epoch");
    TORCH_CHECK(c.step_ >= 0 && c.epoch_ >= 0, "Balancer::load: negative counters (step ", c.step_,
                ", epoch ", c.epoch_, ")");
    return c;
  }

 private:
  std::vector<std::int64_t> counts(const at::Tensor& t) const {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong &&
                    t.numel() == static_cast<std::int64_t>(epoch_counts_.size()),
                "Balancer::load: step counts in checkpoint must be ", epoch_counts_.size(),
                " integers (regular, then each branch held), got ", shape_string(t));
    const at::Tensor c = t.contiguous();
    std::vector<std::int64_t> out(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
    TORCH_CHECK(std::all_of(out.begin(), out.end(), [](std::int64_t n) { return n >= 0; }),
                "Balancer::load: negative step counts in checkpoint");
    return out;
  }

  std::int64_t warmup_;
  std::int64_t step_ = 0;
  std::int64_t epoch_ = 0;
  std::vector<std::int64_t> epoch_counts_;
  std::vector<std::int64_t> total_counts_;
};

}  // namespace mmbalance::detail
