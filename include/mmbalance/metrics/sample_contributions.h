#pragma once
/// \file
/// Each modality's contribution to each sample's prediction, the valuation of sample-level
/// modality valuation (Wei et al., CVPR 2024, "Enhancing multimodal cooperation via
/// sample-level modality valuation"; `execute_modulation` in code/sample_level.py of
/// GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation).

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// Shapley value φ_k of each modality k for each sample, in the game
/// v(S) = |S| · [the network, with only the modalities in S present, predicts the sample's
/// class] (v(∅) = 0), as (batch, branches) floats on the inputs' device. "Present": the
/// others' activations zero where the fusion modules and heads read them (the
/// presence form of `forward`; the original zeroes the pooled features before its
/// fusion head, `exec_drop` in code/models/models.py). Two branches give the original's
/// φ_0 = (v({0}) + v({0, 1}) − v({1})) / 2; the φ_k sum to v(all): the branch count for a
/// sample predicted correctly, 0 otherwise.
///
/// Eval mode (each module's own mode restored), no gradient, no read from the device: the
/// 2^N − 1 subsets run as copies of the batch stacked along the rows, up to
/// `rows_per_pass` rows a pass (at least one copy).
///
/// Example:
/// ```
/// at::Tensor phi = mmbalance::sample_contributions(net, {x0, x1}, target);  // (batch, 2)
/// ```
template <class Net>
at::Tensor sample_contributions(Net net, const std::vector<at::Tensor>& inputs, const at::Tensor& target,
                                std::int64_t rows_per_pass = 4096) {
  const std::size_t n = inputs.size();
  TORCH_CHECK(n >= 1 && n < 16 && inputs[0].defined(), "sample_contributions: needs the inputs of 1 to 15 modalities, got ",
              n);
  const std::int64_t rows = inputs[0].size(0);
  TORCH_CHECK(target.defined() && target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong,
              "sample_contributions: target must be (batch) int64 class indices with batch ", rows, ", got ",
              detail::shape_string(target));
  TORCH_CHECK(rows_per_pass >= 1, "sample_contributions: rows_per_pass must be >= 1, got ", rows_per_pass);
  EvalModeGuard<Net> eval(net);
  const std::size_t subsets = std::size_t{1} << n;  // s = 1 .. subsets - 1: bit k, modality k present
  const auto per_pass = static_cast<std::size_t>(std::max<std::int64_t>(1, rows_per_pass / std::max<std::int64_t>(rows, 1)));
  const at::Tensor device_target = target.to(inputs[0].device());
  const at::TensorOptions on_device = inputs[0].options().dtype(at::kLong);
  // Bit k of subset s: (s / 2^k) mod 2, computed on the device (no copy from the host).
  const at::Tensor powers = at::pow(2, at::arange(static_cast<std::int64_t>(n), on_device));
  std::vector<at::Tensor> value(subsets);  // v(S) = |S| · [correct], (batch) int64
  value[0] = at::zeros({rows}, on_device);
  for (std::size_t first = 1; first < subsets; first += per_pass) {
    const std::size_t last = std::min(subsets, first + per_pass);
    const auto copies = static_cast<std::int64_t>(last - first);
    std::vector<at::Tensor> stacked;
    for (const at::Tensor& x : inputs) stacked.push_back(copies == 1 ? x : at::cat(std::vector<at::Tensor>(copies, x)));
    const at::Tensor s = at::arange(static_cast<std::int64_t>(first), static_cast<std::int64_t>(last), on_device);
    const at::Tensor presence = s.unsqueeze(1).div(powers, "floor").remainder(2).eq(1).repeat_interleave(rows, 0);
    const at::Tensor y = net->forward(stacked, StepPlan::regular(), presence).y;
    const at::Tensor correct = y.argmax(1).view({copies, rows}).eq(device_target);
    for (std::size_t subset = first; subset < last; ++subset) {
      value[subset] = correct[static_cast<std::int64_t>(subset - first)].to(at::kLong) * std::popcount(subset);
    }
  }
  // φ_k = Σ_{S ∌ k} |S|! (N − |S| − 1)! (v(S ∪ {k}) − v(S)) / N!: the sum in integers, one
  // division, so that φ is the rational value correctly rounded (a sample every subset
  // predicts gets exactly 1, which the copies' bound `φ < 1` tells apart).
  std::vector<std::int64_t> factorial(n + 1, 1);
  for (std::size_t i = 1; i <= n; ++i) factorial[i] = factorial[i - 1] * static_cast<std::int64_t>(i);
  std::vector<at::Tensor> phi;
  for (std::size_t k = 0; k < n; ++k) {
    at::Tensor sum = at::zeros_like(value[0]);
    for (std::size_t subset = 0; subset < subsets; ++subset) {
      if (subset >> k & 1) continue;
      const auto size = static_cast<std::size_t>(std::popcount(subset));
      sum = sum + (value[subset | std::size_t{1} << k] - value[subset]) * (factorial[size] * factorial[n - size - 1]);
    }
    phi.push_back(sum.to(at::kDouble).div(static_cast<double>(factorial[n])).to(at::kFloat));
  }
  return at::stack(phi, 1);
}

}  // namespace mmbalance
