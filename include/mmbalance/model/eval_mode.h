#pragma once
/// \file
/// A scope in eval mode without gradients, for evaluation passes over a model.

#include <ATen/core/grad_mode.h>

namespace mmbalance {

/// Puts `net` (a module handle) in eval mode without gradients for the scope and gives
/// it back its training mode afterwards, also when the scope is left by an exception:
/// ```
/// { EvalModeGuard eval(net); auto out = net->forward(x0, x1); ... }  // mode restored here
/// ```
template <class Net>
class EvalModeGuard {
 public:
  explicit EvalModeGuard(Net& net) : net_(net), was_training_(net->is_training()) { net_->eval(); }
  ~EvalModeGuard() { net_->train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  at::NoGradGuard no_grad_;
  Net& net_;
  bool was_training_;
};

}  // namespace mmbalance
