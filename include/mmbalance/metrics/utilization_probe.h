#pragma once
/// \file
/// Conditional utilization rates (docs/algorithm.md §7; Definition 2.1): u_k = (A(f_k) -
/// A(f_k')) / A(f_k) for every branch k, where f_k' is branch k with every other modality
/// replaced by its training-set average.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/fusion/running_mean.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// One batch of every modality, in branch order, and class targets.
struct Batch {
  std::vector<at::Tensor> inputs;
  at::Tensor target;
};

/// One batch of two modalities and class targets (the two-branch form of `Batch`).
struct MultiModalBatch {
  at::Tensor x0, x1, target;
};

/// What the probe and `head_losses` take as a batch: any type with `target` and either
/// `inputs` (every modality, in branch order) or `x0` and `x1` (two modalities).
template <class B>
concept BatchLike = requires(const B& b) {
  { b.target } -> std::convertible_to<at::Tensor>;
} && (requires(const B& b) {
  { b.inputs } -> std::convertible_to<std::vector<at::Tensor>>;
} || requires(const B& b) {
  { b.x0 } -> std::convertible_to<at::Tensor>;
  { b.x1 } -> std::convertible_to<at::Tensor>;
});

template <class R>
concept BatchRange = std::ranges::input_range<R> &&
                     BatchLike<std::remove_cvref_t<std::ranges::range_reference_t<R>>>;

using NWayBatch [[deprecated("use Batch")]] = Batch;

namespace detail {
/// A batch's inputs in branch order, moved to `device`.
template <BatchLike B>
std::vector<at::Tensor> batch_inputs(const B& batch, const at::Device& device) {
  std::vector<at::Tensor> inputs;
  if constexpr (requires { batch.inputs; }) {
    for (const auto& x : batch.inputs) inputs.push_back(x.to(device));
  } else {
    inputs = {batch.x0.to(device), batch.x1.to(device)};
  }
  return inputs;
}
}  // namespace detail

/// The probe's default: one process holds all the data, nothing to add up.
struct SingleProcess {
  void operator()(at::Tensor&) const {}
};

/// Accuracies (fractions in [0, 1]) of the normal and the cut heads, and the rates
/// derived from them. A rate whose denominator accuracy is 0 is NaN.
struct UtilizationReport {
  double accuracy = NAN;              ///< A(f): y, the mean of the heads
  std::vector<double> head_accuracy;  ///< A(f_k): head k
  std::vector<double> cut_accuracy;   ///< A(f_k'): head k with every other modality cut off
  std::vector<double> utilization;    ///< u_k = (A(f_k) - A(f_k')) / A(f_k)
  /// max_k u_k - min_k u_k (>= 0), for any number of branches; NaN if a rate is NaN.
  double spread = NAN;
  std::int64_t samples = 0;  ///< evaluation samples

  /// Two branches only (NaN for more): the paper's names for the entries above.
  double accuracy0 = NAN;      ///< A(f0): head y0
  double accuracy0_cut = NAN;  ///< A(f0'): head y0 with m1 cut off
  double accuracy1 = NAN;      ///< A(f1)
  double accuracy1_cut = NAN;  ///< A(f1')
  double u_m1_given_m0 = NAN;  ///< u_0 = (A(f0) - A(f0')) / A(f0): what m1 adds to branch 0
  double u_m0_given_m1 = NAN;  ///< u_1
  double d_util = NAN;         ///< u(m1|m0) - u(m0|m1), signed, in [-1, 1]
};

using NWayUtilizationReport [[deprecated("use UtilizationReport")]] = UtilizationReport;

/// Commits the squeeze vectors `net->record_squeeze` staged: data-parallel, the staged
/// sums of every rank's shard are first added up with `sum_across_ranks`. For a pass of
/// your own over the training data (see `record_squeeze_averages`).
template <ProbeableModel Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void commit_squeeze_averages(Net& net, SumAcrossRanks sum_across_ranks = {}) {
  for (RunningMean mean : net->squeeze_means()) {  // a handle: commits into the module's buffers
    sum_across_ranks(mean->staged());
    mean->commit();
  }
}

/// The probe's first half: records each fusion module's training-set squeeze averages
/// over `train` with the model as it is now, replacing earlier ones. Runs in eval mode
/// without gradients and restores the training mode; batches are moved to the model's
/// device; no host read. Record once, then `evaluate_utilization` on as many evaluation
/// sets as you like. Data-parallel: each rank passes its shard and a `sum_across_ranks`
/// (see `probe_utilization`).
///
/// If you already run the model over the training data after training (to report its
/// training accuracy, say), call `net->reset_squeeze_averages()`, use
/// `net->record_squeeze(inputs)` for that pass instead of `forward` (same outputs, the
/// squeeze vectors staged on the way) and `commit_squeeze_averages(net)` after it: the
/// probe then costs only `evaluate_utilization`.
template <ProbeableModel Net, BatchRange TrainData, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void record_squeeze_averages(Net& net, TrainData&& train, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  net->reset_squeeze_averages();
  for (const auto& batch : train) net->record_squeeze(detail::batch_inputs(batch, device));
  commit_squeeze_averages(net, sum_across_ranks);
}

