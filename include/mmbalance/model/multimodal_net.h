#pragma once
/// \file
/// `MultiModalNet<Branch0, Branch1, Fusion>`: two uni-modal branches joined by fusion
/// modules after chosen stages (intermediate fusion, docs/algorithm.md §1).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/branch/branch.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/fusion_module.h"
#include "mmbalance/model/step_kind.h"

namespace mmbalance {

/// A fusion module placed after stage `stage` of both branches.
template <FusionModule Fusion>
struct FusionTap {
  std::size_t stage;
  Fusion module;
};

/// Class logits of one forward pass: `y = (y0 + y1) / 2`.
struct ModelOutput {
  at::Tensor y, y0, y1;
};

/// Logits of the utilization probe's pass: the normal heads and the cut ones, where branch
/// 0 sees only m0 (`y0_cut`, f0') and branch 1 sees only m1 (`y1_cut`, f1').
struct ProbeOutput {
  at::Tensor y0, y1, y0_cut, y1_cut;
};

/// The four parameter groups of docs/algorithm.md §3. The fusion groups share the parameters
/// every path goes through (MMTM's joint layer).
struct ParameterGroups {
  std::vector<at::Tensor> theta0, theta1, theta0_fusion, theta1_fusion;
};

/// Two branches (satisfying `Branch`) and fusion modules (satisfying `FusionModule`) at
/// strictly increasing stage indices. Both branches need the same number of stages.
template <Branch Branch0, Branch Branch1, FusionModule Fusion>
class MultiModalNetImpl : public torch::nn::Module {
 public:
  using Tap = FusionTap<Fusion>;

  MultiModalNetImpl(Branch0 branch0_in, Branch1 branch1_in, std::vector<Tap> taps_in)
      : branch0(std::move(branch0_in)), branch1(std::move(branch1_in)), taps(std::move(taps_in)) {
    const std::size_t stages = branch0->num_stages();
    TORCH_CHECK(branch1->num_stages() == stages, "MultiModalNet: branch 0 has ", stages,
                " stages, branch 1 has ", branch1->num_stages(), "; both need the same number");
    for (std::size_t k = 0; k < taps.size(); ++k) {
      const Tap& tap = taps[k];
      TORCH_CHECK(tap.stage < stages, "MultiModalNet: fusion tap ", k, " is at stage ", tap.stage,
                  " but the branches have stages 0..", stages - 1);
      TORCH_CHECK(k == 0 || taps[k - 1].stage < tap.stage, "MultiModalNet: fusion tap ", k,
                  " is at stage ", tap.stage, ", after tap ", k - 1, " at stage ",
                  taps[k - 1].stage, "; stages must be strictly increasing");
      for (int side = 0; side < 2; ++side) {
        const std::int64_t have = side == 0 ? branch0->stage_channels(tap.stage)
                                            : branch1->stage_channels(tap.stage);
        TORCH_CHECK(tap.module->channels(side) == have, "MultiModalNet: fusion tap ", k,
                    " at stage ", tap.stage, " expects ", tap.module->channels(side),
                    " channels from branch ", side, ", which has ", have, " there");
      }
    }
    register_module("branch0", branch0);
    register_module("branch1", branch1);
    for (std::size_t k = 0; k < taps.size(); ++k) {
      register_module("fusion" + std::to_string(k), taps[k].module);
    }
  }

  /// One forward pass in the mode `kind` asks for. A regular step in training mode also
  /// stages its gates into the fusion modules' gate means, which the `Balancer` commits
  /// when it accepts the step; nothing else touches them.
  ModelOutput forward(const at::Tensor& x0, const at::Tensor& x1,
                      StepKind kind = StepKind::regular) {
    check_batch(x0, x1);
    FusionContext ctx;
    ctx.side0 = kind == StepKind::rebalance_m0 ? SideMode::held_gate : SideMode::live;
    ctx.side1 = kind == StepKind::rebalance_m1 ? SideMode::held_gate : SideMode::live;
    ctx.stage_gates = kind == StepKind::regular && is_training();
    return output(run(x0, x1, ctx));
  }

