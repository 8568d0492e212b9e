#pragma once
/// \file
/// Random balancing (App. A.3): after warm-up, each step is drawn uniformly from the
/// N + 1 plans (regular, hold branch 0, ..., hold branch N-1; for two branches {regular,
/// re-balance m0, re-balance m1}), from a seeded generator.

#include <cstddef>
#include <cstdint>
#include <random>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/detail/engine_state.h"

namespace mmbalance {

/// Options for `RandomPolicy`.
///
/// Example:
/// ```
/// RandomPolicy policy(RandomOptions().seed(7));
/// ```
struct RandomOptions {
  TORCH_ARG(std::uint64_t, seed) = 0;
};

class RandomPolicy {
 public:
  /// Its name and state format in checkpoints: version 1 was the two-branch policy's
  /// (no branch count), which `load(archive, 1)` still reads.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.random", 2};
  /// A copy is a snapshot to roll back to (it holds no tensor).
  static constexpr bool copy_is_snapshot = true;
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  explicit RandomPolicy(const RandomOptions& options = {})
      : options(options), engine_(options.seed()) {}

  /// The constructor of `NWayRandomPolicy`: the count is checked when a `Balancer` gives
  /// the network's.
  [[deprecated("construct RandomPolicy(options): the Balancer gives the branch count")]]
  RandomPolicy(std::size_t branches, const RandomOptions& options) : RandomPolicy(options) {
    set_branches(branches);
  }

  /// The network's branch count (the `Balancer` calls it): 2 or more, and the count the
  /// policy was made for if it was given one.
  void set_branches(std::size_t branches) { detail::take_branch_count(branches_, branches, "RandomPolicy"); }

  StepPlan next_plan() {
    TORCH_CHECK(branches_ != 0, "RandomPolicy: no branch count to draw among: a Balancer gives "
                "it (set_branches)");
    // mt19937_64's output sequence is fixed by the standard, so draws are the same on
    // every platform (std::uniform_int_distribution is not). The modulo bias is below 2^-60.
    const auto draw = static_cast<std::size_t>(engine_() % (branches_ + 1));
    return draw == 0 ? StepPlan::regular() : StepPlan::hold(draw - 1);
  }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("engine", detail::engine_state(engine_));
    archive.write("seed", static_cast<std::int64_t>(options.seed()));
    archive.write("branches", static_cast<std::int64_t>(branches_));
  }

  /// Restores the generator; another seed or branch count throws and changes nothing.
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue branches;
    TORCH_CHECK(archive.try_read("branches", branches) && branches.isInt(),
                "RandomPolicy: damaged state in checkpoint");
    TORCH_CHECK(branches.toInt() == static_cast<std::int64_t>(branches_), "RandomPolicy: the "
                "checkpoint was made for ", branches.toInt(), " branches, this policy balances ",
                branches_);
    restore(archive);
  }

  /// Reads the two-branch format of version 1 (the generator and seed).
  void load(torch::serialize::InputArchive& archive, std::int64_t version) {
    TORCH_CHECK(version == 1, "RandomPolicy: no format version ", version);
    TORCH_CHECK(branches_ == 2, "RandomPolicy: the checkpoint holds a two-branch state, this "
                "policy balances ", branches_, " branches");
    restore(archive);
  }

  RandomOptions options;

 private:
  // The generator, after checking the seed it was started from (a run resumes only with
  // the options it was started with, as GuidedPolicy's alpha and Q).
  void restore(torch::serialize::InputArchive& archive) {
    c10::IValue state, seed;
    TORCH_CHECK(archive.try_read("engine", state) && state.isString() &&
                    archive.try_read("seed", seed) && seed.isInt(),
                "RandomPolicy: damaged state in checkpoint");
    TORCH_CHECK(static_cast<std::uint64_t>(seed.toInt()) == options.seed(),
                "RandomPolicy: the checkpoint was made with seed ",
                static_cast<std::uint64_t>(seed.toInt()), ", this policy has seed ", options.seed());
    engine_ = detail::engine_from_state(state, "RandomPolicy");
  }

  std::size_t branches_ = 0;  // 0 until a Balancer gives the network's
  std::mt19937_64 engine_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<RandomPolicy> = true;

/// The N-branch name of `RandomPolicy`, which now draws among the plans of any number of
/// branches.
using NWayRandomPolicy [[deprecated("use RandomPolicy(options): it balances any number of branches")]] =
    RandomPolicy;

static_assert(BalancingPolicy<RandomPolicy> && TakesBranchCount<RandomPolicy> &&
              HasState<RandomPolicy> && HoldsFusionGates<RandomPolicy>);

}  // namespace mmbalance
