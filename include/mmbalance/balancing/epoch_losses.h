#pragma once
/// \file
/// The epoch-loss hooks of balancing policies: a policy that measures generalization
/// (Gradient-Blending) receives every head's loss on training and held-out data at the
/// epoch boundaries it asks for, measured by the `Balancer`.

#include <concepts>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

#include <c10/util/Exception.h>

#include "mmbalance/metrics/head_losses.h"

namespace mmbalance {

/// Every head's mean loss on a sample of the training data and on held-out data, at the
/// end of epoch `epochs` after warm-up (0: the end of the warm-up itself).
struct EpochLosses {
  HeadLosses train, held_out;
  std::int64_t epochs = 0;
};

/// A policy that measures generalization at epoch boundaries: `wants_epoch_losses(e)`
/// says whether it needs the losses when `e` epochs after warm-up are done (0: the end of
/// warm-up); if so, `Balancer::end_epoch(net, train_sample, held_out)` measures them and
/// calls `observe_epoch_losses`. A plain `end_epoch()` at such a boundary is refused.
template <class P>
concept ObservesEpochLosses = requires(P& p, const P& cp, const EpochLosses& losses, std::int64_t e) {
  { cp.wants_epoch_losses(e) } -> std::same_as<bool>;
  p.observe_epoch_losses(losses);
};

namespace detail {

/// Every head's loss on `train_sample` and `held_out` (`head_losses`), after `epochs`
/// epochs after warm-up; an error is named by the data it happened on, its type kept
/// (e.g. out of memory). An empty std::function (as `observe()` takes for one process)
/// adds nothing up.
template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
EpochLosses measure_epoch_losses(Net& net, TrainSample&& train_sample, HeldOut&& held_out,
                                 SumAcrossRanks& sum_across_ranks, std::int64_t epochs) {
  const auto sum = [&](at::Tensor& t) {
    if constexpr (std::is_same_v<SumAcrossRanks, std::function<void(at::Tensor&)>>) {
      if (!sum_across_ranks) return;
    }
    sum_across_ranks(t);
  };
  const auto measure = [&](auto&& data, const char* which) {
    try {
      return head_losses(net, data, sum);
    } catch (c10::Error& e) {
      e.add_context(std::string("Balancer::end_epoch: measuring ") + which);
      throw;
    }
  };
  return {measure(train_sample, "train_sample"), measure(held_out, "held_out"), epochs};
}

}  // namespace detail
}  // namespace mmbalance