  /// The normal and the cut network (f0', f1'). Stages up to the first fusion tap are the
  /// same for both, so they run once. If the fusion modules handle `live_rows` (MMTM
  /// does), the rest is one pass over the stacked batch [x; x]; otherwise two passes.
  /// Needs eval mode and squeeze averages recorded with `record_squeeze` (not checked
  /// here, to keep device reads out of the loop: `evaluate_utilization` checks
  /// `has_squeeze_averages()` once).
  ProbeOutput forward_probe(const at::Tensor& x0, const at::Tensor& x1) {
    check_batch(x0, x1);
    TORCH_CHECK(!is_training(), "MultiModalNet::forward_probe needs eval mode (call eval())");
    const std::int64_t n = x0.size(0);
    const std::size_t shared = taps.empty() ? branch0->num_stages() : taps.front().stage + 1;
    at::Tensor h0 = x0, h1 = x1;
    for (std::size_t i = 0; i < shared; ++i) {
      h0 = branch0->forward_stage(i, h0);
      h1 = branch1->forward_stage(i, h1);
    }
    FusionContext cut;
    cut.side0 = cut.side1 = SideMode::averaged_squeeze;
    if constexpr (handles_live_rows<Fusion>()) {
      cut.live_rows = n;
      auto [y0, y1] = run(at::cat({h0, h0}, 0), at::cat({h1, h1}, 0), cut, shared);
      return {y0.narrow(0, 0, n), y1.narrow(0, 0, n), y0.narrow(0, n, n), y1.narrow(0, n, n)};
    } else {
      auto [y0, y1] = run(h0, h1, FusionContext{}, shared);
      auto [y0_cut, y1_cut] = run(h0, h1, cut, shared);
      return {std::move(y0), std::move(y1), std::move(y0_cut), std::move(y1_cut)};
    }
  }

  /// A live pass that stages the squeeze vectors into the fusion modules' squeeze means
  /// (the probe commits them after its pass over the training set).
  ModelOutput record_squeeze(const at::Tensor& x0, const at::Tensor& x1) {
    check_batch(x0, x1);
    FusionContext ctx;
    ctx.record_squeeze = true;
    return output(run(x0, x1, ctx));
  }

  /// Whether every fusion module has committed squeeze averages (reads one number per
  /// module from the device).
  bool has_squeeze_averages() const { return all_committed(squeeze_means()); }

  /// Clears every fusion module's squeeze mean (committed and staged).
  void reset_squeeze_averages() {
    for (auto& m : squeeze_means()) m->clear();
  }

  /// The fusion modules' gate means, in tap order (handles: they act on the modules).
  std::vector<RunningMean> gate_means() const {
    return detail::tap_means(taps, [](const auto& m) { return m.gate_mean; });
  }

  /// The fusion modules' squeeze means, in tap order.
  std::vector<RunningMean> squeeze_means() const {
    return detail::tap_means(taps, [](const auto& m) { return m.squeeze_mean; });
  }

  /// θ0, θ1 (every parameter of each branch) and θ0', θ1' (each fusion module's
  /// parameters on the path into that side), derived from structure, not names.
  ParameterGroups parameter_groups() const {
    ParameterGroups groups{branch0->parameters(), branch1->parameters(), {}, {}};
    for (const auto& tap : taps) {
      for (const auto& p : tap.module->side_parameters(0)) groups.theta0_fusion.push_back(p);
      for (const auto& p : tap.module->side_parameters(1)) groups.theta1_fusion.push_back(p);
    }
    return groups;
  }

