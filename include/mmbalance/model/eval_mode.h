#pragma once
/// \file
/// Scopes in eval mode (with gradients as they are, or without), for evaluation passes
/// over a model.

#include <memory>
#include <utility>
#include <vector>

#include <ATen/core/grad_mode.h>
#include <torch/nn/module.h>

namespace mmbalance {

/// Puts `net` (a module handle or pointer) in eval mode for the scope and gives every
/// submodule back its own training mode afterwards (a BatchNorm kept in eval mode inside a
/// training network stays so), also when the scope is left by an exception. Gradients are
/// left as they are; `EvalModeGuard` turns them off too.
template <class Net>
class EvalModeScope {
 public:
  explicit EvalModeScope(Net& net) : net_(net), was_training_(net->is_training()) {
    // Without the module itself, whose mode was_training_ keeps: modules(true) needs the
    // module to be owned by a shared_ptr, which a module's own `this` may not be.
    if constexpr (requires { net->modules(/*include_self=*/false); }) {
      for (const auto& m : net->modules(/*include_self=*/false)) modes_.emplace_back(m, m->is_training());
    }
    net_->eval();
  }
  ~EvalModeScope() {
    net_->train(was_training_);
    // modules() lists parents before their children, and train() sets a module's whole
    // subtree: each module ends with its own mode.
    for (const auto& [module, training] : modes_) module->train(training);
  }
  EvalModeScope(const EvalModeScope&) = delete;
  EvalModeScope& operator=(const EvalModeScope&) = delete;

 private:
  Net& net_;
  bool was_training_;
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> modes_;
};

/// `EvalModeScope` without gradients: the scope of an evaluation pass.
/// ```
/// { EvalModeGuard eval(net); auto out = net->forward(x0, x1); ... }  // modes restored here
/// ```
template <class Net>
class EvalModeGuard {
 public:
  explicit EvalModeGuard(Net& net) : eval_(net) {}

 private:
  at::NoGradGuard no_grad_;
  EvalModeScope<Net> eval_;
};

}  // namespace mmbalance
