// What differs between the LibTorch versions mmbalance is tested with (1.13; 2.13 CPU;
// 2.14 CUDA), in one place, keyed on TORCH_VERSION_MAJOR/MINOR. Everything else in
// mmbalance is written once for all of them.
//
// Two sections with their own guards: the core one, and the c10d one that only
// mmbalance/distributed needs (it defines MMBALANCE_COMPAT_C10D before including this).

#ifndef MMBALANCE_DETAIL_LIBTORCH_COMPAT_CORE
#define MMBALANCE_DETAIL_LIBTORCH_COMPAT_CORE

#include <torch/version.h>

/// True when the LibTorch compiled against is at least `major.minor`.
#define MMBALANCE_LIBTORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||               \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

#endif  // MMBALANCE_DETAIL_LIBTORCH_COMPAT_CORE

#if defined(MMBALANCE_COMPAT_C10D) && !defined(MMBALANCE_DETAIL_LIBTORCH_COMPAT_C10D)
#define MMBALANCE_DETAIL_LIBTORCH_COMPAT_C10D

#if MMBALANCE_LIBTORCH_AT_LEAST(2, 0)
#include <torch/csrc/distributed/c10d/Backend.hpp>
#else
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#endif

namespace mmbalance {

/// What carries mmbalance's collectives. LibTorch 1.x: a `c10d::ProcessGroup` (Gloo and
/// NCCL are process groups). LibTorch 2.x split process groups from their backends: Gloo
/// and NCCL became `c10d::Backend`s, and a `c10d::ProcessGroup` you already hold hands out
/// the one for your tensors' device with `pg->getBackend(c10::DeviceType::CPU)` (or `CUDA`).
/// Both have the calls used here (`allreduce`, `broadcast`, `barrier`, `getRank`, ...).
#if MMBALANCE_LIBTORCH_AT_LEAST(2, 0)
using CollectiveBackend = c10d::Backend;
#else
using CollectiveBackend = c10d::ProcessGroup;
#endif

}  // namespace mmbalance

#endif  // MMBALANCE_COMPAT_C10D
