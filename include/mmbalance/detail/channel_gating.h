#pragma once
/// \file
/// Tensor helpers shared by the MMTM modules: squeezing, per-channel gating and the held
/// or averaged rows of re-balancing steps and the utilization probe.

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace mmbalance::detail {

/// (batch, channels, ...) -> (batch, channels): the mean over the spatial dimensions.
inline at::Tensor squeeze_spatial(const at::Tensor& x) {
  return x.dim() == 2 ? x : x.flatten(2).mean(-1);
}

/// `average` (double, one value a channel) in x's dtype for every row of x's batch past
/// `live_rows`; the leading rows are taken from `live` (the probe's stacked live half).
inline at::Tensor average_rows(const at::Tensor& live, const at::Tensor& average,
                               const at::Tensor& x, std::int64_t live_rows) {
  const std::int64_t n = x.size(0);
  const at::Tensor cut = average.to(x.scalar_type()).unsqueeze(0).expand({n - live_rows, -1});
  return live_rows == 0 ? cut : at::cat({live.narrow(0, 0, live_rows), cut}, 0);
}

/// (batch, channels) -> (batch, channels, 1, ...), to scale x's channels.
inline at::Tensor broadcastable(const at::Tensor& gate, const at::Tensor& x) {
  std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
  shape[0] = gate.size(0);
  shape[1] = gate.size(1);
  return gate.view(shape);
}

}  // namespace mmbalance::detail
