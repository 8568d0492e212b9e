#pragma once
/// \file
/// `NWayMultiModalNet<Fusion, Branches...>`: any number of uni-modal branches, of any
/// types and stage counts, joined by N-way fusion modules (docs/algorithm.md §1, "N
/// branches").

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
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
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// An N-way fusion module placed after stage `stages[k]` of each branch k.
template <NWayFusionModule Fusion>
struct NWayFusionTap {
  std::vector<std::size_t> stages;
  Fusion module;
};

/// Class logits of one forward pass: every branch's head, and `y`, their mean.
struct NWayOutput {
  at::Tensor y;
  std::vector<at::Tensor> heads;
};

/// Logits of the utilization probe's pass: the normal heads and the cut ones, where
/// branch k sees only its own modality (f_k').
struct NWayProbeOutput {
  std::vector<at::Tensor> heads, cut_heads;
};

/// θ_k (every parameter of branch k) and θ_k' (the fusion parameters on the path into
/// branch k), docs/algorithm.md §3 for N branches.
struct NWayParameterGroups {
  std::vector<std::vector<at::Tensor>> branch, fusion;
};

/// N >= 2 branches (each satisfying `Branch`, types may differ) and N-way fusion modules.
/// Tap t reads stage `taps[t].stages[k]` of branch k; per branch, the taps' stages are
/// strictly increasing. Branches may have different numbers of stages.
///
/// For two branches it is `MultiModalNet` with `MMTM` replaced by a two-way `NWayMMTM`:
/// the same submodule names, so it loads a `MultiModalNet`'s saved state and computes the
/// same outputs bit for bit (tested).
template <NWayFusionModule Fusion, Branch... Branches>
class NWayMultiModalNetImpl : public torch::nn::Module {
  static_assert(sizeof...(Branches) >= 2, "NWayMultiModalNet needs at least two branches");

 public:
  using Tap = NWayFusionTap<Fusion>;
  static constexpr std::size_t kBranches = sizeof...(Branches);

  NWayMultiModalNetImpl(std::tuple<Branches...> branches_in, std::vector<Tap> taps_in)
      : branches(std::move(branches_in)), taps(std::move(taps_in)) {
    const std::vector<std::size_t> stages_of = stage_counts();
    for (std::size_t t = 0; t < taps.size(); ++t) {
      const Tap& tap = taps[t];
      TORCH_CHECK(tap.stages.size() == kBranches, "NWayMultiModalNet: fusion tap ", t, " names ",
                  tap.stages.size(), " stages, one for each of the ", kBranches,
                  " branches is needed");
      TORCH_CHECK(tap.module->num_inputs() == kBranches, "NWayMultiModalNet: fusion tap ", t,
                  " joins ", tap.module->num_inputs(), " branches, the network has ", kBranches);
      for (std::size_t k = 0; k < kBranches; ++k) {
        const std::size_t stage = tap.stages[k];
        TORCH_CHECK(stage < stages_of[k], "NWayMultiModalNet: fusion tap ", t,
                    " reads stage ", stage, " of branch ", k, ", which has stages 0..",
                    stages_of[k] - 1);
        TORCH_CHECK(t == 0 || taps[t - 1].stages[k] < stage, "NWayMultiModalNet: fusion tap ",
                    t, " reads stage ", stage, " of branch ", k, ", tap ", t - 1, " stage ",
                    taps[t - 1].stages[k], "; each branch's stages must be strictly increasing");
        std::int64_t have = 0;
        visit(k, [&](auto& b) { have = b->stage_channels(stage); });
        TORCH_CHECK(tap.module->channels(k) == have, "NWayMultiModalNet: fusion tap ", t,
                    " expects ", tap.module->channels(k), " channels from branch ", k,
                    ", whose stage ", stage, " has ", have);
      }
    }
    for (std::size_t k = 0; k < kBranches; ++k) {
      visit(k, [&](auto& b) { register_module("branch" + std::to_string(k), b); });
    }
    for (std::size_t t = 0; t < taps.size(); ++t) {
      register_module("fusion" + std::to_string(t), taps[t].module);
    }
  }

