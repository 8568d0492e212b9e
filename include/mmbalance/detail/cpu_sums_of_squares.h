#pragma once
/// \file
/// Sums of squares of many CPU tensors in one pass: the learning-speed meter's CPU path.
/// LibTorch's CPU `_foreach_norm` runs one dispatched reduction per tensor, which for a
/// small model (about a hundred tensors) costs more than reading the numbers.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace mmbalance::detail {

/// Σ x² over `n` values: in T within blocks of 256 values (16 per lane, so float keeps
/// about 1e-6 relative accuracy), in double across blocks.
template <class T>
double sum_of_squares(const T* x, std::int64_t n) {
  // Independent lanes let the compiler vectorise without reassociating one sum.
  constexpr int kLanes = 16;
  constexpr std::int64_t kBlock = 256;
  double lanes[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    T block[kLanes] = {};
    for (std::int64_t j = 0; j < kBlock; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) block[k] += x[i + j + k] * x[i + j + k];
    }
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(block[k]);
  }
  double total = 0;
  for (; i < n; ++i) {
    const auto v = static_cast<double>(x[i]);
    total += v * v;
  }
  for (const double lane : lanes) total += lane;
  return total;
}

/// Whether `cpu_sums_of_squares` takes these tensors: on the CPU, contiguous, float or
/// double.
inline bool cpu_sums_of_squares_apply(const std::vector<at::Tensor>& tensors) {
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) {
    return t.device().is_cpu() && t.is_contiguous() &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  });
}

/// Σ x² of each tensor (a double tensor, one entry per tensor), on the calling thread.
/// One thread is what the pass gets inside a training step anyway: at::parallel_for is
/// inline and runs serially unless the including code is built with OpenMP, and for the
/// bench model waking other threads cost more than it saved.
inline at::Tensor cpu_sums_of_squares(const std::vector<at::Tensor>& tensors) {
  at::Tensor out = at::empty({static_cast<std::int64_t>(tensors.size())}, at::kDouble);
  double* sums = out.data_ptr<double>();
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    sums[t] = x.scalar_type() == at::kFloat ? sum_of_squares(x.data_ptr<float>(), x.numel())
                                            : sum_of_squares(x.data_ptr<double>(), x.numel());
  }
  return out;
}

}  // namespace mmbalance::detail
