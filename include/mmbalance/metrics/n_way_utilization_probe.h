#pragma once
/// \file
/// Conditional utilization rates of an N-branch network (docs/algorithm.md §7, "N
/// branches"): u_k = (A(f_k) - A(f_k')) / A(f_k) for every branch k.

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
#include "mmbalance/metrics/utilization_probe.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/n_way_multimodal_net.h"

namespace mmbalance {

/// One batch of every modality, in branch order, and class targets.
struct NWayBatch {
  std::vector<at::Tensor> inputs;
  at::Tensor target;
};

template <class B>
concept NWayBatchLike = requires(const B& b) {
  { b.inputs } -> std::convertible_to<std::vector<at::Tensor>>;
  { b.target } -> std::convertible_to<at::Tensor>;
};

template <class R>
concept NWayBatchRange = std::ranges::input_range<R> &&
                         NWayBatchLike<std::remove_cvref_t<std::ranges::range_reference_t<R>>>;

/// What the N-branch probe takes as a network: an `NWayMultiModalNet` handle, or your own
/// handle with these members.
template <class Net>
concept NWayModel = requires(Net net, const std::vector<at::Tensor>& x) {
  { net->forward_probe(x) } -> std::same_as<NWayProbeOutput>;
  { net->record_squeeze(x) } -> std::same_as<NWayOutput>;
  { net->squeeze_means() } -> std::same_as<std::vector<RunningMean>>;
  { net->has_squeeze_averages() } -> std::same_as<bool>;
  { net->reset_squeeze_averages() };
  { net->num_branches() } -> std::convertible_to<std::size_t>;
  { net->parameters() } -> std::same_as<std::vector<at::Tensor>>;
  { net->is_training() } -> std::same_as<bool>;
  { net->train(true) };
};

/// Accuracies (fractions in [0, 1]) of the normal and the cut heads of N branches, and the
/// rates derived from them. A rate whose denominator accuracy is 0 is NaN.
struct NWayUtilizationReport {
  double accuracy = NAN;               ///< A(f): y, the mean of the heads
  std::vector<double> head_accuracy;   ///< A(f_k): head k
  std::vector<double> cut_accuracy;    ///< A(f_k'): head k with every other modality cut off
  std::vector<double> utilization;     ///< u_k = (A(f_k) - A(f_k')) / A(f_k)
  /// Two branches: u_0 - u_1, the paper's signed d_util (= u(m1|m0) - u(m0|m1)); more:
  /// max_k u_k - min_k u_k (>= 0), the spread of the rates. NaN if a rate is NaN.
  double d_util = NAN;
  std::int64_t samples = 0;            ///< evaluation samples
};

/// As the two-branch `commit_squeeze_averages`: commits the squeeze vectors
/// `net->record_squeeze` staged, data-parallel after adding them up over the ranks. For a
/// pass of your own over the training data (e.g. the one that reports training accuracy).
template <NWayModel Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void commit_squeeze_averages(Net& net, SumAcrossRanks sum_across_ranks = {}) {
  detail::commit_across_ranks(net->squeeze_means(), sum_across_ranks);
}

/// As the two-branch `record_squeeze_averages`: each fusion module's training-set squeeze
/// averages over `train`, replacing earlier ones; eval mode, no gradients, no host read.
template <NWayModel Net, NWayBatchRange TrainData,
          std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
void record_squeeze_averages(Net& net, TrainData&& train, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  net->reset_squeeze_averages();
  for (const auto& batch : train) {
    std::vector<at::Tensor> inputs;
    for (const auto& x : batch.inputs) inputs.push_back(x.to(device));
    net->record_squeeze(inputs);
  }
  commit_squeeze_averages(net, sum_across_ranks);
}

/// As the two-branch `evaluate_utilization`: the normal and the cut heads over `eval`,
/// one pass per batch, counts added up with `sum_across_ranks`; host reads: one number per
/// fusion module before the loop and the counts at the end.
template <NWayModel Net, NWayBatchRange EvalData,
          std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
NWayUtilizationReport evaluate_utilization(Net& net, EvalData&& eval,
                                           SumAcrossRanks sum_across_ranks = {}) {
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
    std::vector<at::Tensor> inputs;
    for (const auto& x : batch.inputs) inputs.push_back(x.to(device));
    const NWayProbeOutput out = net->forward_probe(inputs);
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
  NWayUtilizationReport r;
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
    r.d_util = branches == 2 ? u[0] - u[1]
                             : *std::max_element(u.begin(), u.end()) -
                                   *std::min_element(u.begin(), u.end());
  }
  return r;
}

/// The whole N-branch probe: `record_squeeze_averages` over `train`, then
/// `evaluate_utilization` over `eval` (data-parallel as the two-branch `probe_utilization`).
template <NWayModel Net, NWayBatchRange TrainData, NWayBatchRange EvalData,
          std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
NWayUtilizationReport probe_utilization(Net& net, TrainData&& train, EvalData&& eval,
                                        SumAcrossRanks sum_across_ranks = {}) {
  record_squeeze_averages(net, std::forward<TrainData>(train), sum_across_ranks);
  return evaluate_utilization(net, std::forward<EvalData>(eval), sum_across_ranks);
}

}  // namespace mmbalance
