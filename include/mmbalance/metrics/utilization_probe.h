#pragma once
/// \file
/// Conditional utilization rates (docs/algorithm.md §7; Definition 2.1).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// One batch of both modalities and class targets. Any type with these three members
/// works as a batch for the probe.
struct MultiModalBatch {
  at::Tensor x0, x1, target;
};

template <class B>
concept MultiModalBatchLike = requires(const B& b) {
  { b.x0 } -> std::convertible_to<at::Tensor>;
  { b.x1 } -> std::convertible_to<at::Tensor>;
  { b.target } -> std::convertible_to<at::Tensor>;
};

template <class R>
concept BatchRange = std::ranges::input_range<R> &&
                     MultiModalBatchLike<std::remove_cvref_t<std::ranges::range_reference_t<R>>>;

/// The probe's default: one process holds all the data, nothing to add up.
struct SingleProcess {
  void operator()(at::Tensor&) const {}
};

/// Accuracies (fractions in [0, 1]) of the normal and the cut heads, and the rates
/// derived from them. A rate whose denominator accuracy is 0 is NaN.
struct UtilizationReport {
  double accuracy = NAN;       ///< A(f): y = (y0 + y1) / 2
  double accuracy0 = NAN;      ///< A(f0): head y0
  double accuracy0_cut = NAN;  ///< A(f0'): head y0 with m1 cut off
  double accuracy1 = NAN;      ///< A(f1)
  double accuracy1_cut = NAN;  ///< A(f1')
  double u_m1_given_m0 = NAN;  ///< (A(f0) - A(f0')) / A(f0): what m1 adds to branch 0
  double u_m0_given_m1 = NAN;  ///< (A(f1) - A(f1')) / A(f1)
  double d_util = NAN;         ///< u(m1|m0) - u(m0|m1), in [-1, 1]
  std::int64_t samples = 0;    ///< evaluation samples
};

namespace detail {
// Commits each mean's staged rows after adding them up over the ranks (the two- and the
// N-branch probe's commit).
template <class SumAcrossRanks>
void commit_across_ranks(const std::vector<RunningMean>& means, SumAcrossRanks& sum_across_ranks) {
  for (RunningMean mean : means) {  // a handle: commits into the module's buffers
    sum_across_ranks(mean->staged());
    mean->commit();
  }
}
}  // namespace detail

/// Commits the squeeze vectors `net->record_squeeze` staged: data-parallel, the staged
/// sums of every rank's shard are first added up with `sum_across_ranks`. For a pass of
/// your own over the training data (see `record_squeeze_averages`).
template <MultiModalModel Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void commit_squeeze_averages(Net& net, SumAcrossRanks sum_across_ranks = {}) {
  detail::commit_across_ranks(net->squeeze_means(), sum_across_ranks);
}

/// The probe's first half: records each fusion module's training-set squeeze averages
/// (h0_bar^k, h1_bar^k) over `train` with the model as it is now, replacing earlier
/// ones. Runs in eval mode without gradients and restores the training mode; batches are
/// moved to the model's device; no host read. Record once, then `evaluate_utilization`
/// on as many evaluation sets as you like. Data-parallel: each rank passes its shard and
/// a `sum_across_ranks` (see `probe_utilization`).
///
/// If you already run the model over the training data after training (to report its
/// training accuracy, say), call `net->reset_squeeze_averages()`, use
/// `net->record_squeeze(x0, x1)` for that pass instead of `forward` (same outputs, the
/// squeeze vectors staged on the way) and `commit_squeeze_averages(net)` after it: the
/// probe then costs only `evaluate_utilization`.
template <MultiModalModel Net, BatchRange TrainData, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void record_squeeze_averages(Net& net, TrainData&& train, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  net->reset_squeeze_averages();
  for (const auto& batch : train) {
    net->record_squeeze(batch.x0.to(device), batch.x1.to(device));
  }
  commit_squeeze_averages(net, sum_across_ranks);
}

