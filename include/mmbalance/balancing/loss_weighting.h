#pragma once
/// \file
/// The loss hooks of balancing policies: a policy names the loss its method trains (its
/// objective), one that weights the per-head losses (Gradient-Blending) tells the
/// `Balancer` its weights, one that weighs samples gives a weight per row, and one that
/// adds a term of its own (a regulariser) computes it from the step's output.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/balancing/epoch_losses.h"  // its hooks were declared here before 2026-12-07
#include "mmbalance/model/loss.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// The weights of a step's loss: `Balancer::loss(out, target)` is
/// Σ_k heads[k]·CE(head_k, target) + fused·CE(y, target), each CE averaged over the batch
/// (y: the network's fused output, the mean of the heads). Without a loss-weighting
/// policy the balancer's loss is every head's CE with weight 1 and the fused one 0.
struct LossWeights {
  std::vector<double> heads;
  double fused = 0.0;
};

/// A policy that names the loss its method trains, in every step (warm-up included) in
/// which it does not weight the losses itself: `static constexpr Objective objective =
/// Objective::fused;` (joint training, as OGM-GE's and AGM's originals). Without it the
/// balancer trains `Objective::modality_specific`. A policy whose objective is not that
/// one needs the loss formed by `Balancer::loss`: `observe` refuses a step whose loss was
/// not.
template <class P>
concept DeclaresObjective = requires { typename std::integral_constant<Objective, P::objective>; };

/// The objective of policy P (`Objective::modality_specific` where it names none).
template <class P>
constexpr Objective objective_of() {
  if constexpr (DeclaresObjective<P>) {
    return P::objective;
  } else {
    return Objective::modality_specific;
  }
}

/// `objective` as weights of a network with `branches` branches: 1 for each term it has.
inline LossWeights weights_of(Objective objective, std::size_t branches) {
  const bool heads = objective != Objective::fused, fused = objective != Objective::modality_specific;
  return {std::vector<double>(branches, heads ? 1.0 : 0.0), fused ? 1.0 : 0.0};
}

/// A policy that weights the step's losses; the `Balancer` asks for the weights in every
/// `loss()` after warm-up (in warm-up the loss is the unweighted one).
template <class P>
concept WeighsLosses = requires(const P& p) {
  { p.loss_weights() } -> std::convertible_to<LossWeights>;
};

/// A policy that adds a term of its own to the step's loss: after warm-up
/// `Balancer::loss(out, target)` is the (weighted) cross-entropies plus
/// `auxiliary_loss(out, target)`, from the step's output as the network returned it (not
/// detached: the term's gradient reaches the parameters through the same `backward()`).
/// The term is a scalar on the output's device; an undefined tensor adds nothing this
/// step. A term that carries no gradient while the output does (computed from detached
/// tensors) is refused by name: it would change the loss's value and nothing else.
template <class P>
concept AddsAuxiliaryLoss = requires(const P& p, const NetOutput& out, const at::Tensor& target) {
  { p.auxiliary_loss(out, target) } -> std::convertible_to<at::Tensor>;
};

/// A policy that weighs each sample of the step: after warm-up every cross-entropy term of
/// `Balancer::loss(out, target)` (each head's, and y's where weighted) is the batch mean
/// of w_i·CE_i with `sample_weights(out, target)`'s w (one finite weight >= 0 per row of
/// the batch, on the output's device; an undefined tensor weighs nothing this step).
/// Weights of 1 give the unweighted loss; sample-level methods up-weight the rows whose
/// weak modality contributes least.
template <class P>
concept WeighsSamples = requires(const P& p, const NetOutput& out, const at::Tensor& target) {
  { p.sample_weights(out, target) } -> std::same_as<at::Tensor>;
};

}  // namespace mmbalance
