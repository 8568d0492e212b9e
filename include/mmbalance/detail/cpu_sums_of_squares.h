#pragma once
/// \file
/// Sums of squares of many CPU tensors in one parallel pass: the learning-speed meter's
/// CPU path. LibTorch's CPU `_foreach_norm` runs one dispatched reduction per tensor,
/// which for a small model (about a hundred tensors) costs more than reading the numbers.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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

/// Σ x² of each tensor (a double tensor, one entry per tensor). The work is cut into
/// fixed chunks that LibTorch's threads share and whose sums are added in a fixed order,
/// so the result does not depend on the number of threads.
inline at::Tensor cpu_sums_of_squares(const std::vector<at::Tensor>& tensors) {
  constexpr std::int64_t kChunk = std::int64_t{1} << 15;
  struct Chunk {
    std::size_t tensor;
    std::int64_t begin, size;
  };
  std::vector<Chunk> chunks;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const std::int64_t n = tensors[t].numel();
    for (std::int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(kChunk, n - b)});
  }
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<std::int64_t>(chunks.size()), 1, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[static_cast<std::size_t>(c)];
      const at::Tensor& x = tensors[chunk.tensor];
      partial[static_cast<std::size_t>(c)] =
          x.scalar_type() == at::kFloat
              ? sum_of_squares(x.data_ptr<float>() + chunk.begin, chunk.size)
              : sum_of_squares(x.data_ptr<double>() + chunk.begin, chunk.size);
    }
  });
  at::Tensor out = at::zeros({static_cast<std::int64_t>(tensors.size())}, at::kDouble);
  double* sums = out.data_ptr<double>();
  for (std::size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partial[c];
  return out;
}

}  // namespace mmbalance::detail
