#pragma once
/// \file
/// Running one c10d collective with an error that names the rank and the likely cause,
/// and agreeing on a seed across ranks.

#include <cstdint>
#include <exception>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include "mmbalance/detail/check.h"
#define MMBALANCE_COMPAT_C10D
#include "mmbalance/detail/libtorch_compat.h"

namespace mmbalance {

// CollectiveBackend (c10d::ProcessGroup on LibTorch 1.x, c10d::Backend on 2.x) comes
// from detail/libtorch_compat.h.

namespace detail {

/// Throws the error for a failed collective `what`: the rank, the cause, what to check.
[[noreturn]] inline void collective_failed(const CollectiveBackend& pg, const char* what,
                                           const std::exception& e) {
  C10_THROW_ERROR(Error, c10::str("rank ", pg.getRank(), " of ", pg.getSize(), ": ", what,
                                  " failed (", error_text(e),
                                  "). Another rank has probably died, stopped, or not "
                                  "reached the same step within the timeout."));
}

/// Starts the collective `launch()` returns and waits for it. Whatever fails (a peer that
/// closed its connections, a timeout) becomes a c10::Error naming the rank and `what`.
template <class Launch>
void run_collective(const CollectiveBackend& pg, const char* what, Launch&& launch) {
  try {
    launch()->wait();
  } catch (const std::exception& e) {
    collective_failed(pg, what, e);
  }
}

/// Where small tensors of bookkeeping collectives live: NCCL only moves CUDA tensors.
inline at::Device collective_device(const CollectiveBackend& pg) {
  return pg.getBackendName() == "nccl" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

}  // namespace detail

/// Rank 0's `seed`, returned on every rank: seeds a `RandomPolicy` or a data order so that
/// all ranks draw the same.
inline std::uint64_t agree_on_seed(const c10::intrusive_ptr<CollectiveBackend>& pg,
                                   std::uint64_t seed) {
  std::vector<at::Tensor> one{at::tensor({static_cast<std::int64_t>(seed)}, at::kLong)
                                  .to(detail::collective_device(*pg))};
  c10d::BroadcastOptions opts;
  opts.rootRank = 0;
  detail::run_collective(*pg, "broadcast of the seed", [&] { return pg->broadcast(one, opts); });
  return static_cast<std::uint64_t>(one[0].item<std::int64_t>());
}

}  // namespace mmbalance
