#pragma once
/// \file
/// The modality-specific loss of docs/algorithm.md §1.

#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// CE of each head, each averaged over the batch, in branch order.
inline std::vector<at::Tensor> modality_losses(const NetOutput& out, const at::Tensor& target) {
  TORCH_CHECK(!out.heads.empty() && target.dim() == 1 && target.size(0) == out.heads[0].size(0),
              "modality_specific_loss: target must be (batch) class indices with batch ",
              out.heads.empty() ? std::int64_t{0} : out.heads[0].size(0), ", got ",
              detail::shape_string(target));
  std::vector<at::Tensor> losses;
  for (const auto& head : out.heads) losses.push_back(at::cross_entropy_loss(head, target));
  return losses;
}

/// The sum over k of CE(y_k, target), each averaged over the batch: CE(y0) + CE(y1) for
/// two branches.
inline at::Tensor modality_specific_loss(const NetOutput& out, const at::Tensor& target) {
  const std::vector<at::Tensor> losses = modality_losses(out, target);
  at::Tensor sum = losses[0];
  for (std::size_t k = 1; k < losses.size(); ++k) sum = sum + losses[k];
  return sum;
}

}  // namespace mmbalance