  /// One forward pass with the branches held as `plan` says. A regular step in training
  /// mode stages its gates into the fusion modules' gate means (the balancer commits).
  NWayOutput forward(const std::vector<at::Tensor>& inputs, StepPlan plan = StepPlan::regular()) {
    check_inputs(inputs);
    NWayFusionContext ctx;
    if (const auto held = plan.held_branch()) {
      TORCH_CHECK(*held < kBranches, "NWayMultiModalNet: the step holds branch ", *held,
                  ", the network has branches 0..", kBranches - 1);
      ctx.sides.assign(kBranches, SideMode::live);
      ctx.sides[*held] = SideMode::held_gate;
    }
    ctx.stage_gates = plan.is_regular() && is_training();
    return output(run(inputs, ctx, {}));
  }

  /// Inference with missing modalities (a sensor that dropped out): the branches in
  /// `absent` do not run (their inputs are ignored and may be undefined tensors), every
  /// fusion module reads their training-set average squeeze vectors in their place (as
  /// recorded for the utilization probe, `record_squeeze_averages`), and `y` is the mean
  /// of the present heads; an absent branch's head is an undefined tensor. Gates are not
  /// staged. Runs in eval mode whatever mode the network is in (BatchNorm uses and keeps
  /// its running statistics; each module's own mode is restored); gradients as the caller
  /// has them. Reads one number per fusion module from the device (are averages recorded?).
  NWayOutput forward_missing(const std::vector<at::Tensor>& inputs,
                             const std::vector<std::size_t>& absent) {
    auto* self = this;
    const EvalModeScope eval(self);
    NWayFusionContext ctx;
    ctx.sides.assign(kBranches, SideMode::live);
    for (const std::size_t k : absent) {
      TORCH_CHECK(k < kBranches, "NWayMultiModalNet::forward_missing: modality ", k,
                  " is out of range; the network has modalities 0..", kBranches - 1);
      TORCH_CHECK(ctx.sides[k] != SideMode::absent, "NWayMultiModalNet::forward_missing: "
                  "modality ", k, " is listed twice");
      ctx.sides[k] = SideMode::absent;
    }
    TORCH_CHECK(absent.size() < kBranches,
                "NWayMultiModalNet::forward_missing: every modality is absent");
    check_inputs(inputs, ctx);
    TORCH_CHECK(taps.empty() || has_squeeze_averages(),
                "NWayMultiModalNet::forward_missing: no squeeze averages recorded; run "
                "record_squeeze_averages over the training data first");
    return output(run(inputs, ctx, {}));
  }

  /// The normal and the cut networks (f_k' for every k) for the utilization probe. Stages
  /// up to each branch's first tap run once for both; with `handles_live_rows` modules the
  /// rest is one pass over the stacked batch. Needs eval mode and recorded squeeze means.
  NWayProbeOutput forward_probe(const std::vector<at::Tensor>& inputs) {
    check_inputs(inputs);
    TORCH_CHECK(!is_training(), "NWayMultiModalNet::forward_probe needs eval mode (call eval())");
    const std::int64_t n = inputs[0].size(0);
    std::vector<at::Tensor> h = inputs;
    std::vector<std::size_t> computed(kBranches, 0);
    std::vector<std::size_t> shared = stage_counts();
    if (!taps.empty()) {
      for (std::size_t k = 0; k < kBranches; ++k) shared[k] = taps.front().stages[k] + 1;
    }
    advance(h, computed, shared, {});
    NWayFusionContext cut;
    cut.sides.assign(kBranches, SideMode::averaged_squeeze);
    if constexpr (handles_live_rows<Fusion>()) {
      cut.live_rows = n;
      std::vector<at::Tensor> stacked;
      for (const auto& x : h) stacked.push_back(at::cat({x, x}, 0));
      std::vector<at::Tensor> both = run(std::move(stacked), cut, computed);
      NWayProbeOutput out;
      for (const auto& y : both) {
        out.heads.push_back(y.narrow(0, 0, n));
        out.cut_heads.push_back(y.narrow(0, n, n));
      }
      return out;
    } else {
      return {run(h, NWayFusionContext{}, computed), run(h, cut, computed)};
    }
  }

