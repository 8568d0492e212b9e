#pragma once
/// \file
/// The `Balancer`'s epoch boundary: what the policy takes from the ending epoch (every
/// head's losses, or its re-initialization of branches) and its `start_epoch` hook for the
/// next one, decided as one before the clock moves; and the initial parameters a
/// re-initializing policy moves branches toward.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/epoch_clock.h"
#include "mmbalance/balancing/epoch_losses.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy_transaction.h"
#include "mmbalance/balancing/reinitialization.h"

namespace mmbalance::detail {

template <class Policy>
class EpochBoundary {
 public:
  /// `branches`: the branches' parameters, whose values now a re-initializing policy's
  /// strengths move them back toward.
  explicit EpochBoundary(const std::vector<std::vector<at::Tensor>>& branches) {
    if constexpr (ReinitializesBranches<Policy>) initial_.emplace(branches);
  }

  /// Refuses the end of the epoch in a form that cannot serve the policy there: measuring
  /// without the data, or re-initializing without the optimizer.
  void check_form(const EpochClock& clock, const PolicyTransaction<Policy>& policy, bool with_data,
                  bool with_optimizer) const {
    if constexpr (ReinitializesBranches<Policy>) {
      TORCH_CHECK(with_optimizer || clock.epochs_done_after_warmup() < 0, "Balancer::end_epoch: ", policy_type<Policy>(),
                  " may re-initialize branches at this boundary, which resets their optimizer "
                  "state: call end_epoch(optimizer)");
    }
    TORCH_CHECK(with_data || !measures(clock, policy), "Balancer::end_epoch: ", policy_type<Policy>(), " measures every "
                "head's loss at the end of this epoch: call end_epoch(net, train_sample, held_out)");
  }

  /// Whether the policy measures every head's losses at the end of the current epoch.
  bool measures(const EpochClock& clock, const PolicyTransaction<Policy>& policy) const {
    const std::int64_t done = clock.epochs_done_after_warmup();
    if constexpr (ObservesEpochLosses<Policy>) return done >= 0 && policy.policy().wants_epoch_losses(done);
    return false;
  }

  /// Ends the epoch; where the policy measures, with every head's losses on the data.
  template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
  void end(EpochClock& clock, PolicyTransaction<Policy>& policy, Net& net, TrainSample&& train_sample,
           HeldOut&& held_out, SumAcrossRanks& sum_across_ranks) const {
    if constexpr (ObservesEpochLosses<Policy>) {
      if (measures(clock, policy)) {
        const EpochLosses losses = measure_epoch_losses(net, train_sample, held_out, sum_across_ranks,
                                                        clock.epochs_done_after_warmup());
        return advance(clock, policy, [&] { policy.policy().observe_epoch_losses(losses); });
      }
    }
    advance(clock, policy);
  }

  /// Ends the epoch of a re-initializing policy: after warm-up, the strengths it gives
  /// (checked) move `branches` toward their initial values, `optimizer`'s state for them dropped.
  void end(EpochClock& clock, PolicyTransaction<Policy>& policy, const std::vector<std::vector<at::Tensor>>& branches,
           torch::optim::Optimizer& optimizer) const {
    const std::int64_t done = clock.epochs_done_after_warmup();
    std::vector<double> strengths;
    advance(clock, policy, [&] {
      if (done < 0) return;
      strengths = policy.policy().reinitialization(done);
      initial_->check(strengths, policy_type<Policy>());
    });
    initial_->apply(strengths, branches, optimizer);
  }

  /// Moves to the next epoch. What the policy takes from the ending epoch (`take`) and its
  /// start_epoch hook for the next one, if after warm-up, are one decision made before the
  /// clock moves: if either throws, nothing has changed.
  template <class Take = void (*)()>
  static void advance(EpochClock& clock, PolicyTransaction<Policy>& policy, Take&& take = [] {}) {
    policy.decide([&] {
      take();
      if constexpr (HasEpochHook<Policy>) {
        const std::int64_t next = clock.epochs_done_after_warmup();  // the next epoch's, after warm-up
        if (next >= 0) policy.policy().start_epoch(next);
      }
    });
    clock.next_epoch();
  }

  void save(torch::serialize::OutputArchive& archive) const {
    if constexpr (ReinitializesBranches<Policy>) initial_->save(archive);
  }
  /// The initial parameters a record holds, checked, for `commit`.
  std::optional<InitialParameters> read(torch::serialize::InputArchive& archive) const {
    if constexpr (ReinitializesBranches<Policy>) return initial_->read(archive);
    return std::nullopt;
  }
  void commit(std::optional<InitialParameters> initial) { initial_ = std::move(initial); }

 private:
  std::optional<InitialParameters> initial_;  // a re-initializing policy's
};

}  // namespace mmbalance::detail
