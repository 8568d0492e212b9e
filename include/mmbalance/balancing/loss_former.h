#pragma once
/// \file
/// The `Balancer`'s loss former: forms a step's loss as the policy asks (loss and sample
/// weights, a term of its own) and stages what the step's gradient hook needs (detached
/// heads and targets, the fused loss's gradients, the masked passes' outputs).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/balancing/loss_weighting.h"
#include "mmbalance/balancing/masked_outputs.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/loss.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance::detail {

template <class Policy>
class LossFormer {
 public:
  /// Whether the policy needs the loss formed here (and the step's outputs it stages).
  static constexpr bool kNeeded = ModulatesGradients<Policy> || WeighsLosses<Policy> ||
                                  AddsAuxiliaryLoss<Policy> || WeighsSamples<Policy> ||
                                  objective_of<Policy>() != Objective::modality_specific;

  template <class Net>
  LossFormer(Net net, std::vector<std::vector<at::Tensor>> branch_parameters, std::int64_t masked_rows_per_pass)
      : branch_parameters_(std::move(branch_parameters)) {
    TORCH_CHECK(masked_rows_per_pass >= 1, "Balancer: masked_rows_per_pass must be >= 1, got ",
                masked_rows_per_pass);
    if constexpr (NeedsMaskedOutputs<Policy>) masked_forward_ = masked_forward(net, masked_rows_per_pass);
  }

  /// The step's loss (see `Balancer::loss`); `after_warmup` turns the policy's hooks on.
  /// Staged, then committed: a throw (e.g. out of memory) leaves the step's earlier calls.
  at::Tensor form(const Policy& policy, const NetOutput& out, const at::Tensor& target,
                  const std::vector<at::Tensor>* inputs, double scale, bool after_warmup,
                  bool check_every_step) {
    TORCH_CHECK(out.heads.size() == branches(), "Balancer::loss: the output has ", out.heads.size(),
                " heads, the network ", branches(), " branches");
    TORCH_CHECK(std::isfinite(scale) && scale > 0, "Balancer::loss: scale must be a finite number > 0, got ", scale);
    TORCH_CHECK(target.defined() && target.dim() == 1 && out.heads[0].defined() && target.size(0) == out.heads[0].size(0),
                "Balancer::loss: target must be (batch) class indices with batch ",
                out.heads[0].defined() ? out.heads[0].size(0) : std::int64_t{0}, ", got ", shape_string(target));
    if constexpr (NeedsMaskedOutputs<Policy>) check_inputs(*inputs, target);  // only overloads with inputs
    at::Tensor total, weights;
    if constexpr (WeighsSamples<Policy>) {
      if (after_warmup) weights = sample_weights(policy, out, target, check_every_step);
    }
    if constexpr (WeighsLosses<Policy>) {
      if (after_warmup) total = weighted_loss(policy.loss_weights(), out, target, weights);
    }
    if (!total.defined()) total = weighted_loss(weights_of(objective_of<Policy>(), branches()), out, target, weights);
    if constexpr (AddsAuxiliaryLoss<Policy>) {
      if (after_warmup) total = with_auxiliary_loss(policy, total, out, target);
    }
    if constexpr (kNeeded) {
      std::vector<at::Tensor> heads, features;
      for (std::size_t k = 0; k < out.heads.size(); ++k) {
        const at::Tensor h = out.heads[k].detach();
        heads.push_back(heads_.empty() ? h : at::cat({heads_[k], h}));
        // Features missing from any of the step's calls (forward_missing) stay undefined.
        at::Tensor f = k < out.features.size() && out.features[k].defined() ? out.features[k].detach() : at::Tensor();
        if (!heads_.empty()) f = f.defined() && features_[k].defined() ? at::cat({features_[k], f}) : at::Tensor();
        features.push_back(f);
      }
      at::Tensor targets = heads_.empty() ? target : at::cat({target_, target});
      std::vector<std::vector<at::Tensor>> fused;
      if constexpr (NeedsFusedGradients<Policy>) {
        if (after_warmup) fused = accumulated_fused_gradients(out, target, scale);
      }
      std::vector<at::Tensor> subsets;
      if constexpr (NeedsMaskedOutputs<Policy>) {
        if (after_warmup) subsets = accumulated_subset_outputs(out, *inputs);
      }
      heads_ = std::move(heads);
      features_ = std::move(features);
      target_ = std::move(targets);
      fused_gradients_ = std::move(fused);
      subset_outputs_ = std::move(subsets);
    }
    return scale == 1.0 ? total : total * scale;
  }

