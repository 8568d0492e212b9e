#pragma once
/// \file
/// The modality-specific loss of docs/algorithm.md §1.

#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/model/multimodal_net.h"
#include "mmbalance/model/n_way_multimodal_net.h"

namespace mmbalance {

/// The two heads' losses, for logging them apart: `loss0 + loss1` is the training loss.
struct ModalityLosses {
  at::Tensor loss0, loss1;  ///< CE(y0, target), CE(y1, target), each averaged over the batch
};

/// CE of each head, each averaged over the batch.
inline ModalityLosses modality_losses(const ModelOutput& out, const at::Tensor& target) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == out.y0.size(0),
              "modality_specific_loss: target must be (batch) class indices with batch ",
              out.y0.size(0), ", got ", detail::shape_string(target));
  return {at::cross_entropy_loss(out.y0, target), at::cross_entropy_loss(out.y1, target)};
}

/// CE(y0, target) + CE(y1, target), each averaged over the batch.
inline at::Tensor modality_specific_loss(const ModelOutput& out, const at::Tensor& target) {
  const ModalityLosses l = modality_losses(out, target);
  return l.loss0 + l.loss1;
}

/// N branches: CE of each head, each averaged over the batch, in branch order.
inline std::vector<at::Tensor> modality_losses(const NWayOutput& out, const at::Tensor& target) {
  TORCH_CHECK(!out.heads.empty() && target.dim() == 1 && target.size(0) == out.heads[0].size(0),
              "modality_specific_loss: target must be (batch) class indices with batch ",
              out.heads.empty() ? std::int64_t{0} : out.heads[0].size(0), ", got ",
              detail::shape_string(target));
  std::vector<at::Tensor> losses;
  for (const auto& head : out.heads) losses.push_back(at::cross_entropy_loss(head, target));
  return losses;
}

/// N branches: the sum over k of CE(y_k, target), each averaged over the batch.
inline at::Tensor modality_specific_loss(const NWayOutput& out, const at::Tensor& target) {
  const std::vector<at::Tensor> losses = modality_losses(out, target);
  at::Tensor sum = losses[0];
  for (std::size_t k = 1; k < losses.size(); ++k) sum = sum + losses[k];
  return sum;
}

}  // namespace mmbalance
