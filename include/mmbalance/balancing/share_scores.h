#pragma once
/// \file
/// Each branch's score of the step's batch as OGM-GE and OPM define it: the summed
/// softmax probability of the true class under the branch's share h_k / N of the fused
/// output y = Σ_k h_k / N (the originals' slice of a concatenation head).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace mmbalance::detail {

/// Refuses heads and targets a score cannot be computed from, naming `who`.
inline void check_share_heads(const std::vector<at::Tensor>& heads, const at::Tensor& target, const char* who) {
  TORCH_CHECK(heads.size() >= 2, who, ": needs the heads of 2 or more branches, got ", heads.size());
  TORCH_CHECK(target.defined() && target.dim() == 1 && target.scalar_type() == at::kLong, who,
              ": the targets must be a (batch) int64 tensor of class indices");
  for (const at::Tensor& h : heads) {
    TORCH_CHECK(h.defined() && h.dim() == 2 && h.size(0) == target.size(0), who,
                ": every head must be (batch, classes) logits for the ", target.size(0), " targets");
  }
}

/// s_k = Σ_i softmax(h_k / N)_i[y_i], a float tensor of N numbers on the heads' device;
/// data-parallel, `sum_across_ranks` adds every rank's share first.
inline at::Tensor share_scores(const std::vector<at::Tensor>& heads, const at::Tensor& target,
                               const std::function<void(at::Tensor&)>& sum_across_ranks, const char* who) {
  check_share_heads(heads, target, who);
  const auto n = static_cast<double>(heads.size());
  std::vector<at::Tensor> scores;
  for (const at::Tensor& h : heads) {
    // In float: a half softmax summed over a batch would round.
    const at::Tensor share = h.detach().to(at::kFloat) / n;
    scores.push_back(at::softmax(share, 1).gather(1, target.unsqueeze(1)).sum());
  }
  at::Tensor s = at::stack(scores);
  if (sum_across_ranks) sum_across_ranks(s);
  return s;
}

/// s_k over the mean of the other branches' scores; for two branches s_0 / s_1 and
/// s_1 / s_0 exactly as the originals divide.
inline at::Tensor score_ratios(const at::Tensor& s) {
  const std::int64_t n = s.size(0);
  const at::Tensor others_mean = n == 2 ? s.flip(0) : (s.sum() - s) / static_cast<double>(n - 1);
  return s / others_mean;
}

}  // namespace mmbalance::detail
