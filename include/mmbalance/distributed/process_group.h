#pragma once
/// \file
/// Forming a c10d process group (Gloo, or NCCL where LibTorch has it) from a store
/// address, a rank and a world size, with bounded waits and errors that say what to check.

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>

#include <c10/util/intrusive_ptr.h>
#include <torch/arg.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "mmbalance/detail/check.h"
#include "mmbalance/distributed/collective.h"

namespace mmbalance {

/// The c10d backend that carries the collectives.
enum class CommBackend : std::uint8_t {
  /// CPU (and CUDA through host copies); every LibTorch with c10d has it.
  gloo,
  /// CUDA tensors, GPU to GPU; needs a LibTorch built with NCCL (`USE_C10D_NCCL`).
  nccl,
};

/// Where and how the ranks of one run meet.
///
/// Example:
/// ```
/// auto pg = make_process_group(
///     ProcessGroupOptions("tcp://127.0.0.1:29500", rank, 2).timeout(std::chrono::seconds(30)));
/// ```
struct ProcessGroupOptions {
  ProcessGroupOptions(std::string store, int rank, int world_size)
      : store_(std::move(store)), rank_(rank), world_size_(world_size) {}
  /// `file:///path/to/file` (a FileStore: every rank must see the file; use a fresh path
  /// per run) or `tcp://host:port` (a TCPStore served by rank 0 at host:port).
  TORCH_ARG(std::string, store);
  /// This process's rank, 0 <= rank < world_size.
  TORCH_ARG(int, rank);
  /// Number of processes.
  TORCH_ARG(int, world_size);
  /// Longest wait for the other ranks: rendezvous and every collective. A rank that dies
  /// or never comes makes the others fail after at most this long.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(60);
  /// Address Gloo's connections bind to on this machine (several machines: the address
  /// the other machines reach this one at).
  TORCH_ARG(std::string, hostname) = "127.0.0.1";
  TORCH_ARG(CommBackend, backend) = CommBackend::gloo;
};

namespace detail {

/// The c10d store `options.store()` names. A TCPStore is served by rank 0, which waits
/// for all ranks to connect.
inline c10::intrusive_ptr<c10d::Store> make_store(const ProcessGroupOptions& options) {
  const std::string& spec = options.store();
  const std::string file_prefix = "file://", tcp_prefix = "tcp://";
  c10::intrusive_ptr<c10d::Store> store;
  if (spec.rfind(file_prefix, 0) == 0) {
    const std::string path = spec.substr(file_prefix.size());
    TORCH_CHECK(!path.empty(), "store '", spec, "': no file path after file://");
    store = c10::make_intrusive<c10d::FileStore>(path, options.world_size());
  } else if (spec.rfind(tcp_prefix, 0) == 0) {
    const std::string address = spec.substr(tcp_prefix.size());
    const auto colon = address.rfind(':');
    TORCH_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < address.size(), "store '",
                spec, "': expected tcp://host:port");
    int port = -1;
    try {
      std::size_t used = 0;
      port = std::stoi(address.substr(colon + 1), &used);
      if (used != address.size() - colon - 1) port = -1;
    } catch (const std::exception&) {
    }
    TORCH_CHECK(port > 0 && port < 65536, "store '", spec, "': port must be 1..65535");
    c10d::TCPStoreOptions tcp;
    tcp.port = static_cast<std::uint16_t>(port);
    tcp.isServer = options.rank() == 0;
    tcp.numWorkers = static_cast<std::size_t>(options.world_size());
    tcp.waitWorkers = true;
    tcp.timeout = options.timeout();
    store = c10::make_intrusive<c10d::TCPStore>(address.substr(0, colon), tcp);
  } else {
    TORCH_CHECK(false, "store '", spec, "': expected file:///path or tcp://host:port");
  }
  store->setTimeout(options.timeout());
  return store;
}

}  // namespace detail

/// Joins the process group described by `options`; returns when all `world_size` ranks
/// have joined. Throws, within about `timeout`, if they do not.
inline c10::intrusive_ptr<CollectiveBackend> make_process_group(const ProcessGroupOptions& options) {
  TORCH_CHECK(options.world_size() >= 1, "make_process_group: world_size must be >= 1, got ",
              options.world_size());
  TORCH_CHECK(options.rank() >= 0 && options.rank() < options.world_size(),
              "make_process_group: rank must be in [0, ", options.world_size(), "), got ",
              options.rank());
  TORCH_CHECK(options.timeout().count() > 0, "make_process_group: timeout must be positive");
  try {
    auto store = detail::make_store(options);
    if (options.backend() == CommBackend::nccl) {
#ifdef USE_C10D_NCCL
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = options.timeout();
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, options.rank(),
                                                         options.world_size(), nccl);
#else
      TORCH_CHECK(false, "this LibTorch was built without NCCL; use CommBackend::gloo");
#endif
    }
    auto gloo = c10d::ProcessGroupGloo::Options::create(options.timeout());
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname()));
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, options.rank(),
                                                       options.world_size(), gloo);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "rank ", options.rank(), " of ", options.world_size(),
                ": could not form the process group through store '", options.store(),
                "' within ", options.timeout().count(), " ms (", detail::error_text(e),
                "). Check that every rank started with the same store and world size and a "
                "distinct rank, and that a file store's path was fresh.");
  }
}

}  // namespace mmbalance
