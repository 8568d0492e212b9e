#pragma once
/// \file
/// The gradient-modulation hook of balancing policies: what a policy that rescales or
/// perturbs branch gradients between `backward()` and the optimizer step (OGM-GE, AGM)
/// receives from the `Balancer`, and which parameters it may change.

#include <concepts>
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include <ATen/ATen.h>

namespace mmbalance {

/// Which parameters of a branch a gradient-modulating policy changes.
enum class ModulatedParameters : std::uint8_t {
  /// Weights of 3 or more dimensions: convolution kernels (OGM-GE's original choice).
  conv_weights = 0,
  /// Every parameter of 2 or more dimensions: all weights, no biases or norm scales.
  non_bias = 1,
  /// Every parameter of the branch.
  all = 2,
};

constexpr std::string_view to_string(ModulatedParameters which) {
  switch (which) {
    case ModulatedParameters::conv_weights: return "conv_weights";
    case ModulatedParameters::non_bias: return "non_bias";
    case ModulatedParameters::all: return "all";
  }
  return "invalid";
}

/// Whether `which` selects parameter `p`.
inline bool is_modulated(const at::Tensor& p, ModulatedParameters which) {
  switch (which) {
    case ModulatedParameters::conv_weights: return p.dim() >= 3;
    case ModulatedParameters::non_bias: return p.dim() >= 2;
    case ModulatedParameters::all: return true;
  }
  return false;
}

namespace detail {
/// The dtype a policy computes a tensor's statistics and changes in: its own, at least
/// float (half and bfloat16 sums, squares and draws would round, underflow or overflow).
inline at::ScalarType at_least_float(const at::Tensor& t) { return at::promote_types(t.scalar_type(), at::kFloat); }
}  // namespace detail

/// What a policy's `modulate_gradients` hook receives after `backward()`: this step's
/// logits of every branch's head (detached), the targets, each branch's parameters θ_k,
/// whose `.grad()` it may change in place, and what adds a statistic up over the
/// data-parallel ranks (in place; nothing in one process) so that every rank decides
/// from the whole batch. In data-parallel training the gradients are the ranks' average
/// already, identical on every rank. `epoch` is the balancer's epoch (counting warm-up).
/// For a policy that `NeedsFusedGradients`, `fused_gradients[k][i]` is the gradient of the
/// fused output's loss alone, scale·CE(y, target) summed over the step's `loss()` calls,
/// with respect to `branch_parameters[k][i]` (undefined for a parameter that does not
/// require a gradient), this rank's own: it is not averaged over the ranks. Empty for
/// other policies. For a policy that `NeedsMaskedOutputs`, `subset_outputs[S]` is the fused
/// output y of the step's rows with only the modalities in bit mask S present (the
/// others' inputs zeroed; eval mode, no gradient), `subset_outputs[2^N − 1]` the step's own
/// y (detached) and `subset_outputs[0]` undefined; empty for other policies.
struct StepGradients {
  const std::vector<at::Tensor>& heads;
  const at::Tensor& target;
  const std::vector<std::vector<at::Tensor>>& branch_parameters;
  const std::function<void(at::Tensor&)>& sum_across_ranks;
  std::int64_t epoch = 0;
  const std::vector<std::vector<at::Tensor>>& fused_gradients = kNoFusedGradients;
  const std::vector<at::Tensor>& subset_outputs = kNoSubsetOutputs;
  /// Every branch's features (what its head reads), detached, rows as `heads`.
  const std::vector<at::Tensor>& features = kNoTensors;

  static inline const std::vector<std::vector<at::Tensor>> kNoFusedGradients{};
  static inline const std::vector<at::Tensor> kNoSubsetOutputs{};
  static inline const std::vector<at::Tensor> kNoTensors{};
};

/// A policy that changes branch gradients after `backward()`, before the optimizer step.
/// The `Balancer` calls the hook from `observe(loss)` on every step after warm-up, after
/// the learning-speed meter has read the unmodulated gradients; the step's loss must come
/// from `Balancer::loss(out, target)`, which hands the hook the step's outputs, and in
/// data-parallel training `observe` takes `dp.sum_across_ranks()` as its second argument.
template <class P>
concept ModulatesGradients = requires(P& p, const StepGradients& g) { p.modulate_gradients(g); };

/// A gradient-modulating policy that compares the fused loss's gradient on each branch
/// with the step's whole gradient (MMPareto) declares
/// `static constexpr bool needs_fused_gradients = true`. After warm-up,
/// `Balancer::loss(out, target)` then computes ∂CE(y)/∂θ_k with `torch::autograd::grad`
/// (keeping the graph for your `backward()`: one extra backward pass, no extra forward)
/// and hands it to the hook as `StepGradients::fused_gradients`.
template <class P>
concept NeedsFusedGradients = ModulatesGradients<P> && requires { requires bool(P::needs_fused_gradients); };

}  // namespace mmbalance