  /// A live pass that stages the squeeze vectors into the fusion modules' squeeze means.
  NWayOutput record_squeeze(const std::vector<at::Tensor>& inputs) {
    check_inputs(inputs);
    NWayFusionContext ctx;
    ctx.record_squeeze = true;
    return output(run(inputs, ctx, {}));
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

  /// θ_k and θ_k' for every branch k, derived from structure.
  NWayParameterGroups parameter_groups() const {
    NWayParameterGroups groups;
    groups.fusion.resize(kBranches);
    for (std::size_t k = 0; k < kBranches; ++k) {
      visit(k, [&](const auto& b) { groups.branch.push_back(b->parameters()); });
      for (const auto& tap : taps) {
        for (const auto& p : tap.module->side_parameters(k)) groups.fusion[k].push_back(p);
      }
    }
    return groups;
  }

  /// How many branches (modalities) the network joins.
  static constexpr std::size_t num_branches() { return kBranches; }

  /// Deep copy: new branches, new fusion modules, same values (and training mode).
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<at::Device>& device = c10::nullopt) const override {
    std::vector<Tap> copied;
    copied.reserve(taps.size());
    for (const auto& tap : taps) copied.push_back({tap.stages, clone_holder(tap.module, device)});
    auto copy = std::make_shared<NWayMultiModalNetImpl>(
        std::apply([&](const auto&... b) { return std::tuple{clone_holder(b, device)...}; },
                   branches),
        std::move(copied));
    copy->train(is_training());
    return copy;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::NWayMultiModalNet(branches=" << kBranches << ", taps=[";
    for (std::size_t t = 0; t < taps.size(); ++t) {
      stream << (t ? ", " : "") << "(";
      for (std::size_t k = 0; k < kBranches; ++k) stream << (k ? ", " : "") << taps[t].stages[k];
      stream << ")";
    }
    stream << "])";
  }

  /// Calls `f(branch)` with branch `k` (the branches may have different types).
  template <class F>
  void visit(std::size_t k, F&& f) {
    visit_impl(*this, k, f, std::index_sequence_for<Branches...>{});
  }
  template <class F>
  void visit(std::size_t k, F&& f) const {
    visit_impl(*this, k, f, std::index_sequence_for<Branches...>{});
  }

  std::tuple<Branches...> branches;
  std::vector<Tap> taps;

 private:
  template <class Self, class F, std::size_t... I>
  static void visit_impl(Self& self, std::size_t k, F& f, std::index_sequence<I...>) {
    TORCH_CHECK(k < kBranches, "NWayMultiModalNet: branch ", k, " is out of range 0..",
                kBranches - 1);
    ((k == I ? (f(std::get<I>(self.branches)), 0) : 0), ...);
  }

  template <class Holder>
  static Holder clone_holder(const Holder& holder, const c10::optional<at::Device>& device) {
    auto impl = std::dynamic_pointer_cast<typename Holder::ContainedType>(holder->clone(device));
    TORCH_CHECK(impl != nullptr, "NWayMultiModalNet::clone: a submodule's clone() has another type");
    return Holder(std::move(impl));
  }

  // Every modality, or every present one (`ctx`), has a batch, all of one size.
  static void check_inputs(const std::vector<at::Tensor>& inputs,
                           const NWayFusionContext& ctx = {}) {
    TORCH_CHECK(inputs.size() == kBranches, "NWayMultiModalNet: got ", inputs.size(),
                " modalities for ", kBranches, " branches");
    std::size_t first = kBranches;
    for (std::size_t k = 0; k < kBranches; ++k) {
      if (ctx.side(k) == SideMode::absent) continue;
      if (first == kBranches) first = k;
      TORCH_CHECK(inputs[k].defined() && inputs[k].dim() >= 1, "NWayMultiModalNet: modality ", k,
                  " needs a batch, got ", detail::shape_string(inputs[k]));
      TORCH_CHECK(inputs[k].size(0) == inputs[first].size(0),
                  "NWayMultiModalNet: batch sizes differ: m", first, " has ", inputs[first].size(0),
                  " samples ", detail::shape_string(inputs[first]), ", m", k, " has ",
                  inputs[k].size(0), " ", detail::shape_string(inputs[k]));
    }
  }

  // y = the mean of the defined heads (all of them but in forward_missing); for two heads
  // the same operations as MultiModalNet.
  static NWayOutput output(std::vector<at::Tensor> heads) {
    at::Tensor sum;
    std::size_t present = 0;
    for (const auto& h : heads) {
      if (!h.defined()) continue;
      sum = sum.defined() ? sum + h : h;
      ++present;
    }
    return {sum * (1.0 / static_cast<double>(present)), std::move(heads)};
  }

  // Every branch from stage `computed[k]` on (0 when empty), each tap applied once every
  // branch has reached the stage it reads, then the heads. Taps whose stages the caller
  // already ran still apply here.
  std::vector<at::Tensor> run(std::vector<at::Tensor> h, const NWayFusionContext& ctx,
                              const std::vector<std::size_t>& computed) {
    std::vector<std::size_t> next(kBranches, 0);
    if (!computed.empty()) next = computed;
    std::vector<std::size_t> end(kBranches);
    for (auto& tap : taps) {
      for (std::size_t k = 0; k < kBranches; ++k) end[k] = tap.stages[k] + 1;
      advance(h, next, end, ctx);
      h = tap.module->forward(h, ctx);
    }
    advance(h, next, stage_counts(), ctx);
    std::vector<at::Tensor> heads(kBranches);
    for (std::size_t k = 0; k < kBranches; ++k) {
      if (ctx.side(k) != SideMode::absent) visit(k, [&](auto& b) { heads[k] = b->head(h[k]); });
    }
    return heads;
  }

  // Runs every branch that is not absent in `ctx` from stage next[k] up to (not
  // including) stage end[k], one stage of each branch in turn: for equal depths the
  // order of MultiModalNet, so that random draws inside branches (dropout) come in the
  // same order.
  void advance(std::vector<at::Tensor>& h, std::vector<std::size_t>& next,
               const std::vector<std::size_t>& end, const NWayFusionContext& ctx) {
    for (bool ran = true; ran;) {
      ran = false;
      for (std::size_t k = 0; k < kBranches; ++k) {
        if (ctx.side(k) == SideMode::absent || next[k] >= end[k]) continue;
        visit(k, [&](auto& b) { h[k] = b->forward_stage(next[k], h[k]); });
        ++next[k];
        ran = true;
      }
    }
  }

  // Every branch's number of stages.
  std::vector<std::size_t> stage_counts() const {
    std::vector<std::size_t> counts(kBranches);
    for (std::size_t k = 0; k < kBranches; ++k) visit(k, [&](const auto& b) { counts[k] = b->num_stages(); });
    return counts;
  }
};

/// The `ModuleHolder` handle of `NWayMultiModalNetImpl`.
///
/// Example (camera, depth and IMU; the IMU branch has two stages):
/// ```
/// using Net = NWayMultiModalNet<NWayMMTM, ConvBranch, ConvBranch, ConvBranch>;
/// Net net(std::tuple{camera, depth, imu},
///         {{{1, 1, 0}, NWayMMTM(NWayMMTMOptions({64, 64, 32}))},
///          {{2, 2, 1}, NWayMMTM(NWayMMTMOptions({128, 128, 64}))}});
/// auto out = net->forward({x_camera, x_depth, x_imu}, StepPlan::hold(0));  // out.y, out.heads
/// ```
template <NWayFusionModule Fusion, Branch... Branches>
class NWayMultiModalNet
    : public torch::nn::ModuleHolder<NWayMultiModalNetImpl<Fusion, Branches...>> {
 public:
  using Impl = NWayMultiModalNetImpl<Fusion, Branches...>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  NWayMultiModalNet(std::tuple<Branches...> branches, std::vector<NWayFusionTap<Fusion>> taps)
      : torch::nn::ModuleHolder<Impl>(std::make_shared<Impl>(std::move(branches), std::move(taps))) {}

  /// A deep copy as a handle of the same type.
  NWayMultiModalNet clone(const c10::optional<at::Device>& device = c10::nullopt) const {
    return NWayMultiModalNet(std::dynamic_pointer_cast<Impl>(this->get()->clone(device)));
  }
};

}  // namespace mmbalance
