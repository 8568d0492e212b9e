#pragma once
/// \file
/// The epoch-feature hooks of balancing policies: a policy that judges each branch's
/// representation (ReLearning) receives every branch's features on training and held-out
/// data at the epoch boundaries it asks for, measured by the `Balancer`.

#include <concepts>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "mmbalance/metrics/utilization_probe.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// Every branch's features (what its head reads, pooled over space: `pooled_features`)
/// on a sample of the training data and on held-out data, at the end of epoch `epochs`
/// after warm-up (0: the end of the warm-up itself), measured in eval mode without
/// gradients. `train[k]` is (rows, width) float on the CPU, rows in the data's order, their
/// classes in `train_target` (int64, CPU); likewise `held_out`. `classes`: the heads'. Data-parallel, each rank
/// measures the data it is given (pass every rank the same), and `sum_across_ranks` adds
/// a tensor up over the ranks in place (does nothing, or is empty, in one process), for a
/// policy to make its decision the same on every rank; it is valid during the hook's call.
struct EpochFeatures {
  std::vector<at::Tensor> train, held_out;
  at::Tensor train_target, held_out_target;
  std::int64_t classes = 0;
  std::int64_t epochs = 0;
  std::function<void(at::Tensor&)> sum_across_ranks;
};

/// A policy that judges the branches' features at epoch boundaries:
/// `wants_epoch_features(e)` says whether it needs them when `e` epochs after warm-up are
/// done (0: the end of warm-up); if so, `Balancer::end_epoch(net, train_sample, held_out)`
/// (with the optimizer too, for a policy that re-initializes branches) measures them and
/// calls `observe_epoch_features`. An `end_epoch` without the data at such a boundary is
/// refused.
template <class P>
concept ObservesEpochFeatures = requires(P& p, const P& cp, const EpochFeatures& features, std::int64_t e) {
  { cp.wants_epoch_features(e) } -> std::same_as<bool>;
  p.observe_epoch_features(features);
};

namespace detail {

struct FeaturesOnData {
  std::vector<at::Tensor> features;
  at::Tensor target;
  std::int64_t classes = 0;
};

/// Every branch's pooled features and the targets over `data`, on the CPU; an error is
/// named by the data it happened on.
template <class Net, class Data>
FeaturesOnData features_on(Net& net, Data&& data, const char* which) {
  try {
    const EvalModeGuard<Net> eval_mode(net);
    const at::Device device = net->parameters().front().device();
    std::vector<std::vector<at::Tensor>> parts(net->num_branches());
    std::vector<at::Tensor> targets;
    std::int64_t classes = 0;
    for (const auto& batch : data) {
      const NetOutput out = net->forward(batch_inputs(batch, device), StepPlan::regular());
      classes = out.y.size(1);
      TORCH_CHECK(out.features.size() == parts.size(), "the network's output has ", out.features.size(),
                  " features for ", parts.size(), " branches");
      for (std::size_t k = 0; k < parts.size(); ++k) {
        parts[k].push_back(pooled_features(out.features[k]).to(at::kCPU, at::kFloat));
      }
      targets.push_back(at::Tensor(batch.target).to(at::kCPU, at::kLong));
    }
    TORCH_CHECK(!targets.empty(), "the data is empty (no samples to take features of)");
    std::vector<at::Tensor> features;
    for (auto& p : parts) features.push_back(at::cat(p));
    at::Tensor target = at::cat(targets);
    TORCH_CHECK(target.dim() == 1 && target.size(0) == features[0].size(0), "target must be (batch) class indices, ",
                "one per row: ", target.size(0), " targets for ", features[0].size(0), " rows");
    return {std::move(features), std::move(target), classes};
  } catch (c10::Error& e) {
    e.add_context(std::string("Balancer::end_epoch: taking features of ") + which);
    throw;
  }
}

/// The features of `train_sample` and `held_out` after `epochs` epochs after warm-up.
template <class Net, class TrainSample, class HeldOut, class SumAcrossRanks>
EpochFeatures measure_epoch_features(Net& net, TrainSample&& train_sample, HeldOut&& held_out,
                                     SumAcrossRanks& sum_across_ranks, std::int64_t epochs) {
  FeaturesOnData train = features_on(net, train_sample, "train_sample");
  FeaturesOnData held = features_on(net, held_out, "held_out");
  // Refers to the caller's, for the call only; sums on the network's device (NCCL moves
  // only CUDA tensors), the result back where the policy's tensor is.
  std::function<void(at::Tensor&)> sum;
  bool sums = true;
  if constexpr (std::is_same_v<SumAcrossRanks, std::function<void(at::Tensor&)>>) sums = static_cast<bool>(sum_across_ranks);
  if (sums) {
    sum = [&sum_across_ranks, device = net->parameters().front().device()](at::Tensor& t) {
      at::Tensor on_device = t.to(device).contiguous();
      sum_across_ranks(on_device);
      t.copy_(on_device);
    };
  }
  return {std::move(train.features), std::move(held.features), std::move(train.target), std::move(held.target),
          train.classes, epochs, std::move(sum)};
}

}  // namespace detail
}  // namespace mmbalance
