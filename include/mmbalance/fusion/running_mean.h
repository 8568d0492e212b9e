#pragma once
/// \file
/// `RunningMean`: a per-channel mean over samples, staged then committed. The one
/// mechanism behind a fusion module's gate averages (re-balancing steps) and squeeze
/// averages (utilization probe).

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/detail/check.h"

namespace mmbalance {

/// A sample-weighted mean of `dim` channels, in two parts:
/// - committed: `mean` and `samples`, registered buffers (saved, loaded and moved with the
///   module that owns it);
/// - staged: sums of rows and their count added by `stage` since the last `commit` or
///   `drop`, laid out as [sum of channel 0, ..., sum of channel dim-1, count].
///
/// Whoever decides that the staged rows count commits them: the `Balancer` once it
/// accepts a regular step (a rejected or abandoned step drops them), the utilization probe
/// after its pass over the training set. `DataParallel` adds the staged sums up over all
/// ranks in place (`staged()`) before that commit, so one path serves one process and N
/// ranks. Nothing here reads from the device.
///
/// Sums and counts are kept in double whatever the model's dtype: `to(kHalf)` or
/// `to(kBFloat16)` on the owning model moves a RunningMean to another device but leaves
/// its dtype alone (counts in half precision would stop growing at 2048).
class RunningMeanImpl : public torch::nn::Cloneable<RunningMeanImpl> {
 public:
  /// `dim` channels; the mean before any commit is `initial` in every channel.
  explicit RunningMeanImpl(std::int64_t dim, double initial = 0.0) : dim_(dim), initial_(initial) {
    reset();
  }

  void reset() override {
    TORCH_CHECK(dim_ > 0, "RunningMean: dim must be positive, got ", dim_);
    mean = register_buffer("mean", at::full({dim_}, initial_, at::kDouble));
    samples = register_buffer("samples", at::zeros({}, at::kDouble));
    staged_ = at::Tensor();
  }

  /// Stages the rows of `x` (batch, dim): adds their sum and count.
  void stage(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == dim_, "RunningMean::stage: expected (batch, ", dim_,
                ") rows, got ", detail::shape_string(x));
    at::NoGradGuard no_grad;
    at::Tensor& s = staged();
    s.narrow(0, 0, dim_).add_(x.to(at::kDouble).sum(0));
    s.narrow(0, dim_, 1).add_(static_cast<double>(x.size(0)));
  }

  /// The staged sums, [sums (dim), count] in double on the buffers' device; zeros when
  /// nothing is staged. Writable: DataParallel adds them up over ranks in place.
  at::Tensor& staged() {
    if (!staged_.defined() || staged_.device() != mean.device()) {
      staged_ = at::zeros({dim_ + 1}, mean.options());
    }
    return staged_;
  }

  /// Folds the staged rows into the mean: mean += (sum / n - mean) * n / (samples + n),
  /// samples += n; then nothing is staged. A stage of zero rows changes nothing. With
  /// `keep` (a bool scalar on the device) false, the rows are dropped instead, without a
  /// host read.
  void commit(const at::Tensor& keep = {}) {
    if (!staged_.defined()) return;
    at::NoGradGuard no_grad;
    if (keep.defined()) staged_ = at::where(keep, staged_, at::zeros_like(staged_));
    const at::Tensor n = staged_.narrow(0, dim_, 1);
    samples.add_(n.squeeze(0));
    // With n = 0 the weight is 0 and the clamps keep 0/0 out.
    const at::Tensor weight = n / samples.clamp_min(1);
    mean.add_((staged_.narrow(0, 0, dim_) / n.clamp_min(1) - mean) * weight);
    staged_ = at::Tensor();
  }

  /// Forgets the staged rows.
  void drop() { staged_ = at::Tensor(); }

  /// Back to no samples: the mean is `initial` again and nothing is staged.
  void clear() {
    at::NoGradGuard no_grad;
    mean.fill_(initial_);
    samples.zero_();
    staged_ = at::Tensor();
  }

  std::int64_t dim() const { return dim_; }

  // A RunningMean follows its owner's device, never its dtype.
  void to(torch::Device device, torch::Dtype /*dtype*/, bool non_blocking = false) override {
    torch::nn::Module::to(device, non_blocking);
  }
  void to(torch::Dtype /*dtype*/, bool /*non_blocking*/ = false) override {}
  void to(torch::Device device, bool non_blocking = false) override {
    torch::nn::Module::to(device, non_blocking);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::RunningMean(dim=" << dim_ << ", initial=" << initial_ << ")";
  }

  at::Tensor mean, samples;

 private:
  std::int64_t dim_;
  double initial_;
  at::Tensor staged_;
};

/// A `ModuleHolder` for `RunningMeanImpl`.
TORCH_MODULE(RunningMean);

/// Whether every one of `means` has committed samples (reads one number per mean).
inline bool all_committed(const std::vector<RunningMean>& means) {
  for (const auto& m : means) {
    if (m->samples.item<double>() == 0) return false;
  }
  return true;
}

}  // namespace mmbalance
