#pragma once
/// \file
/// A policy's identity in checkpoints: a name it declares, kept when its C++ type is
/// renamed or moved, and the version of the format its `save` writes.

#include <array>
#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <torch/serialize/archive.h>

namespace mmbalance {

/// What a checkpoint calls a policy's state: `name`, stable across renames of the C++
/// type (the library's are "mmbalance.<policy>"; pick your own prefix), and `version`,
/// the format of what `save` writes (from 1; raise it when that format changes).
///
/// Example:
/// ```
/// struct MyPolicy {
///   static constexpr mmbalance::PolicyIdentity checkpoint_identity{"acme.my_policy", 1};
///   ...
/// };
/// ```
struct PolicyIdentity {
  std::string_view name;
  std::int64_t version = 1;
};

/// The policy declares `static constexpr PolicyIdentity checkpoint_identity` (required of
/// a policy with state, `HasState`).
template <class P>
concept DeclaresCheckpointIdentity = requires {
  { P::checkpoint_identity } -> std::convertible_to<PolicyIdentity>;
  typename std::integral_constant<std::int64_t, PolicyIdentity(P::checkpoint_identity).version>;
  typename std::integral_constant<std::size_t, PolicyIdentity(P::checkpoint_identity).name.size()>;
};

/// The policy reads states of earlier versions of its format:
/// `void load(torch::serialize::InputArchive&, std::int64_t version)` is called with the
/// saved version when it is below `checkpoint_identity.version` (otherwise `load(archive)`).
template <class P>
concept ReadsEarlierVersions = requires(P& p, torch::serialize::InputArchive& in, std::int64_t v) {
  { p.load(in, v) } -> std::same_as<void>;
};

namespace detail {

// The library's own policies (each header specializes this): only their state may be
// saved under a name beginning "mmbalance.".
template <class P>
inline constexpr bool kLibraryPolicy = false;

/// The policy's C++ type as the compiler spells it, for messages (and the identity of a
/// stateless policy that declares none).
template <class P>
std::string policy_type() {
  return c10::demangle(typeid(P).name());
}

/// The identity a `Balancer<P>` writes: the declared one, or for a stateless policy that
/// declares none its demangled type name (which depends on the compiler), version 0.
struct SavedPolicyIdentity {
  std::string name;
  std::int64_t version = 0;
};

template <class P>
SavedPolicyIdentity policy_identity() {
  if constexpr (DeclaresCheckpointIdentity<P>) {
    constexpr PolicyIdentity id = P::checkpoint_identity;
    return {std::string(id.name), id.version};
  } else {
    return {policy_type<P>(), 0};
  }
}

// Checkpoints written before policies declared an identity (mmbalance up to d5955f1)
// name the policy by its C++ type as g++ demangles it; these are the library's own.
inline constexpr std::array<std::pair<std::string_view, PolicyIdentity>, 9> kIdentitiesBeforeNames{{
    {"mmbalance::VanillaPolicy", {"mmbalance.vanilla", 1}},
    {"mmbalance::GuidedPolicy", {"mmbalance.guided", 1}},
    {"mmbalance::RandomPolicy", {"mmbalance.random", 1}},
    {"mmbalance::NWayGuidedPolicy", {"mmbalance.guided_n_way", 1}},
    {"mmbalance::NWayRandomPolicy", {"mmbalance.random_n_way", 1}},
    {"mmbalance::OGMGEPolicy", {"mmbalance.ogm_ge", 1}},
    {"mmbalance::AGMPolicy", {"mmbalance.agm", 1}},
    {"mmbalance::MMParetoPolicy", {"mmbalance.mmpareto", 1}},
    {"mmbalance::GradientBlendingPolicy", {"mmbalance.gradient_blending", 1}},
}};

// Library policies merged into another: the N-branch guided and random policies became
// GuidedPolicy and RandomPolicy, whose format version 2 is theirs.
inline constexpr std::array<std::pair<PolicyIdentity, PolicyIdentity>, 2> kMergedIdentities{{
    {{"mmbalance.guided_n_way", 1}, {"mmbalance.guided", 2}},
    {{"mmbalance.random_n_way", 1}, {"mmbalance.random", 2}},
}};

// `saved` under the name and version of the policy it was merged into, if it was.
inline SavedPolicyIdentity merged_identity(SavedPolicyIdentity saved) {
  for (const auto& [before, now] : kMergedIdentities) {
    if (saved.name == before.name && saved.version == before.version) return {std::string(now.name), now.version};
  }
  return saved;
}

/// The identity a balancer record was written with: `policy_name` and `policy_version`,
/// or, in a record from before those, `policy_type` (a C++ type name) as the library's
/// table above maps it; a type name the table does not know stays as it is, version 0
/// (a user's policy, which still loads where it is the same type as this one's). A
/// policy since merged into another reads as that one's (`kMergedIdentities`).
inline SavedPolicyIdentity read_policy_identity(torch::serialize::InputArchive& archive) {
  c10::IValue name, version;
  if (archive.try_read("policy_name", name)) {
    TORCH_CHECK(name.isString() && archive.try_read("policy_version", version) && version.isInt(),
                "Balancer::load: damaged policy name or version in the balancer's record");
    TORCH_CHECK(version.toInt() >= 0, "Balancer::load: negative policy format version ", version.toInt(),
                " in the balancer's record");
    return merged_identity({name.toStringRef(), version.toInt()});
  }
  c10::IValue type;
  TORCH_CHECK(archive.try_read("policy_type", type) && type.isString(),
              "Balancer::load: the balancer's record names no policy (no 'policy_name')");
  for (const auto& [type_name, id] : kIdentitiesBeforeNames) {
    if (type.toStringRef() == type_name) return merged_identity({std::string(id.name), id.version});
  }
  return {type.toStringRef(), 0};
}

/// Throws unless a record of `saved` can be loaded by policy `P`: the same name, or a
/// record from before names of `P`'s own type; and a version `P` reads.
template <class P>
void check_policy_identity(const SavedPolicyIdentity& saved) {
  const SavedPolicyIdentity mine = policy_identity<P>();
  const std::string type = policy_type<P>();
  // Version 0: a record naming the policy by its C++ type (from before identities, or of a
  // stateless policy that declares none).
  const bool same_type_before_names = saved.version == 0 && saved.name == type;
  TORCH_CHECK(saved.name == mine.name || same_type_before_names,
              "Balancer::load: the checkpoint was made with policy '", saved.name,
              "', this balancer's policy is '", mine.name, "' (", type, ")");
  if (same_type_before_names) return;
  TORCH_CHECK(saved.version >= 1 || mine.version == 0, "Balancer::load: the checkpoint holds ", saved.name,
              " state of format version 0, which no declared identity has");
  TORCH_CHECK(saved.version <= mine.version, "Balancer::load: the checkpoint holds ", saved.name,
              " state of format version ", saved.version, ", newer than this policy's (",
              mine.version, "): it was written by a newer mmbalance");
  TORCH_CHECK(saved.version == mine.version || ReadsEarlierVersions<P>,
              "Balancer::load: the checkpoint holds ", saved.name, " state of format version ",
              saved.version, "; this policy reads version ", mine.version, " only");
}

}  // namespace detail
}  // namespace mmbalance
