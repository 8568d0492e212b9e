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

/// The mean CE of each head and of y, the mean of the heads, over `data` (any
/// `BatchRange`), in eval mode without gradients (training mode restored). One host read
/// at the end; data-parallel, each rank passes its shard and `sum_across_ranks`, and every
/// rank gets the losses of all shards. Empty data throws.
template <MultiModalModel Net, BatchRange Data, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
HeadLosses head_losses(Net& net, Data&& data, SumAcrossRanks sum_across_ranks = {}) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  const std::size_t branches = net->num_branches();
  // Each head's summed CE, then y's, then the count.
  at::Tensor sums = at::zeros({static_cast<std::int64_t>(branches + 2)}, at::TensorOptions(at::kDouble).device(device));
  for (const auto& batch : data) {
    const NetOutput out = net->forward(detail::batch_inputs(batch, device), StepPlan::regular());
    const at::Tensor target = batch.target.to(device);
    const std::int64_t n = out.y.size(0);
    TORCH_CHECK(target.dim() == 1 && target.size(0) == n, "head_losses: target must be (batch) "
                "class indices with batch ", n, ", got ", detail::shape_string(target));
    std::vector<at::Tensor> per_head;
    for (const at::Tensor& h : out.heads) {
      per_head.push_back(at::cross_entropy_loss(h.to(at::kDouble), target, {}, at::Reduction::Sum));
    }
    per_head.push_back(at::cross_entropy_loss(out.y.to(at::kDouble), target, {}, at::Reduction::Sum));
    const auto k = static_cast<std::int64_t>(per_head.size());
    sums.narrow(0, 0, k).add_(at::stack(per_head));
    sums.narrow(0, k, 1).add_(static_cast<double>(n));
  }
  sum_across_ranks(sums);
  const at::Tensor host = sums.to(at::kCPU);
  const double* s = host.data_ptr<double>();
  const double count = s[branches + 1];
  TORCH_CHECK(count > 0, "head_losses: the data is empty (no samples to measure the losses on)");
  HeadLosses out;
  for (std::size_t k = 0; k < branches; ++k) out.heads.push_back(s[k] / count);
  out.fused = s[branches] / count;
  out.samples = static_cast<std::int64_t>(count);
  return out;
}

}  // namespace mmbalance
