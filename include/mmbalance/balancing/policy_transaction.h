#pragma once
/// \file
/// The balancer's policy and the state it goes back to when a step or an epoch's end is
/// given up (`detail::PolicyTransaction`), and how that state is kept: by default the
/// policy's own checkpoint record, which holds its tensors' values, so a policy that
/// updates a state tensor in place rolls back too; a C++ copy where the policy declares
/// that a copy shares nothing it changes (`CopyIsSnapshot`).

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/detail/check.h"

namespace mmbalance {

/// The policy declares `static constexpr bool copy_is_snapshot = true`: a C++ copy of it
/// shares no tensor that any of its hooks changes in place (it assigns new tensors), so
/// the balancer keeps a copy from before each step instead of its checkpoint record (no
/// serialization per step; on a GPU, no copy of its tensors to the host). The library's
/// policies declare it; a policy that declares it and then updates a tensor in place is
/// not rolled back correctly.
template <class P>
concept CopyIsSnapshot = requires { requires bool(P::copy_is_snapshot); };

namespace detail {

template <class Policy>
class PolicyTransaction {
 public:
  explicit PolicyTransaction(Policy policy) : policy_(std::move(policy)), before_(policy_) {}

  Policy& policy() { return policy_; }
  const Policy& policy() const { return policy_; }

  /// Keeps the policy's state as it is now, the state `roll_back` returns to.
  void keep() {
    before_ = policy_;
    if constexpr (kKeepsRecord) record_ = record();
  }

  /// The policy as `keep` found it: its C++ copy, then (unless `CopyIsSnapshot`) its
  /// record, which puts back what a hook changed in place in a tensor the copy shares.
  void roll_back() {
    policy_ = before_;
    if constexpr (kKeepsRecord) restore(record_);
  }

  /// `decide()` (hook calls on the policy) after `keep`; if it throws, `roll_back`.
  template <class Decide>
  auto decide(Decide&& decide) {
    keep();
    try {
      return decide();
    } catch (...) {
      roll_back();
      throw;
    }
  }

  /// The policy's entries of the balancer's record: its identity and its own state.
  void save(torch::serialize::OutputArchive& archive) const {
    const SavedPolicyIdentity identity = policy_identity<Policy>();
    archive.write("policy_name", identity.name);
    archive.write("policy_version", identity.version);
    if constexpr (HasState<Policy>) {
      torch::serialize::OutputArchive nested;
      policy_.save(nested);
      archive.write("policy", nested);
    }
  }

  /// Loads the policy's state from a balancer's record whose identity `saved` was checked
  /// (through the policy's `load(archive, version)` for an earlier format), then runs
  /// `then` (the caller's other reads and its commit). If either throws, the policy is as
  /// it was (its copy, then its record: `load` may change tensors in place) and the state
  /// kept for `roll_back` is untouched.
  template <class Then>
  void load(torch::serialize::InputArchive& archive, const SavedPolicyIdentity& saved, Then&& then) {
    if constexpr (!HasState<Policy>) {
      then();
    } else {
      torch::serialize::InputArchive nested;
      TORCH_CHECK(archive.try_read("policy", nested), "Balancer::load: no policy state");
      const Policy copy = policy_;
      const std::string before = record();
      try {
        try {
          load_version(nested, saved.version);
        } catch (const std::exception& e) {  // LibTorch's archive throws its own types too
          TORCH_CHECK(false, "Balancer::load: the policy's state does not load: ", error_text(e));
        }
        then();
      } catch (...) {
        policy_ = copy;
        restore(before);
        throw;
      }
    }
  }

 private:
  std::string record() const {
    std::string bytes;
    torch::serialize::OutputArchive out;
    policy_.save(out);
    out.save_to([&bytes](const void* data, std::size_t size) {
      bytes.append(static_cast<const char*>(data), size);
      return size;
    });
    return bytes;
  }

  void restore(const std::string& bytes) {
    torch::serialize::InputArchive in;
    in.load_from(bytes.data(), bytes.size());
    policy_.load(in);
  }

  void load_version(torch::serialize::InputArchive& nested, std::int64_t version) {
    if constexpr (ReadsEarlierVersions<Policy>) {
      if (version != 0 && version < policy_identity<Policy>().version) return policy_.load(nested, version);
    }
    policy_.load(nested);
  }

  static constexpr bool kKeepsRecord = HasState<Policy> && !CopyIsSnapshot<Policy>;

  Policy policy_;
  Policy before_;
  std::string record_;  // the policy's record at `keep` (unless CopyIsSnapshot)
};

}  // namespace detail
}  // namespace mmbalance
