#pragma once
/// \file
/// The masked-pass hook of balancing policies: a policy that measures what each modality
/// contributes by masking the others (AGM) receives the network's fused output with every
/// proper non-empty subset of modalities present.

#include <cstddef>
#include <functional>
#include <vector>

#include <ATen/ATen.h>

#include "mmbalance/balancing/gradient_modulation.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// A gradient-modulating policy that measures what each modality contributes by masking
/// the others (AGM) declares `static constexpr bool needs_masked_outputs = true`. Its loop
/// passes the step's inputs, `balancer.loss(out, target, {x0, x1})`, and after warm-up the
/// balancer runs the network on them once per proper non-empty subset of modalities (eval
/// mode, no gradient, the absent inputs zeroed: 2^N − 2 forward passes) and hands the
/// outputs to the hook as `StepGradients::subset_outputs`.
template <class P>
concept NeedsMaskedOutputs = ModulatesGradients<P> && requires { requires bool(P::needs_masked_outputs); };

namespace detail {

/// The network's fused output y with the modalities of every proper non-empty subset
/// present (bit mask s; the others' inputs zeroed), for a policy's masked passes: eval
/// mode (every submodule's own mode restored after), no gradient, a regular plan.
template <class Net>
std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> masked_forward(Net net) {
  return [net](const std::vector<at::Tensor>& x) mutable {
    EvalModeGuard<Net> eval(net);
    std::vector<at::Tensor> zeros;
    for (const at::Tensor& t : x) zeros.push_back(at::zeros_like(t));
    const std::size_t all = (std::size_t{1} << x.size()) - 1;
    std::vector<at::Tensor> v(all + 1);
    for (std::size_t s = 1; s < all; ++s) {
      std::vector<at::Tensor> masked;
      for (std::size_t k = 0; k < x.size(); ++k) masked.push_back(s >> k & 1 ? x[k] : zeros[k]);
      v[s] = net->forward(masked, StepPlan::regular()).y;
    }
    return v;
  };
}

}  // namespace detail
}  // namespace mmbalance
