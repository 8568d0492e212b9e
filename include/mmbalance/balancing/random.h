#pragma once
/// \file
/// Random balancing (App. A.3): after warm-up, each step is drawn uniformly from
/// {regular, re-balance m0, re-balance m1}, from a seeded generator.

#include <cstdint>
#include <random>
#include <string>

#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy.h"
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
  /// Its name and state format in checkpoints.
  static constexpr PolicyIdentity checkpoint_identity{"mmbalance.random", 1};
  static constexpr bool holds_fusion_gates = true;  // its re-balancing steps

  explicit RandomPolicy(const RandomOptions& options = {})
      : options(options), engine_(options.seed()) {}

  StepKind next_step() {
    // mt19937_64's output sequence is fixed by the standard, so draws are the same on
    // every platform (std::uniform_int_distribution is not). The modulo bias is 2^-63.
    return static_cast<StepKind>(engine_() % kNumStepKinds);
  }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("engine", detail::engine_state(engine_));
    archive.write("seed", static_cast<std::int64_t>(options.seed()));
  }

  void load(torch::serialize::InputArchive& archive) {
    c10::IValue state, seed;
    archive.read("engine", state);
    archive.read("seed", seed);
    // A run resumes only with the options it was started with (as GuidedPolicy's alpha, Q).
    TORCH_CHECK(seed.isInt() && static_cast<std::uint64_t>(seed.toInt()) == options.seed(),
                "RandomPolicy: the checkpoint was made with seed ",
                seed.isInt() ? std::to_string(static_cast<std::uint64_t>(seed.toInt())) : "?",
                ", this policy has seed ", options.seed());
    engine_ = detail::engine_from_state(state, "RandomPolicy");
  }

  RandomOptions options;

 private:
  std::mt19937_64 engine_;
};
template <>
inline constexpr bool detail::kLibraryPolicy<RandomPolicy> = true;

static_assert(BalancingPolicy<RandomPolicy> && HasState<RandomPolicy> && HoldsFusionGates<RandomPolicy>);

}  // namespace mmbalance
