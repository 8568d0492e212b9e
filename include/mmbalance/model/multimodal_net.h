#pragma once
/// \file
/// `MultiModalNet<Branch0, Branch1, ..., Fusion>`: two or more uni-modal branches, of any
/// types and stage counts, joined by fusion modules after chosen stages (intermediate
/// fusion, docs/algorithm.md §1), and the concepts the library's other parts take as a
/// network.

#include <cmath>
#include <concepts>
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

/// A fusion module placed after stage `stages[k]` of each branch k.
template <FusionModule Fusion>
struct FusionTap {
  /// After stage `stage` of every branch (e.g. `{1, MMTM(64, 64)}`).
  FusionTap(std::size_t stage, Fusion module) : stages{stage}, module(std::move(module)) {}
  /// After stage `stages[k]` of branch k (e.g. `{{1, 1, 0}, MMTM(MMTMOptions({64, 64, 32}))}`).
  FusionTap(std::vector<std::size_t> stages, Fusion module)
      : stages(std::move(stages)), module(std::move(module)) {}

  std::vector<std::size_t> stages;
  Fusion module;
};

/// One forward pass: every branch's head logits, `y` their mean, and every branch's
/// features (the tensor its head reads), in branch order.
struct NetOutput {
  at::Tensor y;
  std::vector<at::Tensor> heads;
  std::vector<at::Tensor> features;
};

/// A branch's features as (batch, width): a map (batch, channels, space...) averaged over
/// space, as the library's branches pool it for their heads; (batch, width) as it is.
inline at::Tensor pooled_features(const at::Tensor& features) {
  return features.dim() == 2 ? features : features.flatten(2).mean(-1);
}

/// What the two-branch `forward(x0, x1, kind)` returns: a `NetOutput` whose heads are also
/// named, `y0` = heads[0] and `y1` = heads[1] (the same tensors); y = (y0 + y1) / 2.
struct ModelOutput : NetOutput {
  at::Tensor y0, y1;
};

/// Logits of the utilization probe's pass: the normal heads and the cut ones, where
/// branch k sees only its own modality (f_k').
struct ProbeOutput {
  std::vector<at::Tensor> heads, cut_heads;
};

/// θ_k (every parameter of branch k) and θ_k' (the fusion parameters on the path into
/// branch k), docs/algorithm.md §3.
struct ParameterGroups {
  std::vector<std::vector<at::Tensor>> branch, fusion;
};

namespace detail {
// Parts = Branch0, ..., BranchN-1, Fusion.
template <class... Parts>
struct NetParts {
  static_assert(sizeof...(Parts) >= 3,
                "MultiModalNet<Branch0, Branch1, ..., Fusion>: at least two branches, then the "
                "fusion module type");
  using All = std::tuple<Parts...>;
  using Fusion = std::tuple_element_t<sizeof...(Parts) - 1, All>;
  template <std::size_t... I>
  static auto branches(std::index_sequence<I...>) -> std::tuple<std::tuple_element_t<I, All>...>;
  using Branches = decltype(branches(std::make_index_sequence<sizeof...(Parts) - 1>{}));
};
template <class Tuple>
constexpr bool all_branches() {
  return []<std::size_t... I>(std::index_sequence<I...>) {
    return (Branch<std::tuple_element_t<I, Tuple>> && ...);
  }(std::make_index_sequence<std::tuple_size_v<Tuple>>{});
}
}  // namespace detail

/// N >= 2 branches (each satisfying `Branch`, types may differ) and fusion modules
/// (satisfying `FusionModule`). Tap t reads stage `taps[t].stages[k]` of branch k; per
/// branch, the taps' stages are strictly increasing. Branches may have different numbers
/// of stages. Two branches have a two-branch form of each entry point (`forward(x0, x1,
/// kind)`, `branch0`, `branch1`), the same network.
template <class... Parts>
class MultiModalNetImpl : public torch::nn::Module {
 public:
  using Fusion = typename detail::NetParts<Parts...>::Fusion;
  /// `std::tuple<Branch0, ..., BranchN-1>`.
  using Branches = typename detail::NetParts<Parts...>::Branches;
  static_assert(detail::all_branches<Branches>(),
                "MultiModalNet: every type but the last must satisfy Branch (branch/branch.h)");
  static_assert(FusionModule<Fusion>,
                "MultiModalNet: the last type must satisfy FusionModule (fusion/fusion_module.h)");
  using Tap = FusionTap<Fusion>;
  static constexpr std::size_t kBranches = std::tuple_size_v<Branches>;

