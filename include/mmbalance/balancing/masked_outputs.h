#pragma once
/// \file
/// The masked-pass hook of balancing policies: a policy that measures what each modality
/// contributes by masking the others (AGM) receives the network's fused output with every
/// proper non-empty subset of modalities present.

#include <algorithm>
#include <cstddef>
#include <cstdint>
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
/// balancer runs the network on them with every proper non-empty subset of modalities
/// present (eval mode, no gradient, the absent inputs zeroed: 2^N − 2 masked copies of the
/// batch, stacked along the rows into passes of up to
/// `BalancerOptions::masked_rows_per_pass` rows) and hands the outputs to the hook as
/// `StepGradients::subset_outputs`.
template <class P>
concept NeedsMaskedOutputs = ModulatesGradients<P> && requires { requires bool(P::needs_masked_outputs); };

namespace detail {

/// The network's fused output y with the modalities of every proper non-empty subset
/// present (bit mask s; the others' inputs zeroed), for a policy's masked passes: eval
/// mode (every submodule's own mode restored after), no gradient, a regular plan. The
/// copies are stacked along the rows (rows of one copy never meet another's in eval mode,
/// in the library's modules), up to `rows_per_pass` rows a pass (at least one copy).
template <class Net>
std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> masked_forward(Net net,
                                                                                     std::int64_t rows_per_pass) {
  return [net, rows_per_pass](const std::vector<at::Tensor>& x) mutable {
    EvalModeGuard<Net> eval(net);
    std::vector<at::Tensor> zeros;
    for (const at::Tensor& t : x) zeros.push_back(at::zeros_like(t));
    const std::size_t all = (std::size_t{1} << x.size()) - 1;
    const std::int64_t rows = x.front().size(0);
    const auto per_pass = static_cast<std::size_t>(std::max<std::int64_t>(1, rows_per_pass / std::max<std::int64_t>(rows, 1)));
    std::vector<at::Tensor> v(all + 1);
    for (std::size_t first = 1; first < all; first += per_pass) {
      const std::size_t last = std::min(all, first + per_pass);  // subsets first..last-1
      std::vector<at::Tensor> stacked;
      for (std::size_t k = 0; k < x.size(); ++k) {
        std::vector<at::Tensor> copies;
        for (std::size_t s = first; s < last; ++s) copies.push_back(s >> k & 1 ? x[k] : zeros[k]);
        stacked.push_back(copies.size() == 1 ? copies.front() : at::cat(copies));
      }
      const at::Tensor y = net->forward(stacked, StepPlan::regular()).y;
      for (std::size_t s = first; s < last; ++s) {
        v[s] = y.narrow(0, static_cast<std::int64_t>(s - first) * rows, rows);
      }
    }
    return v;
  };
}

}  // namespace detail
}  // namespace mmbalance