/// The probe's second half: evaluates the normal and the cut heads over `eval` in one
/// pass per batch, with the squeeze averages recorded by `record_squeeze_averages` (or
/// `record_squeeze`), and returns the accuracies and rates. Eval mode without gradients,
/// training mode restored; gate and squeeze averages untouched. Host reads: one number
/// per fusion module before the loop (were averages recorded?) and the counts at the
/// end, none per batch. Data-parallel: counts are added up with `sum_across_ranks`, so
/// every rank gets the same report.
template <ProbeableModel Net, BatchRange EvalData, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
UtilizationReport evaluate_utilization(Net& net, EvalData&& eval, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  TORCH_CHECK(net->has_squeeze_averages(),
              "evaluate_utilization: no squeeze averages recorded; run record_squeeze_averages "
              "over the training data first");
  const at::Device device = net->parameters().front().device();
  // correct predictions of y, then y_0 .. y_{N-1}, then y_0' .. y_{N-1}', then the count:
  // made before the loop, so that a rank with an empty shard still adds its zeros.
  const std::size_t branches = net->num_branches();
  at::Tensor correct = at::zeros({static_cast<std::int64_t>(2 * branches + 2)},
                                 at::TensorOptions(at::kLong).device(device));
  for (const auto& batch : eval) {
    const at::Tensor target = batch.target.to(device);
    const ProbeOutput out = net->forward_probe(detail::batch_inputs(batch, device));
    const std::int64_t n = out.heads.front().size(0);
    TORCH_CHECK(target.dim() == 1 && target.size(0) == n,
                "evaluate_utilization: target must be (batch) class indices with batch ", n,
                ", got ", detail::shape_string(target));
    at::Tensor y = out.heads[0];
    for (std::size_t k = 1; k < branches; ++k) y = y + out.heads[k];
    y = y * (1.0 / static_cast<double>(branches));  // the network's y (for N = 2: * 0.5)
    std::vector<at::Tensor> logits{y};
    logits.insert(logits.end(), out.heads.begin(), out.heads.end());
    logits.insert(logits.end(), out.cut_heads.begin(), out.cut_heads.end());
    const auto scored = static_cast<std::int64_t>(logits.size());
    correct.narrow(0, 0, scored).add_(at::stack(logits).argmax(-1).eq(target.unsqueeze(0)).sum(1));
    correct.narrow(0, scored, 1).add_(n);
  }
  sum_across_ranks(correct);
  const at::Tensor counts = correct.to(at::kCPU);
  const std::int64_t* c = counts.data_ptr<std::int64_t>();
  const std::int64_t samples = c[2 * branches + 1];
  TORCH_CHECK(samples > 0, "evaluate_utilization: the evaluation data is empty");

  auto fraction = [&](std::size_t i) { return static_cast<double>(c[i]) / static_cast<double>(samples); };
  UtilizationReport r;
  r.samples = samples;
  r.accuracy = fraction(0);
  for (std::size_t k = 0; k < branches; ++k) {
    r.head_accuracy.push_back(fraction(1 + k));
    r.cut_accuracy.push_back(fraction(1 + branches + k));
    const double a = r.head_accuracy.back();
    r.utilization.push_back(a > 0 ? (a - r.cut_accuracy.back()) / a : NAN);
  }
  const auto& u = r.utilization;
  if (std::none_of(u.begin(), u.end(), [](double v) { return std::isnan(v); })) {
    r.spread = *std::max_element(u.begin(), u.end()) - *std::min_element(u.begin(), u.end());
  }
  if (branches == 2) {
    r.accuracy0 = r.head_accuracy[0];
    r.accuracy0_cut = r.cut_accuracy[0];
    r.accuracy1 = r.head_accuracy[1];
    r.accuracy1_cut = r.cut_accuracy[1];
    r.u_m1_given_m0 = u[0];
    r.u_m0_given_m1 = u[1];
    r.d_util = u[0] - u[1];
  }
  return r;
}

/// The whole probe: `record_squeeze_averages` over `train` with the trained model, then
/// `evaluate_utilization` over `eval`.
///
/// Data-parallel: every rank passes its own shards of `train` and `eval` and a
/// `sum_across_ranks` that adds a tensor up over all ranks in place (e.g.
/// `DataParallel::sum_across_ranks()`); the squeeze averages and the counts are then
/// those of all shards together, and every rank gets the same report.
template <ProbeableModel Net, BatchRange TrainData, BatchRange EvalData,
          std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
UtilizationReport probe_utilization(Net& net, TrainData&& train, EvalData&& eval,
                                    SumAcrossRanks sum_across_ranks = {}) {
  record_squeeze_averages(net, std::forward<TrainData>(train), sum_across_ranks);
  return evaluate_utilization(net, std::forward<EvalData>(eval), sum_across_ranks);
}

}  // namespace mmbalance
