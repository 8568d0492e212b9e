#pragma once
/// \file
/// The re-initialization hook of balancing policies: at an epoch boundary a policy may move
/// branches back toward their initial parameters (re-learning methods), the optimizer's
/// state for those parameters reset.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/detail/check.h"

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
    std::ostringstream key;  // as 1.x writes it (c10::guts::to_string of the address)
    key << p.unsafeGetTensorImpl();
    state.erase(key.str());
  } else {
    state.erase(p.unsafeGetTensorImpl());
  }
}

/// The branches' parameters as the `Balancer` found them, and the move toward them.
class InitialParameters {
 public:
  explicit InitialParameters(const std::vector<std::vector<at::Tensor>>& branches) {
    for (const auto& group : branches) {
      values_.emplace_back();
      for (const at::Tensor& p : group) values_.back().push_back(p.detach().clone());
    }
  }

  /// Refuses strengths that are not one per branch in [0, 1], naming `policy`.
  void check(const std::vector<double>& strengths, const std::string& policy) const {
    TORCH_CHECK(strengths.size() == values_.size(), "Balancer::end_epoch: ", policy, " gives ",
                strengths.size(), " re-initialization strengths for ", values_.size(), " branches");
    for (std::size_t k = 0; k < strengths.size(); ++k) {
      TORCH_CHECK(strengths[k] >= 0 && strengths[k] <= 1, "Balancer::end_epoch: ", policy,
                  " re-initializes branch ", k, " with strength ", strengths[k], "; strengths are in [0, 1]");
    }
  }

  /// θ ← (1 - a_k)·θ + a_k·θ_init for every parameter of branch k with a_k > 0, its
  /// optimizer state dropped.
  template <class Optimizer>
  void apply(const std::vector<double>& strengths, const std::vector<std::vector<at::Tensor>>& branches,
             Optimizer& optimizer) const {
    const at::NoGradGuard no_grad;
    for (std::size_t k = 0; k < strengths.size(); ++k) {
      if (strengths[k] == 0) continue;
      for (std::size_t i = 0; i < branches[k].size(); ++i) {
        at::Tensor p = branches[k][i];
        p.mul_(1.0 - strengths[k]).add_(values_[k][i], strengths[k]);
        reset_optimizer_state(optimizer, p);
      }
    }
  }

  void save(torch::serialize::OutputArchive& archive) const {
    torch::serialize::OutputArchive nested;
    for (std::size_t k = 0; k < values_.size(); ++k) {
      for (std::size_t i = 0; i < values_[k].size(); ++i) nested.write(key(k, i), values_[k][i].to(at::kCPU));
    }
    archive.write("initial_branch_parameters", nested);
  }

  /// The values a record holds, checked against these (shapes, dtypes), for assignment.
  InitialParameters read(torch::serialize::InputArchive& archive) const {
    torch::serialize::InputArchive nested;
    TORCH_CHECK(archive.try_read("initial_branch_parameters", nested),
                "Balancer::load: no initial branch parameters (the policy re-initializes branches)");
    InitialParameters read = *this;
    for (std::size_t k = 0; k < values_.size(); ++k) {
      for (std::size_t i = 0; i < values_[k].size(); ++i) {
        const at::Tensor& mine = values_[k][i];
        at::Tensor t;
        TORCH_CHECK(nested.try_read(key(k, i), t) && t.sizes() == mine.sizes() &&
                        t.scalar_type() == mine.scalar_type(),
                    "Balancer::load: initial parameter ", i, " of branch ", k, " is missing or is not ",
                    shape_string(mine), " ", mine.scalar_type());
        read.values_[k][i] = t.to(mine.device());
      }
    }
    return read;
  }

 private:
  // Appended, not "b" + std::string: g++ 12 at -O2 warns falsely (-Wrestrict) on that form.
  static std::string key(std::size_t branch, std::size_t parameter) {
    std::string k = "b";
    k.append(std::to_string(branch)).append("_p").append(std::to_string(parameter));
    return k;
  }

  std::vector<std::vector<at::Tensor>> values_;
};

}  // namespace detail

}  // namespace mmbalance