  /// Refuses a step whose loss was not formed here, where the policy needs it (in warm-up
  /// too: the loop is wrong from the start).
  void check_formed() const {
    if constexpr (kNeeded) {
      const std::string why =
          ModulatesGradients<Policy> ? " modulates gradients from the step's outputs"
          : WeighsLosses<Policy> || AddsAuxiliaryLoss<Policy> || WeighsSamples<Policy>
              ? " forms the step's loss (weights or a term of its own)"
              : " trains the objective " + std::string(to_string(objective_of<Policy>())) +
                    ", not the sum of the heads' losses";
      TORCH_CHECK(!heads_.empty(), "Balancer::observe: ", policy_type<Policy>(), why,
                  "; form the loss with balancer.loss(out, target)");
    }
  }

  /// What the policy's gradient hook receives for the step formed here.
  StepGradients gradients(const std::function<void(at::Tensor&)>& sum_across_ranks,
                          std::int64_t epoch) const {
    return StepGradients{heads_, target_, branch_parameters_, sum_across_ranks, epoch,
                         fused_gradients_, subset_outputs_, features_};
  }

  const std::vector<std::vector<at::Tensor>>& branch_parameters() const { return branch_parameters_; }

  /// The outputs staged here belong to one step.
  void release() {
    heads_.clear();
    features_.clear();
    target_ = at::Tensor();
    fused_gradients_.clear();
    subset_outputs_.clear();
  }

 private:
  std::size_t branches() const { return branch_parameters_.size(); }

