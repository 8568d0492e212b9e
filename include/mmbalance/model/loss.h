#pragma once
/// \file
/// What a network is trained on: the modality-specific loss of docs/algorithm.md §1, the
/// fused output's loss (joint training), or both.

#include <cstdint>
#include <string_view>
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

/// CE(y, target) of the fused output y (the mean of the heads), averaged over the batch.
inline at::Tensor fused_loss(const NetOutput& out, const at::Tensor& target) {
  TORCH_CHECK(out.y.defined() && target.dim() == 1 && target.size(0) == out.y.size(0),
              "fused_loss: target must be (batch) class indices with batch ",
              out.y.defined() ? out.y.size(0) : std::int64_t{0}, ", got ", detail::shape_string(target));
  return at::cross_entropy_loss(out.y, target);
}

/// The loss a method trains when it does not intervene (in the `Balancer`'s warm-up too).
/// A policy names its own with `static constexpr Objective objective` (balancing/
/// loss_weighting.h); without one it is `modality_specific`.
enum class Objective : std::uint8_t {
  /// Σ_k CE(head_k): every branch trained on its own head (`modality_specific_loss`), the
  /// greedy-learning paper's loss. Without fusion modules the branches then learn as
  /// independent classifiers: no shared softmax couples them.
  modality_specific,
  /// CE(y) of the fused output alone (`fused_loss`): joint training, the baseline of OGM-GE,
  /// AGM and most of the field. y is the mean of the heads, so without fusion modules this
  /// is one linear head over the concatenated features, [W_0 .. W_{N-1}] / N with bias
  /// mean_k b_k.
  fused,
  /// CE(y) + Σ_k CE(head_k): the multimodal loss and every uni-modal one, weight 1 each
  /// (MMPareto's terms).
  fused_and_modality_specific,
};

constexpr std::string_view to_string(Objective objective) {
  switch (objective) {
    case Objective::modality_specific: return "modality_specific";
    case Objective::fused: return "fused";
    case Objective::fused_and_modality_specific: return "fused_and_modality_specific";
  }
  return "invalid";
}

}  // namespace mmbalance
