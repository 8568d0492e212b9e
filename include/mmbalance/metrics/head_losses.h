#pragma once
/// \file
/// Every head's mean cross-entropy over a set of batches (eval mode, no gradients): what
/// Gradient-Blending compares between training and held-out data.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/metrics/n_way_utilization_probe.h"
#include "mmbalance/metrics/utilization_probe.h"
#include "mmbalance/model/eval_mode.h"

namespace mmbalance {

/// Mean cross-entropy per sample of each branch's head (branch order) and of the fused
/// output y, over `samples` samples.
struct HeadLosses {
  std::vector<double> heads;
  double fused = NAN;
  std::int64_t samples = 0;
};

namespace detail {
// Adds each head's and y's summed CE of one batch to `sums` (heads, then y, then the count).
inline void add_head_losses(at::Tensor& sums, const at::Tensor& y, const std::vector<at::Tensor>& heads,
                            const at::Tensor& target, const char* who) {
  const std::int64_t n = heads.front().size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, who, ": target must be (batch) class "
              "indices with batch ", n, ", got ", shape_string(target));
  std::vector<at::Tensor> per_head;
  for (const at::Tensor& h : heads) {
    per_head.push_back(at::cross_entropy_loss(h.to(at::kDouble), target, {}, at::Reduction::Sum));
  }
  per_head.push_back(at::cross_entropy_loss(y.to(at::kDouble), target, {}, at::Reduction::Sum));
  const auto k = static_cast<std::int64_t>(per_head.size());
  sums.narrow(0, 0, k).add_(at::stack(per_head));
  sums.narrow(0, k, 1).add_(static_cast<double>(n));
}

// Reads the sums (after adding them up over the ranks) into means.
template <class SumAcrossRanks>
HeadLosses head_losses_from(at::Tensor& sums, std::size_t branches, SumAcrossRanks& sum_across_ranks,
                            const char* who) {
  sum_across_ranks(sums);
  const at::Tensor host = sums.to(at::kCPU);
  const double* s = host.data_ptr<double>();
  const double count = s[branches + 1];
  TORCH_CHECK(count > 0, who, ": the data is empty (no samples to measure the losses on)");
  HeadLosses out;
  for (std::size_t k = 0; k < branches; ++k) out.heads.push_back(s[k] / count);
  out.fused = s[branches] / count;
  out.samples = static_cast<std::int64_t>(count);
  return out;
}
}  // namespace detail

/// The mean CE of each head and of y = (y0 + y1) / 2 over `data`, in eval mode without
/// gradients (training mode restored). One host read at the end; data-parallel, each rank
/// passes its shard and `sum_across_ranks`, and every rank gets the losses of all shards.
/// Empty data throws.
template <MultiModalModel Net, BatchRange Data, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
HeadLosses head_losses(Net& net, Data&& data, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  at::Tensor sums = at::zeros({4}, at::TensorOptions(at::kDouble).device(device));
  for (const auto& batch : data) {
    const ModelOutput out = net->forward(batch.x0.to(device), batch.x1.to(device), StepKind::regular);
    detail::add_head_losses(sums, out.y, {out.y0, out.y1}, batch.target.to(device), "head_losses");
  }
  return detail::head_losses_from(sums, 2, sum_across_ranks, "head_losses");
}

/// The same for N branches (`NWayBatch`es): each head, then y, the mean of the heads.
template <class Net, NWayBatchRange Data, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
  requires requires(Net net, const std::vector<at::Tensor>& x) {
    { net->forward(x) } -> std::same_as<NWayOutput>;
    { net->num_branches() } -> std::convertible_to<std::size_t>;
  }
HeadLosses head_losses(Net& net, Data&& data, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  const std::size_t branches = net->num_branches();
  at::Tensor sums = at::zeros({static_cast<std::int64_t>(branches + 2)}, at::TensorOptions(at::kDouble).device(device));
  for (const auto& batch : data) {
    std::vector<at::Tensor> inputs;
    for (const auto& x : batch.inputs) inputs.push_back(x.to(device));
    const NWayOutput out = net->forward(inputs);
    detail::add_head_losses(sums, out.y, out.heads, batch.target.to(device), "head_losses");
  }
  return detail::head_losses_from(sums, branches, sum_across_ranks, "head_losses");
}

}  // namespace mmbalance
