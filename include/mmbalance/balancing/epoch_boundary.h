#pragma once
/// \file
/// The `Balancer`'s epoch boundary: what the policy takes from the ending epoch (every
/// head's losses or every branch's features on data, then its re-initialization of
/// branches) and its `start_epoch` hook for the next one, decided as one before the clock
/// moves; and the initial parameters a re-initializing policy moves branches toward.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/balancing/epoch_clock.h"
#include "mmbalance/balancing/epoch_features.h"
#include "mmbalance/balancing/epoch_losses.h"
#include "mmbalance/balancing/policy.h"
#include "mmbalance/balancing/policy_identity.h"
#include "mmbalance/balancing/policy_transaction.h"
#include "mmbalance/balancing/reinitialization.h"

namespace mmbalance::detail {

template <class Policy>
class EpochBoundary {
 public:
  /// `branches`: the branches' parameters, whose values now are where a re-initializing
  /// policy's strengths move them back toward.
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
                  "state: call end_epoch(", measures_ever() ? "net, train_sample, held_out, " : "", "optimizer)");
    }
    TORCH_CHECK(with_data || !measures(clock, policy), "Balancer::end_epoch: ", policy_type<Policy>(), " measures ",
                ObservesEpochLosses<Policy> ? "every head's loss" : "every branch's features", " at the end of this "
                "epoch: call end_epoch(net, train_sample, held_out", ReinitializesBranches<Policy> ? ", optimizer" : "", ")");
  }

  /// Whether the policy measures on data at the end of the current epoch.
  bool measures(const EpochClock& clock, const PolicyTransaction<Policy>& policy) const {
    return wants_losses(clock, policy) || wants_features(clock, policy);
  }

  /// Ends the epoch; where the policy measures, on the data (see `measure`).
  template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
  void end(EpochClock& clock, PolicyTransaction<Policy>& policy, Net& net, TrainSample&& train_sample,
           HeldOut&& held_out, SumAcrossRanks& sum_across_ranks) const {
    const Measurements m = measure(clock, policy, net, train_sample, held_out, sum_across_ranks);
    advance(clock, policy, [&] { m.hand_over(policy.policy()); });
  }

  /// Ends the epoch of a re-initializing policy, where it measures on the data first:
  /// after warm-up, the strengths it gives (checked) move `branches` toward their initial
  /// values, `optimizer`'s state for them dropped.
  template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
  void end(EpochClock& clock, PolicyTransaction<Policy>& policy, Net& net, TrainSample&& train_sample,
           HeldOut&& held_out, SumAcrossRanks& sum_across_ranks, const std::vector<std::vector<at::Tensor>>& branches,
           torch::optim::Optimizer& optimizer) const {
    const Measurements m = measure(clock, policy, net, train_sample, held_out, sum_across_ranks);
    reinitialize(clock, policy, m, branches, optimizer);
  }
  void end(EpochClock& clock, PolicyTransaction<Policy>& policy, const std::vector<std::vector<at::Tensor>>& branches,
           torch::optim::Optimizer& optimizer) const {
    reinitialize(clock, policy, Measurements{}, branches, optimizer);
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
  // What the policy takes from the data at one boundary, measured before it decides.
  struct Measurements {
    std::optional<EpochLosses> losses;
    std::optional<EpochFeatures> features;
    void hand_over(Policy& p) const {
      if constexpr (ObservesEpochLosses<Policy>) {
        if (losses) p.observe_epoch_losses(*losses);
      }
      if constexpr (ObservesEpochFeatures<Policy>) {
        if (features) p.observe_epoch_features(*features);
      }
    }
  };

  static constexpr bool measures_ever() { return ObservesEpochLosses<Policy> || ObservesEpochFeatures<Policy>; }
  bool wants_losses(const EpochClock& clock, const PolicyTransaction<Policy>& policy) const {
    const std::int64_t done = clock.epochs_done_after_warmup();
    if constexpr (ObservesEpochLosses<Policy>) return done >= 0 && policy.policy().wants_epoch_losses(done);
    return false;
  }
  bool wants_features(const EpochClock& clock, const PolicyTransaction<Policy>& policy) const {
    const std::int64_t done = clock.epochs_done_after_warmup();
    if constexpr (ObservesEpochFeatures<Policy>) return done >= 0 && policy.policy().wants_epoch_features(done);
    return false;
  }

  // Every head's losses and every branch's features on the data, where the policy wants them.
  template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
  Measurements measure(const EpochClock& clock, const PolicyTransaction<Policy>& policy, Net& net,
                       TrainSample&& train_sample, HeldOut&& held_out, SumAcrossRanks& sum_across_ranks) const {
    Measurements m;
    const std::int64_t done = clock.epochs_done_after_warmup();
    if (wants_losses(clock, policy)) m.losses = measure_epoch_losses(net, train_sample, held_out, sum_across_ranks, done);
    if (wants_features(clock, policy)) {
      m.features = measure_epoch_features(net, train_sample, held_out, sum_across_ranks, done);
    }
    return m;
  }

  // Hands `m` over, asks for the strengths (after warm-up) and applies them.
  void reinitialize(EpochClock& clock, PolicyTransaction<Policy>& policy, const Measurements& m,
                    const std::vector<std::vector<at::Tensor>>& branches, torch::optim::Optimizer& optimizer) const {
    const std::int64_t done = clock.epochs_done_after_warmup();
    std::vector<double> strengths;
    advance(clock, policy, [&] {
      m.hand_over(policy.policy());
      if (done < 0) return;
      strengths = policy.policy().reinitialization(done);
      initial_->check(strengths, policy_type<Policy>());
    });
    initial_->apply(strengths, branches, optimizer);
  }

  std::optional<InitialParameters> initial_;  // a re-initializing policy's
};

}  // namespace mmbalance::detail