  MultiModalNetImpl(Branches branches_in, std::vector<Tap> taps_in)
      : branches(std::move(branches_in)),
        taps(std::move(taps_in)),
        branch0(std::get<0>(branches)),
        branch1(std::get<1>(branches)) {
    const std::vector<std::size_t> stages_of = stage_counts();
    for (std::size_t t = 0; t < taps.size(); ++t) {
      Tap& tap = taps[t];
      if (tap.stages.size() == 1) tap.stages.assign(kBranches, tap.stages[0]);
      TORCH_CHECK(tap.stages.size() == kBranches, "MultiModalNet: fusion tap ", t, " names ",
                  tap.stages.size(), " stages; one, or one for each of the ", kBranches,
                  " branches, is needed");
      TORCH_CHECK(tap.module->num_inputs() == kBranches, "MultiModalNet: fusion tap ", t,
                  " joins ", tap.module->num_inputs(), " branches, the network has ", kBranches);
      for (std::size_t k = 0; k < kBranches; ++k) {
        const std::size_t stage = tap.stages[k];
        TORCH_CHECK(stage < stages_of[k], "MultiModalNet: fusion tap ", t, " reads stage ",
                    stage, " of branch ", k, ", which has stages 0..", stages_of[k] - 1);
        TORCH_CHECK(t == 0 || taps[t - 1].stages[k] < stage, "MultiModalNet: fusion tap ", t,
                    " reads stage ", stage, " of branch ", k, ", tap ", t - 1, " stage ",
                    taps[t - 1].stages[k], "; each branch's stages must be strictly increasing");
        std::int64_t have = 0;
        visit(k, [&](auto& b) { have = b->stage_channels(stage); });
        TORCH_CHECK(tap.module->channels(k) == have, "MultiModalNet: fusion tap ", t,
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

  /// Two branches.
  MultiModalNetImpl(std::tuple_element_t<0, Branches> branch0_in,
                    std::tuple_element_t<1, Branches> branch1_in, std::vector<Tap> taps_in)
    requires(kBranches == 2)
      : MultiModalNetImpl(Branches(std::move(branch0_in), std::move(branch1_in)),
                          std::move(taps_in)) {}

  /// One forward pass with the branches held as `plan` says (a `StepKind` converts), and
  /// the branch it modulates, if any, modulated (`StepPlan::modulating`): a dropped
  /// sample's activations of that branch are zero where every fusion module reads them and
  /// where its head does (such a step stages no gates), a kept sample's features are
  /// scaled before its head. A regular step in training mode also stages its gates into
  /// the fusion modules' gate means, which the `Balancer` commits when it accepts the
  /// step; nothing else touches them.
  NetOutput forward(const std::vector<at::Tensor>& inputs, StepPlan plan = StepPlan::regular()) {
    check_inputs(inputs);
    const std::string problem = plan.problem(kBranches);
    TORCH_CHECK(problem.empty(), "MultiModalNet: the step ", problem);
    FusionContext ctx;
    if (const auto held = plan.held_branch()) {
      ctx.sides.assign(kBranches, SideMode::live);
      ctx.sides[*held] = SideMode::held_gate;
    }
    // Gates computed from dropped samples are not those of a regular step: not staged.
    ctx.stage_gates = plan.is_regular() && is_training() &&
                      !(plan.modulated_branch() && plan.keep_probability() < 1);
    return output(run(inputs, ctx, {}, plan));
  }

  /// `forward(inputs, plan)` with modalities absent sample by sample: where
  /// `presence[r][k]` (bool, (batch, branches), on the inputs' device) is false, row r's
  /// activations of branch k are zero where every fusion module reads them and where its
  /// head does, as a dropped sample of `StepPlan::modulating` (a sample trained on some of
  /// its modalities, as sample-level valuation's copies; the branch's encoder still runs on
  /// the row). Stages no gates. No read from the device.
  NetOutput forward(const std::vector<at::Tensor>& inputs, StepPlan plan, const at::Tensor& presence) {
    check_inputs(inputs);
    const std::string problem = plan.problem(kBranches);
    TORCH_CHECK(problem.empty(), "MultiModalNet: the step ", problem);
    TORCH_CHECK(presence.defined() && presence.scalar_type() == at::kBool && presence.dim() == 2 &&
                    presence.size(0) == inputs[0].size(0) &&
                    presence.size(1) == static_cast<std::int64_t>(kBranches) &&
                    presence.device() == inputs[0].device(),
                "MultiModalNet::forward: presence must be a bool (batch, branches) = (", inputs[0].size(0), ", ",
                kBranches, ") tensor on ", inputs[0].device(), ", got ",
                presence.defined() ? detail::shape_string(presence) + " " +
                                         std::string(c10::toString(presence.scalar_type())) + " on " +
                                         presence.device().str()
                                   : std::string("an undefined tensor"));
    FusionContext ctx;
    if (const auto held = plan.held_branch()) {
      ctx.sides.assign(kBranches, SideMode::live);
      ctx.sides[*held] = SideMode::held_gate;
    }
    ctx.stage_gates = false;  // gates of samples missing modalities are not a regular step's
    return output(run(inputs, ctx, {}, plan, presence));
  }

  /// `forward({x0, x1}, kind)`, with the heads also named y0 and y1.
  ModelOutput forward(const at::Tensor& x0, const at::Tensor& x1,
                      StepPlan kind = StepPlan::regular())
    requires(kBranches == 2)
  {
    NetOutput out = forward(std::vector<at::Tensor>{x0, x1}, kind);
    ModelOutput named;
    named.y0 = out.heads[0];
    named.y1 = out.heads[1];
    static_cast<NetOutput&>(named) = std::move(out);
    return named;
  }

  /// Inference with missing modalities (a sensor that dropped out): the branches in
  /// `absent` do not run (their inputs are ignored and may be undefined tensors), every
  /// fusion module reads their training-set average squeeze vectors in their place (as
  /// recorded for the utilization probe, `record_squeeze_averages`), and `y` is the mean
  /// of the present heads; an absent branch's head and features are undefined tensors.
  /// Gates are not staged. Runs in eval mode whatever mode the network is in (BatchNorm
  /// uses and keeps its running statistics; each module's own mode is restored);
  /// gradients as the caller has them. Reads one number per fusion module from the device
  /// (are averages recorded?).
  NetOutput forward_missing(const std::vector<at::Tensor>& inputs,
                            const std::vector<std::size_t>& absent) {
    auto* self = this;
    const EvalModeScope eval(self);
    FusionContext ctx;
    ctx.sides.assign(kBranches, SideMode::live);
    for (const std::size_t k : absent) {
      TORCH_CHECK(k < kBranches, "MultiModalNet::forward_missing: modality ", k,
                  " is out of range; the network has modalities 0..", kBranches - 1);
      TORCH_CHECK(ctx.sides[k] != SideMode::absent, "MultiModalNet::forward_missing: "
                  "modality ", k, " is listed twice");
      ctx.sides[k] = SideMode::absent;
    }
    TORCH_CHECK(absent.size() < kBranches,
                "MultiModalNet::forward_missing: every modality is absent");
    check_inputs(inputs, ctx);
    TORCH_CHECK(taps.empty() || has_squeeze_averages(),
                "MultiModalNet::forward_missing: no squeeze averages recorded; run "
                "record_squeeze_averages over the training data first");
    return output(run(inputs, ctx, {}));
  }

  /// The normal and the cut networks (f_k' for every k) for the utilization probe. Stages
  /// up to each branch's first tap run once for both; with `handles_live_rows` modules
  /// (MMTM) the rest is one pass over the stacked batch [x; x], otherwise two passes.
  /// Needs eval mode and squeeze averages recorded with `record_squeeze` (not checked
  /// here, to keep device reads out of the loop: `evaluate_utilization` checks
  /// `has_squeeze_averages()` once).
  ProbeOutput forward_probe(const std::vector<at::Tensor>& inputs) {
    check_inputs(inputs);
    TORCH_CHECK(!is_training(), "MultiModalNet::forward_probe needs eval mode (call eval())");
    const std::int64_t n = inputs[0].size(0);
    std::vector<at::Tensor> h = inputs;
    std::vector<std::size_t> computed(kBranches, 0);
    std::vector<std::size_t> shared = stage_counts();
    if (!taps.empty()) {
      for (std::size_t k = 0; k < kBranches; ++k) shared[k] = taps.front().stages[k] + 1;
    }
    advance(h, computed, shared, {});
    FusionContext cut;
    cut.sides.assign(kBranches, SideMode::averaged_squeeze);
    if constexpr (handles_live_rows<Fusion>()) {
      cut.live_rows = n;
      std::vector<at::Tensor> stacked;
      for (const auto& x : h) stacked.push_back(at::cat({x, x}, 0));
      ProbeOutput out;
      for (const auto& y : run(std::move(stacked), cut, computed).heads) {
        out.heads.push_back(y.narrow(0, 0, n));
        out.cut_heads.push_back(y.narrow(0, n, n));
      }
      return out;
    } else {
      return {run(h, FusionContext{}, computed).heads, run(h, cut, computed).heads};
    }
  }

  /// A live pass that stages the squeeze vectors into the fusion modules' squeeze means
  /// (the probe commits them after its pass over the training set).
  NetOutput record_squeeze(const std::vector<at::Tensor>& inputs) {
    check_inputs(inputs);
    FusionContext ctx;
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

  /// θ_k and θ_k' for every branch k, derived from structure, not names.
  ParameterGroups parameter_groups() const {
    ParameterGroups groups;
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
    auto copy = std::make_shared<MultiModalNetImpl>(
        std::apply([&](const auto&... b) { return Branches{clone_holder(b, device)...}; },
                   branches),
        std::move(copied));
    copy->train(is_training());
    return copy;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::MultiModalNet(branches=" << kBranches << ", taps=[";
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
    visit_impl(*this, k, f, std::make_index_sequence<kBranches>{});
  }
  template <class F>
  void visit(std::size_t k, F&& f) const {
    visit_impl(*this, k, f, std::make_index_sequence<kBranches>{});
  }

  Branches branches;
  std::vector<Tap> taps;
  /// Handles of the first two branches (the same modules as in `branches`).
  std::tuple_element_t<0, Branches> branch0;
  std::tuple_element_t<1, Branches> branch1;

 private:
  template <class Self, class F, std::size_t... I>
  static void visit_impl(Self& self, std::size_t k, F& f, std::index_sequence<I...>) {
    TORCH_CHECK(k < kBranches, "MultiModalNet: branch ", k, " is out of range 0..",
                kBranches - 1);
    ((k == I ? (f(std::get<I>(self.branches)), 0) : 0), ...);
  }

  template <class Holder>
  static Holder clone_holder(const Holder& holder, const c10::optional<at::Device>& device) {
    auto impl = std::dynamic_pointer_cast<typename Holder::ContainedType>(holder->clone(device));
    TORCH_CHECK(impl != nullptr, "MultiModalNet::clone: a submodule's clone() has another type");
    return Holder(std::move(impl));
  }

  // Every modality, or every present one (`ctx`), has a batch, all of one size.
  static void check_inputs(const std::vector<at::Tensor>& inputs, const FusionContext& ctx = {}) {
    TORCH_CHECK(inputs.size() == kBranches, "MultiModalNet: got ", inputs.size(),
                " modalities for ", kBranches, " branches");
    std::size_t first = kBranches;
    for (std::size_t k = 0; k < kBranches; ++k) {
      if (ctx.side(k) == SideMode::absent) continue;
      if (first == kBranches) first = k;
      TORCH_CHECK(inputs[k].defined() && inputs[k].dim() >= 1, "MultiModalNet: modality ", k,
                  " needs a batch, got ", detail::shape_string(inputs[k]));
      TORCH_CHECK(inputs[k].size(0) == inputs[first].size(0),
                  "MultiModalNet: batch sizes differ: m", first, " has ", inputs[first].size(0),
                  " samples ", detail::shape_string(inputs[first]), ", m", k, " has ",
                  inputs[k].size(0), " ", detail::shape_string(inputs[k]));
    }
  }

  // y = the mean of the defined heads (all of them but in forward_missing): for two heads
  // (y0 + y1) * 0.5.
  static NetOutput output(NetOutput out) {
    at::Tensor sum;
    std::size_t present = 0;
    for (const auto& h : out.heads) {
      if (!h.defined()) continue;
      sum = sum.defined() ? sum + h : h;
      ++present;
    }
    out.y = sum * (1.0 / static_cast<double>(present));
    return out;
  }

  // Every branch from stage `computed[k]` on (0 when empty), each tap applied once every
  // branch has reached the stage it reads, then the heads (y left to `output`). Taps whose
  // stages the caller already ran still apply here.
  NetOutput run(std::vector<at::Tensor> h, const FusionContext& ctx,
                const std::vector<std::size_t>& computed,
                const StepPlan& plan = StepPlan::regular(), const at::Tensor& presence = {}) {
    std::vector<std::size_t> next(kBranches, 0);
    if (!computed.empty()) next = computed;
    std::vector<std::size_t> end(kBranches);
    const auto modulated = plan.modulated_branch();
    at::Tensor kept;  // the modulated branch's samples kept (1) or dropped (0), one draw a pass
    const auto drop = [&](const at::Tensor& x, double scale) {
      if (!kept.defined()) kept = at::bernoulli(at::full({x.size(0)}, plan.keep_probability(), x.options()));
      std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
      shape[0] = x.size(0);
      return x * (kept * scale).view(shape);
    };
    // Row r of branch k zeroed where presence[r][k] is false.
    const auto absent_rows_zeroed = [&] {
      if (!presence.defined()) return;
      for (std::size_t k = 0; k < kBranches; ++k) {
        std::vector<std::int64_t> shape(static_cast<std::size_t>(h[k].dim()), 1);
        shape[0] = h[k].size(0);
        h[k] = h[k] * presence.select(1, static_cast<std::int64_t>(k)).to(h[k].scalar_type()).view(shape);
      }
    };
    for (auto& tap : taps) {
      for (std::size_t k = 0; k < kBranches; ++k) end[k] = tap.stages[k] + 1;
      advance(h, next, end, ctx);
      if (modulated && plan.keep_probability() < 1) h[*modulated] = drop(h[*modulated], 1.0);
      absent_rows_zeroed();
      h = tap.module->forward(h, ctx);
    }
    advance(h, next, stage_counts(), ctx);
    absent_rows_zeroed();
    if (modulated) {
      h[*modulated] = plan.keep_probability() < 1 ? drop(h[*modulated], plan.feature_scale())
                                                 : h[*modulated] * plan.feature_scale();
    }
    NetOutput out;
    out.heads.resize(kBranches);
    for (std::size_t k = 0; k < kBranches; ++k) {
      if (ctx.side(k) == SideMode::absent) {
        h[k] = at::Tensor();  // a late-fusion pass would hand the ignored input back
      } else {
        visit(k, [&](auto& b) { out.heads[k] = b->head(h[k]); });
      }
    }
    out.features = std::move(h);
    return out;
  }

  // Runs every branch that is not absent in `ctx` from stage next[k] up to (not
  // including) stage end[k], one stage of each branch in turn, so that random draws inside
  // branches (dropout) come in the same order whatever the depths.
  void advance(std::vector<at::Tensor>& h, std::vector<std::size_t>& next,
               const std::vector<std::size_t>& end, const FusionContext& ctx) {
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

/// The `ModuleHolder` handle of `MultiModalNetImpl` (as torchvision's `ResNet<Block>`):
/// the branch types in branch order, then the fusion module type.
///
/// Example (two branches, an MMTM after stages 1, 2 and 3 of both):
/// ```
/// using Net = MultiModalNet<ConvBranch, ConvBranch, MMTM>;
/// Net net(ConvBranch(ConvBranchOptions(3, 10)), ConvBranch(ConvBranchOptions(1, 10)),
///         {{1, MMTM(64, 64)}, {2, MMTM(128, 128)}, {3, MMTM(128, 128)}});
/// auto out = net->forward(x0, x1, StepKind::regular);  // out.y, out.y0, out.y1
/// ```
/// Example (camera, depth and IMU; the IMU branch has two stages):
/// ```
/// using Net3 = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, MMTM>;
/// Net3 net3(std::tuple{camera, depth, imu},
///           {{{1, 1, 0}, MMTM(MMTMOptions({64, 64, 32}))},
///            {{2, 2, 1}, MMTM(MMTMOptions({128, 128, 64}))}});
/// auto out3 = net3->forward({x_camera, x_depth, x_imu}, StepPlan::hold(0));  // out3.y, out3.heads
/// ```
template <class... Parts>
class MultiModalNet : public torch::nn::ModuleHolder<MultiModalNetImpl<Parts...>> {
 public:
  using Impl = MultiModalNetImpl<Parts...>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  MultiModalNet(typename Impl::Branches branches, std::vector<FusionTap<typename Impl::Fusion>> taps)
      : torch::nn::ModuleHolder<Impl>(std::make_shared<Impl>(std::move(branches), std::move(taps))) {}

  /// Two branches.
  MultiModalNet(std::tuple_element_t<0, typename Impl::Branches> branch0,
                std::tuple_element_t<1, typename Impl::Branches> branch1,
                std::vector<FusionTap<typename Impl::Fusion>> taps)
    requires(Impl::kBranches == 2)
      : torch::nn::ModuleHolder<Impl>(
            std::make_shared<Impl>(std::move(branch0), std::move(branch1), std::move(taps))) {}

  /// A deep copy as a handle of the same type.
  MultiModalNet clone(const c10::optional<at::Device>& device = c10::nullopt) const {
    return MultiModalNet(std::dynamic_pointer_cast<Impl>(this->get()->clone(device)));
  }
};

/// What the library's parts take as a network (the `Balancer`, `DataParallel`,
/// `head_losses`): a `MultiModalNet` handle, or your own handle with these members.
template <class Net>
concept MultiModalModel = requires(Net net, const std::vector<at::Tensor>& x, StepPlan plan) {
  { net->forward(x, plan) } -> std::same_as<NetOutput>;
  { net->num_branches() } -> std::convertible_to<std::size_t>;
  { net->parameter_groups() } -> std::same_as<ParameterGroups>;
  { net->gate_means() } -> std::same_as<std::vector<RunningMean>>;
  { net->squeeze_means() } -> std::same_as<std::vector<RunningMean>>;
  { *net } -> std::convertible_to<torch::nn::Module&>;  // parameters, modes, save, load
};

/// What the utilization probe takes: a `MultiModalModel` that also runs the cut networks
/// f_k' (`forward_probe`) from recorded squeeze averages.
template <class Net>
concept ProbeableModel = MultiModalModel<Net> && requires(Net net, const std::vector<at::Tensor>& x) {
  { net->forward_probe(x) } -> std::same_as<ProbeOutput>;
  { net->record_squeeze(x) } -> std::same_as<NetOutput>;
  { net->has_squeeze_averages() } -> std::same_as<bool>;
  { net->reset_squeeze_averages() };
};

template <class Fusion, class... Branches>
using NWayMultiModalNet [[deprecated("use MultiModalNet<Branches..., Fusion>")]] =
    MultiModalNet<Branches..., Fusion>;
template <class Fusion>
using NWayFusionTap [[deprecated("use FusionTap")]] = FusionTap<Fusion>;
using NWayOutput [[deprecated("use NetOutput")]] = NetOutput;
using NWayProbeOutput [[deprecated("use ProbeOutput")]] = ProbeOutput;
using NWayParameterGroups [[deprecated("use ParameterGroups")]] = ParameterGroups;

}  // namespace mmbalance
