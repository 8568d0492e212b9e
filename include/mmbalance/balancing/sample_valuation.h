#pragma once
/// \file
/// Sample-level modality valuation (Wei et al., CVPR 2024, "Enhancing multimodal
/// cooperation via sample-level modality valuation"), for any number of branches: joint
/// training whose epochs after warm-up add, for every sample, copies in which only the
/// modality that contributed little to its prediction is present.

#include <cstdint>

#include <ATen/ATen.h>

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/metrics/sample_contributions.h"
#include "mmbalance/model/loss.h"

namespace mmbalance {

/// The rows of a resampled epoch: `samples` (rows) int64, which training sample each row
/// is, and `presence` (rows, branches) bool, which of its modalities the row keeps (the
/// presence form of `MultiModalNet::forward`), both on the CPU.
struct ResampledRows {
  at::Tensor samples;
  at::Tensor presence;
};

/// Trains CE(y) alone (code/sample_level.py: `criterion(out, label)` in warm-up and after).
/// An epoch after warm-up trains on the training set resampled from the network as the
/// previous epoch left it (sample_level.py, the loop in `main` and `execute_modulation`):
///   1. φ = `sample_contributions` of every training sample;
///   2. `copies(φ)`: for sample i and modality k, 1 copy for 0.4 < φ_ik < 1, 2 for
///      −0.1 < φ_ik < 0.4, 3 for φ_ik < −0.1, none otherwise (code/datasets/dataloader.py,
///      `AV_KS_Dataset_sample_level.__init__`, the original's bounds as written);
///   3. `resampled_rows(copies)`: every sample once with all its modalities, then each
///      copy with modality k alone present; the loop shuffles and batches them as any
///      epoch, and runs `net->forward(inputs, plan, rows.presence)`.
/// The valuation and the rows are the loop's (it owns the data); the policy is
/// `JointTrainingPolicy` under its own checkpoint name. With several processes every
/// process must build the same rows: value each rank's share, sum φ over the ranks.
///
/// Example:
/// ```
/// mmbalance::Balancer<mmbalance::SampleValuationPolicy> balancer(net, {},
///     mmbalance::BalancerOptions().warmup_epochs(5));
/// // at the start of an epoch >= 5:
/// at::Tensor phi = ...;  // sample_contributions over the training set, (samples, branches)
/// auto rows = mmbalance::SampleValuationPolicy::resampled_rows(
///     mmbalance::SampleValuationPolicy::copies(phi));
/// ```
struct SampleValuationPolicy {
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.sample_valuation", 1};
  static constexpr Objective objective = Objective::fused;
  StepPlan next_plan() const { return StepPlan::regular(); }

  /// The copies of each sample with each modality alone, (samples, branches) int64 on
  /// φ's device, from the contributions φ (samples, branches).
  static at::Tensor copies(const at::Tensor& contributions) {
    TORCH_CHECK(contributions.defined() && contributions.dim() == 2 && contributions.is_floating_point(),
                "SampleValuationPolicy::copies: contributions must be (samples, branches) floats, got ",
                detail::shape_string(contributions));
    const at::Tensor& phi = contributions;
    const at::Tensor zero = at::zeros_like(phi, phi.options().dtype(at::kLong));
    return at::where(phi.gt(0.4) & phi.lt(1.0), zero + 1,
                     at::where(phi.gt(-0.1) & phi.lt(0.4), zero + 2, at::where(phi.lt(-0.1), zero + 3, zero)));
  }

  /// Every sample with all its modalities, in order, then sample by sample and modality
  /// by modality the copies (`copies`, (samples, branches), counts >= 0) with that
  /// modality alone present. Reads the counts to the host.
  static ResampledRows resampled_rows(const at::Tensor& copies) {
    TORCH_CHECK(copies.defined() && copies.dim() == 2 && copies.scalar_type() == at::kLong && copies.size(1) >= 1,
                "SampleValuationPolicy::resampled_rows: copies must be (samples, branches) int64, got ",
                detail::shape_string(copies));
    const at::Tensor counts = copies.to(at::kCPU).flatten();
    TORCH_CHECK(counts.numel() == 0 || counts.min().item<std::int64_t>() >= 0,
                "SampleValuationPolicy::resampled_rows: a negative number of copies");
    const std::int64_t samples = copies.size(0), branches = copies.size(1);
    // Entry j of the flattened counts is sample j / branches, modality j % branches.
    const at::Tensor entry = at::arange(samples * branches, at::kLong).repeat_interleave(counts);
    const at::Tensor kept = at::arange(branches, at::kLong).unsqueeze(0);
    return {at::cat({at::arange(samples, at::kLong), entry.div(branches, "floor")}),
            at::cat({at::ones({samples, branches}, at::kBool), entry.remainder(branches).unsqueeze(1).eq(kept)})};
  }
};

template <>
inline constexpr bool detail::kLibraryPolicy<SampleValuationPolicy> = true;

static_assert(BalancingPolicy<SampleValuationPolicy>);

}  // namespace mmbalance