/// The probe's second half: evaluates the normal and the cut heads over `eval` in one
/// pass per batch, with the squeeze averages recorded by `record_squeeze_averages` (or
/// `record_squeeze`), and returns the accuracies and rates. Eval mode without gradients,
/// training mode restored; gate and squeeze averages untouched. Host reads: one number
/// per fusion module before the loop (were averages recorded?) and the counts at the
/// end, none per batch. Data-parallel:
/// counts are added up with `sum_across_ranks`, so every rank gets the same report.
template <MultiModalModel Net, BatchRange EvalData, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
UtilizationReport evaluate_utilization(Net& net, EvalData&& eval, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  TORCH_CHECK(net->has_squeeze_averages(),
              "evaluate_utilization: no squeeze averages recorded; run record_squeeze_averages "
              "over the training data first");
  const at::Device device = net->parameters().front().device();
  // correct predictions of y, y0, y0', y1, y1', then the sample count
  at::Tensor correct = at::zeros({6}, at::TensorOptions(at::kLong).device(device));
  for (const auto& batch : eval) {
    const at::Tensor target = batch.target.to(device);
    const ProbeOutput out = net->forward_probe(batch.x0.to(device), batch.x1.to(device));
    TORCH_CHECK(target.dim() == 1 && target.size(0) == out.y0.size(0),
                "evaluate_utilization: target must be (batch) class indices with batch ",
                out.y0.size(0), ", got ", detail::shape_string(target));
    const at::Tensor logits =
        at::stack({(out.y0 + out.y1) * 0.5, out.y0, out.y0_cut, out.y1, out.y1_cut});
    correct.narrow(0, 0, 5).add_(logits.argmax(-1).eq(target.unsqueeze(0)).sum(1));
    correct.narrow(0, 5, 1).add_(target.size(0));
  }
  sum_across_ranks(correct);
  const at::Tensor counts = correct.to(at::kCPU);
  const std::int64_t samples = counts.data_ptr<std::int64_t>()[5];
  TORCH_CHECK(samples > 0, "evaluate_utilization: the evaluation data is empty");

  const at::Tensor host = counts.narrow(0, 0, 5).to(at::kDouble) / static_cast<double>(samples);
  const double* a = host.data_ptr<double>();
  UtilizationReport r;
  r.samples = samples;
  r.accuracy = a[0];
  r.accuracy0 = a[1];
  r.accuracy0_cut = a[2];
  r.accuracy1 = a[3];
  r.accuracy1_cut = a[4];
  r.u_m1_given_m0 = r.accuracy0 > 0 ? (r.accuracy0 - r.accuracy0_cut) / r.accuracy0 : NAN;
  r.u_m0_given_m1 = r.accuracy1 > 0 ? (r.accuracy1 - r.accuracy1_cut) / r.accuracy1 : NAN;
  r.d_util = r.u_m1_given_m0 - r.u_m0_given_m1;
  return r;
}

/// The whole probe: `record_squeeze_averages` over `train` with the trained model, then
/// `evaluate_utilization` over `eval`.
///
/// Data-parallel: every rank passes its own shards of `train` and `eval` and a
/// `sum_across_ranks` that adds a tensor up over all ranks in place (e.g.
/// `DataParallel::sum_across_ranks()`); the squeeze averages and the counts are then
/// those of all shards together, and every rank gets the same report.
template <MultiModalModel Net, BatchRange TrainData, BatchRange EvalData,
          std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
UtilizationReport probe_utilization(Net& net, TrainData&& train, EvalData&& eval,
                                    SumAcrossRanks sum_across_ranks = {}) {
  record_squeeze_averages(net, std::forward<TrainData>(train), sum_across_ranks);
  return evaluate_utilization(net, std::forward<EvalData>(eval), sum_across_ranks);
}

}  // namespace mmbalance