  /// Deep copy: new branches, new fusion modules, same values (and training mode).
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<at::Device>& device = c10::nullopt) const override {
    std::vector<Tap> copied;
    copied.reserve(taps.size());
    for (const auto& tap : taps) copied.push_back({tap.stage, clone_holder(tap.module, device)});
    auto copy = std::make_shared<MultiModalNetImpl>(clone_holder(branch0, device),
                                                    clone_holder(branch1, device),
                                                    std::move(copied));
    copy->train(is_training());
    return copy;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::MultiModalNet(stages=" << branch0->num_stages() << ", taps=[";
    for (std::size_t k = 0; k < taps.size(); ++k) stream << (k ? ", " : "") << taps[k].stage;
    stream << "])";
  }

  Branch0 branch0;
  Branch1 branch1;
  std::vector<Tap> taps;

 private:
  template <class Holder>
  static Holder clone_holder(const Holder& holder, const c10::optional<at::Device>& device) {
    auto impl = std::dynamic_pointer_cast<typename Holder::ContainedType>(holder->clone(device));
    TORCH_CHECK(impl != nullptr, "MultiModalNet::clone: a submodule's clone() has another type");
    return Holder(std::move(impl));
  }

  static void check_batch(const at::Tensor& x0, const at::Tensor& x1) {
    TORCH_CHECK(x0.defined() && x1.defined() && x0.dim() >= 1 && x1.dim() >= 1,
                "MultiModalNet: both modalities need a batch, got m0 ", detail::shape_string(x0),
                " and m1 ", detail::shape_string(x1));
    TORCH_CHECK(x0.size(0) == x1.size(0), "MultiModalNet: batch sizes differ: m0 has ", x0.size(0),
                " samples ", detail::shape_string(x0), ", m1 has ", x1.size(0), " ",
                detail::shape_string(x1));
  }

  static ModelOutput output(std::pair<at::Tensor, at::Tensor> heads) {
    auto& [y0, y1] = heads;
    return {(y0 + y1) * 0.5, std::move(y0), std::move(y1)};
  }

  // Stages [computed, end) of both branches, each followed by its fusion tap, then the
  // heads. Stages before `computed` were run by the caller; their taps still apply here.
  std::pair<at::Tensor, at::Tensor> run(at::Tensor h0, at::Tensor h1, const FusionContext& ctx,
                                        std::size_t computed = 0) {
    std::size_t next_tap = 0;
    for (std::size_t i = 0; i < branch0->num_stages(); ++i) {
      if (i >= computed) {
        h0 = branch0->forward_stage(i, h0);
        h1 = branch1->forward_stage(i, h1);
      }
      if (next_tap < taps.size() && taps[next_tap].stage == i) {
        std::tie(h0, h1) = taps[next_tap].module->forward(h0, h1, ctx);
        ++next_tap;
      }
    }
    return {branch0->head(h0), branch1->head(h1)};
  }
};

/// The `ModuleHolder` handle of `MultiModalNetImpl` (as torchvision's `ResNet<Block>`).
///
/// Example:
/// ```
/// using Net = MultiModalNet<ConvBranch, ConvBranch, MMTM>;
/// Net net(ConvBranch(ConvBranchOptions(3, 10)), ConvBranch(ConvBranchOptions(1, 10)),
///         {{1, MMTM(64, 64)}, {2, MMTM(128, 128)}, {3, MMTM(128, 128)}});
/// auto out = net->forward(x0, x1, StepKind::regular);  // out.y, out.y0, out.y1
/// ```
template <Branch Branch0, Branch Branch1, FusionModule Fusion>
class MultiModalNet : public torch::nn::ModuleHolder<MultiModalNetImpl<Branch0, Branch1, Fusion>> {
 public:
  using Impl = MultiModalNetImpl<Branch0, Branch1, Fusion>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  MultiModalNet(Branch0 branch0, Branch1 branch1, std::vector<FusionTap<Fusion>> taps)
      : torch::nn::ModuleHolder<Impl>(
            std::make_shared<Impl>(std::move(branch0), std::move(branch1), std::move(taps))) {}

  /// A deep copy as a handle of the same type.
  MultiModalNet clone(const c10::optional<at::Device>& device = c10::nullopt) const {
    return MultiModalNet(std::dynamic_pointer_cast<Impl>(this->get()->clone(device)));
  }
};

/// What the library's other parts take as a network (the `Balancer`, the utilization
/// probe, `DataParallel`, checkpoints): a `MultiModalNet` handle, or your own handle with
/// these members.
template <class Net>
concept MultiModalModel = requires(Net net, const at::Tensor& x, StepKind kind) {
  { net->forward(x, x, kind) } -> std::same_as<ModelOutput>;
  { net->forward_probe(x, x) } -> std::same_as<ProbeOutput>;
  { net->record_squeeze(x, x) } -> std::same_as<ModelOutput>;
  { net->parameter_groups() } -> std::same_as<ParameterGroups>;
  { net->gate_means() } -> std::same_as<std::vector<RunningMean>>;
  { net->squeeze_means() } -> std::same_as<std::vector<RunningMean>>;
  { net->has_squeeze_averages() } -> std::same_as<bool>;
  { net->reset_squeeze_averages() };
  { net->parameters() } -> std::same_as<std::vector<at::Tensor>>;
  { net->buffers() } -> std::same_as<std::vector<at::Tensor>>;
  { net->is_training() } -> std::same_as<bool>;
  { net->train(true) };
  { *net } -> std::convertible_to<const torch::nn::Module&>;  // save, load, fingerprints
};

}  // namespace mmbalance
