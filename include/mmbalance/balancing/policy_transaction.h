#pragma once
/// \file
/// The balancer's policy and the state it goes back to when a step or an epoch's end is
/// given up (`detail::PolicyTransaction`), and how that state is kept: by default the
/// policy's own checkpoint record, which holds its tensors' values, so a policy that
/// updates a state tensor in place rolls back too; a C++ copy where the policy declares
/// that a copy shares nothing it changes (`CopyIsSnapshot`).

#include <cstddef>
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
    if constexpr (kKeepsRecord) {
      record_.clear();
      torch::serialize::OutputArchive out;
      policy_.save(out);
      out.save_to([this](const void* data, std::size_t size) {
        record_.append(static_cast<const char*>(data), size);
        return size;
      });
    }
  }

  /// The policy as `keep` found it: its C++ copy, then (unless `CopyIsSnapshot`) its
  /// record, which puts back what a hook changed in place in a tensor the copy shares.
  void roll_back() {
    policy_ = before_;
    if constexpr (kKeepsRecord) {
      torch::serialize::InputArchive in;
      in.load_from(record_.data(), record_.size());
      policy_.load(in);
    }
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

  /// Loads the policy's state of a record whose identity `saved` was checked, through the
  /// policy's `load(archive, version)` for an earlier format; if that throws, the policy
  /// is rolled back and the error says the policy's state does not load.
  void load(torch::serialize::InputArchive& archive, const SavedPolicyIdentity& saved) {
    if constexpr (HasState<Policy>) {
      torch::serialize::InputArchive nested;
      TORCH_CHECK(archive.try_read("policy", nested), "Balancer::load: no policy state");
      try {
        decide([&] {
          if constexpr (ReadsEarlierVersions<Policy>) {
            if (saved.version != 0 && saved.version < policy_identity<Policy>().version) {
              return policy_.load(nested, saved.version);
            }
          }
          policy_.load(nested);
        });
      } catch (const std::exception& e) {  // LibTorch's archive throws its own types too
        TORCH_CHECK(false, "Balancer::load: the policy's state does not load: ", error_text(e));
      }
    }
  }

 private:
  static constexpr bool kKeepsRecord = HasState<Policy> && !CopyIsSnapshot<Policy>;

  Policy policy_;
  Policy before_;
  std::string record_;  // the policy's record at `keep` (unless CopyIsSnapshot)
};

}  // namespace detail
}  // namespace mmbalance