  // The inputs a masking policy runs the network on: one per branch, a row per target.
  void check_inputs(const std::vector<at::Tensor>& inputs, const at::Tensor& target) const {
    TORCH_CHECK(inputs.size() == branches(), "Balancer::loss: ", inputs.size(), " inputs for a "
                "network of ", branches(), " branches");
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      TORCH_CHECK(inputs[k].defined() && inputs[k].dim() >= 1 && target.defined() && target.dim() >= 1 &&
                      inputs[k].size(0) == target.size(0),
                  "Balancer::loss: input ", k, " is ", shape_string(inputs[k]), ", the targets ",
                  shape_string(target), "; every input needs a row per target");
    }
  }

  // The step's staged masked outputs with this call's rows appended: y with the modalities
  // of each bit mask present (0: not run; all: the step's own y).
  std::vector<at::Tensor> accumulated_subset_outputs(const NetOutput& out, const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor> v = masked_forward_(inputs);
    v.back() = out.y.detach();
    if (!subset_outputs_.empty()) {
      for (std::size_t s = 1; s < v.size(); ++s) v[s] = at::cat({subset_outputs_[s], v[s]});
    }
    return v;
  }

  // CE(logits, target) averaged over the batch, each row weighted when `weights` is defined.
  static at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weights) {
    if (!weights.defined()) return at::cross_entropy_loss(logits, target);
    return (at::cross_entropy_loss(logits, target, {}, at::Reduction::None) * weights).mean();
  }

  // The policy's per-row weights, checked: one finite weight >= 0 per row, on the output's
  // device (the value check reads to the host only with checks on).
  static at::Tensor sample_weights(const Policy& policy, const NetOutput& out, const at::Tensor& target,
                                   bool check_every_step) {
    at::Tensor w = policy.sample_weights(out, target);
    if (!w.defined()) return w;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == target.size(0) && at::isFloatingType(w.scalar_type()),
                "Balancer::loss: ", policy_type<Policy>(), "'s sample weights must be one floating-point "
                "number per row of the batch (", target.size(0), "), got ", w.scalar_type(), " ",
                shape_string(w));
    TORCH_CHECK(w.device() == out.y.device(), "Balancer::loss: ", policy_type<Policy>(), "'s sample weights "
                "are on ", w.device(), ", the step's output on ", out.y.device());
    if (check_every_step) {
      TORCH_CHECK(at::isfinite(w).all().logical_and((w >= 0).all()).item<bool>(), "Balancer::loss: ",
                  policy_type<Policy>(), "'s sample weights must be finite and >= 0");
    }
    return w.detach();
  }

  // Σ_k w_k·CE(head_k) + w_y·CE(y) with weights `w` (the policy's or its objective's; host
  // numbers: no read), each CE over rows weighted by `sample_weights` where given.
  at::Tensor weighted_loss(const LossWeights& w, const NetOutput& out, const at::Tensor& target,
                           const at::Tensor& sample_weights) const {
    TORCH_CHECK(w.heads.size() == branches(), "Balancer::loss: ", policy_type<Policy>(), " weighs ",
                w.heads.size(), " heads, the network has ", branches());
    // Terms of weight 0 are left out: no work, and an infinite loss there does not make
    // the sum NaN (0·inf).
    at::Tensor total;
    const auto add = [&](const at::Tensor& logits, double weight) {
      if (weight == 0) return;
      const at::Tensor ce = cross_entropy(logits, target, sample_weights);
      const at::Tensor term = weight == 1 ? ce : ce * weight;
      total = total.defined() ? total + term : term;
    };
    for (std::size_t k = 0; k < out.heads.size(); ++k) add(out.heads[k], w.heads[k]);
    add(out.y, w.fused);
    TORCH_CHECK(total.defined(), "Balancer::loss: ", policy_type<Policy>(), " weighs every loss 0");
    return total;
  }

  // The loss plus the policy's own term (`AddsAuxiliaryLoss`), which must be a scalar on
  // the loss's device and, when the loss carries a gradient, carry one too.
  static at::Tensor with_auxiliary_loss(const Policy& policy, const at::Tensor& total, const NetOutput& out,
                                        const at::Tensor& target) {
    const at::Tensor term = policy.auxiliary_loss(out, target);
    if (!term.defined()) return total;
    TORCH_CHECK(term.numel() == 1 && at::isFloatingType(term.scalar_type()), "Balancer::loss: ", policy_type<Policy>(),
                "'s auxiliary loss must be a floating-point scalar, got ", term.scalar_type(), " ",
                shape_string(term));
    TORCH_CHECK(term.device() == total.device(), "Balancer::loss: ", policy_type<Policy>(), "'s auxiliary loss is on ",
                term.device(), ", the step's loss on ", total.device());
    TORCH_CHECK(term.requires_grad() || !total.requires_grad(), "Balancer::loss: ", policy_type<Policy>(),
                "'s auxiliary loss carries no gradient while the output does (computed from detached "
                "tensors?): it would change the loss's value and train nothing");
    return total + term.reshape({}).to(total.scalar_type());
  }

  // The step's staged fused gradients plus ∂(scale·CE(y, target))/∂θ_k (several loss()
  // calls in one step: accumulated micro-batches, as backward() adds their gradients up).
  std::vector<std::vector<at::Tensor>> accumulated_fused_gradients(const NetOutput& out, const at::Tensor& target,
                                                                   double scale) const {
    std::vector<std::vector<at::Tensor>> sum = fused_gradients(out, target, scale);
    if (fused_gradients_.empty()) return sum;
    for (std::size_t k = 0; k < sum.size(); ++k) {
      for (std::size_t i = 0; i < sum[k].size(); ++i) {
        if (sum[k][i].defined()) sum[k][i] = sum[k][i] + fused_gradients_[k][i];
      }
    }
    return sum;
  }

  // ∂(scale·CE(y, target))/∂θ_k for every branch parameter that requires a gradient
  // (undefined for the others; zeros for one the fused output does not reach), the graph kept.
  std::vector<std::vector<at::Tensor>> fused_gradients(const NetOutput& out, const at::Tensor& target,
                                                       double scale) const {
    TORCH_CHECK(out.y.defined() && out.y.requires_grad(), "Balancer::loss: ", policy_type<Policy>(),
                " needs the gradient of the fused output's loss, and the output does not "
                "require a gradient (computed under NoGradGuard, or every parameter frozen?)");
    std::vector<at::Tensor> inputs;
    for (const auto& group : branch_parameters_) {
      for (const at::Tensor& p : group) {
        if (p.requires_grad()) inputs.push_back(p);
      }
    }
    const at::Tensor fused = scale == 1.0 ? at::cross_entropy_loss(out.y, target)
                                          : at::cross_entropy_loss(out.y, target) * scale;
    const std::vector<at::Tensor> grads =
        inputs.empty() ? std::vector<at::Tensor>{}
                       : torch::autograd::grad({fused}, inputs, {}, /*retain_graph=*/true,
                                               /*create_graph=*/false, /*allow_unused=*/true);
    std::vector<std::vector<at::Tensor>> result(branch_parameters_.size());
    std::size_t next = 0;
    for (std::size_t k = 0; k < branch_parameters_.size(); ++k) {
      for (const at::Tensor& p : branch_parameters_[k]) {
        if (!p.requires_grad()) {
          result[k].emplace_back();
          continue;
        }
        const at::Tensor& g = grads[next++];
        result[k].push_back(g.defined() ? g : at::zeros_like(p));
      }
    }
    return result;
  }

  std::vector<std::vector<at::Tensor>> branch_parameters_;  // θ_k, for the gradient hook
  // The step's detached heads, features and targets, for a gradient-modulating policy.
  std::vector<at::Tensor> heads_, features_;
  at::Tensor target_;
  // ∂CE(y)/∂θ_k of the step, for a policy that `NeedsFusedGradients` (after warm-up).
  std::vector<std::vector<at::Tensor>> fused_gradients_;
  // y with modalities masked, for a policy that `NeedsMaskedOutputs` (after warm-up).
  std::vector<at::Tensor> subset_outputs_;
  // Runs the network for those masked passes (only for such a policy).
  std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> masked_forward_;
};

}  // namespace mmbalance::detail
