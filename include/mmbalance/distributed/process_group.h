#pragma once
/// \file
/// Forming a c10d process group (Gloo, or NCCL where LibTorch has it) from a store
/// address, a rank and a world size, with bounded waits and errors that say what to check.

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

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
  /// the other machines reach this one at); empty: Gloo's default, this machine's
  /// hostname as the others resolve it.
  TORCH_ARG(std::string, hostname) = "127.0.0.1";
  TORCH_ARG(CommBackend, backend) = CommBackend::gloo;
  /// The launcher serves the TCP store (torchrun's agent: `TORCHELASTIC_USE_AGENT_STORE`),
  /// so every rank, rank 0 included, connects to it as a client.
  TORCH_ARG(bool, store_served_by_launcher) = false;
  /// This process's index among the ranks on its machine (`LOCAL_RANK`), the GPU it
  /// should use; -1 where the launcher does not say.
  TORCH_ARG(int, local_rank) = -1;
  /// The network interface Gloo binds to (e.g. "eth0"; `GLOO_SOCKET_IFNAME`); where set,
  /// it takes the place of `hostname`.
  TORCH_ARG(std::string, network_interface) = "";

 public:  // TORCH_ARG leaves the access private
  /// This process's variable `name` (nullptr: not set).
  static const char* process_environment(const char* name) { return std::getenv(name); }

  /// The run as its launcher describes it to this process, as PyTorch's `env://` reads it:
  /// torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`, or
  /// Slurm's `SLURM_PROCID`, `SLURM_NTASKS` and `SLURM_LOCALID` where torchrun's are not
  /// set (a Slurm script exports `MASTER_ADDR` and `MASTER_PORT` itself; see
  /// docs/distributed.md). Missing or malformed variables throw, naming each. `getenv`
  /// reads a variable (nullptr: not set).
  ///
  /// Example:
  /// ```
  /// auto options = ProcessGroupOptions::from_environment();   // under torchrun
  /// auto pg = make_process_group(options.timeout(std::chrono::seconds(60)));
  /// at::Device device(at::kCUDA, options.local_rank());
  /// ```
  static ProcessGroupOptions from_environment(
      const std::function<const char*(const char*)>& getenv = process_environment) {
    std::vector<std::string> missing;
    std::string malformed;
    // The first of `names` that is set, as a whole number (nullopt and noted if none is).
    const auto number = [&](std::initializer_list<const char*> names, bool required) -> std::optional<long> {
      for (const char* name : names) {
        const char* value = getenv(name);
        if (value == nullptr) continue;
        char* end = nullptr;
        errno = 0;
        const long n = std::strtol(value, &end, 10);
        if (*value == '\0' || *end != '\0' || errno != 0 || n < 0 || n > 65535 * 1024L) {
          malformed += std::string(malformed.empty() ? "" : ", ") + name + "='" + value + "'";
          return std::nullopt;
        }
        return n;
      }
      if (required) {
        std::string either;
        for (const char* name : names) either += std::string(either.empty() ? "" : " (or ") + name;
        missing.push_back(either + (names.size() > 1 ? ")" : ""));
      }
      return std::nullopt;
    };
    const auto rank = number({"RANK", "SLURM_PROCID"}, true);
    const auto world = number({"WORLD_SIZE", "SLURM_NTASKS"}, true);
    const auto local = number({"LOCAL_RANK", "SLURM_LOCALID"}, false);
    const auto port = number({"MASTER_PORT"}, true);
    const char* address = getenv("MASTER_ADDR");
    if (address == nullptr || *address == '\0') missing.emplace_back("MASTER_ADDR");
    std::string problems;
    for (const std::string& m : missing) problems += (problems.empty() ? "" : ", ") + m;
    TORCH_CHECK(missing.empty() && malformed.empty(), "ProcessGroupOptions::from_environment: ",
                missing.empty() ? "" : "not set: " + problems, missing.empty() || malformed.empty() ? "" : "; ",
                malformed.empty() ? "" : "not a whole number in range: " + malformed,
                ". Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), "
                "or under Slurm with srun and MASTER_ADDR and MASTER_PORT exported");
    TORCH_CHECK(*port >= 1 && *port <= 65535, "ProcessGroupOptions::from_environment: MASTER_PORT=", *port,
                " is not a port (1..65535)");
    const char* world_name = getenv("WORLD_SIZE") != nullptr ? "WORLD_SIZE" : "SLURM_NTASKS";
    const char* rank_name = getenv("RANK") != nullptr ? "RANK" : "SLURM_PROCID";
    TORCH_CHECK(*world >= 1, "ProcessGroupOptions::from_environment: ", world_name, "=", *world,
                " (the number of processes) must be at least 1");
    TORCH_CHECK(*rank < *world, "ProcessGroupOptions::from_environment: ", rank_name, "=", *rank,
                " is not below ", world_name, "=", *world);
    const std::string host = address;
    const bool loopback = host == "127.0.0.1" || host == "localhost" || host == "::1";
    // Several machines: Gloo binds to GLOO_SOCKET_IFNAME's interface where set (as in
    // PyTorch), else to this machine's address as its hostname resolves ("").
    const char* agent_store = getenv("TORCHELASTIC_USE_AGENT_STORE");
    return ProcessGroupOptions("tcp://" + host + ":" + std::to_string(*port), static_cast<int>(*rank),
                               static_cast<int>(*world))
        .hostname(loopback ? "127.0.0.1" : "")
        .network_interface(getenv("GLOO_SOCKET_IFNAME") != nullptr ? getenv("GLOO_SOCKET_IFNAME") : "")
        .store_served_by_launcher(agent_store != nullptr && std::string(agent_store) == "True")
        .local_rank(local ? static_cast<int>(*local) : -1);
  }

  /// Whether this process's environment describes a launched run, which
  /// `from_environment` reads (or names what it lacks): torchrun's `WORLD_SIZE`, or a
  /// Slurm job step of several tasks (srun: `SLURM_STEP_NUM_TASKS` > 1; a batch script
  /// itself, one task, is not one).
  static bool environment_describes_run(
      const std::function<const char*(const char*)>& getenv = process_environment) {
    if (getenv("WORLD_SIZE") != nullptr) return true;
    const char* tasks = getenv("SLURM_STEP_NUM_TASKS");
    return tasks != nullptr && std::strtol(tasks, nullptr, 10) > 1;
  }
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
    tcp.isServer = options.rank() == 0 && !options.store_served_by_launcher();
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
    gloo->devices.push_back(!options.network_interface().empty()
                                ? c10d::ProcessGroupGloo::createDeviceForInterface(options.network_interface())
                            : options.hostname().empty()
                                ? c10d::ProcessGroupGloo::createDefaultDevice()
                                : c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname()));
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
