#pragma once
/// \file
/// The re-initialization hook of balancing policies: at an epoch boundary a policy may move
/// branches back toward their initial parameters (re-learning methods), the optimizer's
/// state for those parameters reset.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/string_utils.h>
#include <torch/optim/optimizer.h>

namespace mmbalance {

/// A policy that re-initializes branches: at each `end_epoch` after warm-up,
/// `reinitialization(e)` (`e` epochs after warm-up done then, 0 at the end of warm-up)
/// returns one strength a_k in [0, 1] per branch, and the `Balancer` sets every parameter
/// of branch k to (1 - a_k)·θ + a_k·θ_init (θ_init: its value when the balancer was made)
/// and drops the optimizer's state for it (momentum, Adam's moments), where a_k > 0.
/// Such a policy needs `end_epoch(optimizer)`.
template <class P>
concept ReinitializesBranches = requires(P& p, std::int64_t e) {
  { p.reinitialization(e) } -> std::same_as<std::vector<double>>;
};

namespace detail {
/// Forgets the optimizer's state for parameter `p` (LibTorch 1.x keys it by the address
/// as text, 2.x by the address): its next step starts as the first.
template <class Optimizer>  // a template: only the branch of this LibTorch's key type is compiled
void reset_optimizer_state(Optimizer& optimizer, const at::Tensor& p) {
  auto& state = optimizer.state();
  using Key = typename std::remove_reference_t<decltype(state)>::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    state.erase(c10::guts::to_string(p.unsafeGetTensorImpl()));
  } else {
    state.erase(p.unsafeGetTensorImpl());
  }
}
}  // namespace detail

}  // namespace mmbalance
