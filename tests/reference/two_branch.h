#pragma once
// The two-branch network and MMTM as they were before the N-branch code became the only
// implementation (mmbalance at 23cfc7b, include/mmbalance/model/multimodal_net.h and
// fusion/mmtm.h, renamed): the reference the equivalence tests hold the N = 2 case to, bit
// for bit. Test code only; not maintained beyond what those tests call.

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "mmbalance/detail/channel_gating.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/fusion_module.h"
#include "mmbalance/fusion/running_mean.h"
#include "mmbalance/model/eval_mode.h"
#include "mmbalance/model/step_kind.h"

namespace mmbalance::testing::reference {

// The two-branch fusion context.
struct TwoBranchContext {
  SideMode side0 = SideMode::live;
  SideMode side1 = SideMode::live;
  /// Only for modules that declare `static constexpr bool handles_live_rows = true`: the
  /// leading `live_rows` rows of the batch run live on both sides whatever the side modes
  /// say (the probe stacks [x; x] and gets the normal and the cut network from one pass).
  /// Always 0 for other modules.
  std::int64_t live_rows = 0;
  /// A regular step in training mode: stage this batch's gates into the gate mean (the
  /// balancer commits them if it accepts the step).
  bool stage_gates = false;
  /// The probe's pass over the training set: stage this batch's squeeze vectors into the
  /// squeeze mean (the probe commits them).
  bool record_squeeze = false;
};

struct OldMMTMOptions {
  OldMMTMOptions(std::int64_t dim0, std::int64_t dim1) : dim0_(dim0), dim1_(dim1) {}
  /// Channels of branch 0 at the tap.
  TORCH_ARG(std::int64_t, dim0);
  /// Channels of branch 1 at the tap.
  TORCH_ARG(std::int64_t, dim1);
  /// The joint layer has 2 (dim0 + dim1) / ratio units.
  TORCH_ARG(std::int64_t, ratio) = 4;
  /// Gate = gate_scale * sigmoid(E). The paper writes 2 (App. A.1), the official code 1.
  TORCH_ARG(double, gate_scale) = 2.0;
};

class TwoBranchMMTMImpl : public torch::nn::Cloneable<TwoBranchMMTMImpl> {
 public:
  /// MMTM honours `FusionContext::live_rows`, so the probe can evaluate the normal and the
  /// cut network in one stacked pass.
  static constexpr bool handles_live_rows = true;

  TwoBranchMMTMImpl(std::int64_t dim0, std::int64_t dim1, std::int64_t ratio = 4, double gate_scale = 2.0)
      : options(dim0, dim1) {
    options.ratio(ratio).gate_scale(gate_scale);
    reset();
  }

  void reset() override {
    TORCH_CHECK(options.dim0() > 0 && options.dim1() > 0,
                "MMTM: channel counts must be positive, got dim0=", options.dim0(),
                " dim1=", options.dim1());
    TORCH_CHECK(options.ratio() > 0, "MMTM: ratio must be positive, got ", options.ratio());
    const std::int64_t joint = options.dim0() + options.dim1();
    const std::int64_t hidden = 2 * joint / options.ratio();
    TORCH_CHECK(hidden > 0, "MMTM: 2*(dim0+dim1)/ratio = 2*", joint, "/", options.ratio(),
                " is 0; lower the ratio");
    squeeze = register_module("squeeze", torch::nn::Linear(joint, hidden));
    excite0 = register_module("excite0", torch::nn::Linear(hidden, options.dim0()));
    excite1 = register_module("excite1", torch::nn::Linear(hidden, options.dim1()));
    gate_mean = register_module("gate_mean", RunningMean(joint, options.gate_scale() * 0.5));
    squeeze_mean = register_module("squeeze_mean", RunningMean(joint));
  }

  /// Returns the gated activations of branch 0 and branch 1.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& a, const at::Tensor& b,
                                            const TwoBranchContext& ctx = {}) {
    TORCH_CHECK(ctx.side0 != SideMode::absent && ctx.side1 != SideMode::absent,
                "MMTM: a missing modality (SideMode::absent) needs an N-way module (NWayMMTM)");
    check_inputs(a, b);
    const std::int64_t n = a.size(0);
    TORCH_CHECK(ctx.live_rows >= 0 && ctx.live_rows <= n, "MMTM: live_rows=", ctx.live_rows,
                " is outside the batch of ", n);
    const at::Tensor s_a = detail::squeeze_spatial(a);
    const at::Tensor s_b = detail::squeeze_spatial(b);
    if (ctx.record_squeeze) squeeze_mean->stage(at::cat({s_a, s_b}, 1).detach());

    // Each side's gate reads [S_A, S_B]; in averaged-squeeze mode the other side's part
    // is the training-set average (rows past live_rows only).
    using detail::average_rows;
    const at::Tensor b_for_gate0 = ctx.side0 == SideMode::averaged_squeeze
                                       ? average_rows(s_b, squeeze_average(1), s_b, ctx.live_rows)
                                       : s_b;
    const at::Tensor a_for_gate1 = ctx.side1 == SideMode::averaged_squeeze
                                       ? average_rows(s_a, squeeze_average(0), s_a, ctx.live_rows)
                                       : s_a;
    const bool shared_joint = ctx.side0 != SideMode::averaged_squeeze &&
                              ctx.side1 != SideMode::averaged_squeeze;
    at::Tensor z0, z1;
    if (shared_joint) {
      z0 = z1 = joint(s_a, s_b);
    } else {
      z0 = joint(s_a, b_for_gate0);
      z1 = joint(a_for_gate1, s_b);
    }

    const bool needs_live0 = ctx.side0 != SideMode::held_gate || ctx.live_rows > 0;
    const bool needs_live1 = ctx.side1 != SideMode::held_gate || ctx.live_rows > 0;
    at::Tensor gate0 = needs_live0 ? gate(excite0, z0) : at::Tensor();
    at::Tensor gate1 = needs_live1 ? gate(excite1, z1) : at::Tensor();

    if (ctx.stage_gates) {
      TORCH_CHECK(ctx.side0 == SideMode::live && ctx.side1 == SideMode::live,
                  "MMTM: gates are only staged in regular steps (both sides live)");
      gate_mean->stage(at::cat({gate0, gate1}, 1).detach());
    }
    if (ctx.side0 == SideMode::held_gate) gate0 = average_rows(gate0, gate_average(0), a, ctx.live_rows);
    if (ctx.side1 == SideMode::held_gate) gate1 = average_rows(gate1, gate_average(1), b, ctx.live_rows);
    return {a * detail::broadcastable(gate0, a), b * detail::broadcastable(gate1, b)};
  }

  /// Channels expected from branch `side`.
  std::int64_t channels(int side) const {
    check_side(side);
    return side == 0 ? options.dim0() : options.dim1();
  }

  /// Parameters on the path into branch `side`: the shared joint layer and that side's
  /// excitation (docs/algorithm.md §3).
  std::vector<at::Tensor> side_parameters(int side) const {
    check_side(side);
    std::vector<at::Tensor> out = squeeze->parameters();
    for (const auto& p : (side == 0 ? excite0 : excite1)->parameters()) out.push_back(p);
    return out;
  }

  /// Side `side`'s part of the committed gate mean (a view, double).
  at::Tensor gate_average(int side) const { return side_part(gate_mean->mean, side); }

  /// Side `side`'s part of the committed squeeze mean (a view, double).
  at::Tensor squeeze_average(int side) const { return side_part(squeeze_mean->mean, side); }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::MMTM(dim0=" << options.dim0() << ", dim1=" << options.dim1()
           << ", ratio=" << options.ratio() << ", gate_scale=" << options.gate_scale() << ")";
  }

  OldMMTMOptions options;
  torch::nn::Linear squeeze{nullptr}, excite0{nullptr}, excite1{nullptr};
  RunningMean gate_mean{nullptr}, squeeze_mean{nullptr};

 private:
  static void check_side(int side) {
    TORCH_CHECK(side == 0 || side == 1, "MMTM: side must be 0 or 1, got ", side);
  }

  void check_inputs(const at::Tensor& a, const at::Tensor& b) const {
    TORCH_CHECK(a.dim() >= 2 && b.dim() >= 2, "MMTM: inputs must be (batch, channels, ...), got ",
                detail::shape_string(a), " and ", detail::shape_string(b));
    TORCH_CHECK(a.size(0) == b.size(0), "MMTM: batch sizes differ: branch 0 has ", a.size(0),
                ", branch 1 has ", b.size(0));
    TORCH_CHECK(a.size(1) == options.dim0(), "MMTM: branch 0 has ", a.size(1),
                " channels at this tap, the module expects dim0=", options.dim0());
    TORCH_CHECK(b.size(1) == options.dim1(), "MMTM: branch 1 has ", b.size(1),
                " channels at this tap, the module expects dim1=", options.dim1());
  }

  at::Tensor joint(const at::Tensor& s_a, const at::Tensor& s_b) {
    return at::relu(squeeze->forward(at::cat({s_a, s_b}, 1)));
  }

  at::Tensor gate(torch::nn::Linear& excite, const at::Tensor& z) const {
    return at::sigmoid(excite->forward(z)) * options.gate_scale();
  }

  at::Tensor side_part(const at::Tensor& both, int side) const {
    check_side(side);
    return side == 0 ? both.narrow(0, 0, options.dim0()) : both.narrow(0, options.dim0(), options.dim1());
  }
};

TORCH_MODULE(TwoBranchMMTM);

/// A fusion module placed after stage `stage` of both branches.
template <class Fusion>
struct TwoBranchTap {
  std::size_t stage;
  Fusion module;
};

/// Class logits of one forward pass: `y = (y0 + y1) / 2`.
struct TwoBranchOutput {
  at::Tensor y, y0, y1;
};

/// Logits of the utilization probe's pass: the normal heads and the cut ones, where branch
/// 0 sees only m0 (`y0_cut`, f0') and branch 1 sees only m1 (`y1_cut`, f1').
struct TwoBranchProbeOutput {
  at::Tensor y0, y1, y0_cut, y1_cut;
};

/// The four parameter groups of docs/algorithm.md §3. The fusion groups share the parameters
/// every path goes through (MMTM's joint layer).
struct TwoBranchGroups {
  std::vector<at::Tensor> theta0, theta1, theta0_fusion, theta1_fusion;
};

/// Two branches (satisfying `Branch`) and fusion modules (satisfying `FusionModule`) at
/// strictly increasing stage indices. Both branches need the same number of stages.
template <class Branch0, class Branch1, class Fusion>
class TwoBranchNetImpl : public torch::nn::Module {
 public:
  using Tap = TwoBranchTap<Fusion>;

  TwoBranchNetImpl(Branch0 branch0_in, Branch1 branch1_in, std::vector<Tap> taps_in)
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
  TwoBranchOutput forward(const at::Tensor& x0, const at::Tensor& x1,
                      StepKind kind = StepKind::regular) {
    check_batch(x0, x1);
    TwoBranchContext ctx;
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
  TwoBranchProbeOutput forward_probe(const at::Tensor& x0, const at::Tensor& x1) {
    check_batch(x0, x1);
    TORCH_CHECK(!is_training(), "MultiModalNet::forward_probe needs eval mode (call eval())");
    const std::int64_t n = x0.size(0);
    const std::size_t shared = taps.empty() ? branch0->num_stages() : taps.front().stage + 1;
    at::Tensor h0 = x0, h1 = x1;
    for (std::size_t i = 0; i < shared; ++i) {
      h0 = branch0->forward_stage(i, h0);
      h1 = branch1->forward_stage(i, h1);
    }
    TwoBranchContext cut;
    cut.side0 = cut.side1 = SideMode::averaged_squeeze;
    if constexpr (true) {
      cut.live_rows = n;
      auto [y0, y1] = run(at::cat({h0, h0}, 0), at::cat({h1, h1}, 0), cut, shared);
      return {y0.narrow(0, 0, n), y1.narrow(0, 0, n), y0.narrow(0, n, n), y1.narrow(0, n, n)};
    } else {
      auto [y0, y1] = run(h0, h1, TwoBranchContext{}, shared);
      auto [y0_cut, y1_cut] = run(h0, h1, cut, shared);
      return {std::move(y0), std::move(y1), std::move(y0_cut), std::move(y1_cut)};
    }
  }

  /// A live pass that stages the squeeze vectors into the fusion modules' squeeze means
  /// (the probe commits them after its pass over the training set).
  TwoBranchOutput record_squeeze(const at::Tensor& x0, const at::Tensor& x1) {
    check_batch(x0, x1);
    TwoBranchContext ctx;
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
  TwoBranchGroups parameter_groups() const {
    TwoBranchGroups groups{branch0->parameters(), branch1->parameters(), {}, {}};
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
    auto copy = std::make_shared<TwoBranchNetImpl>(clone_holder(branch0, device),
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

  static TwoBranchOutput output(std::pair<at::Tensor, at::Tensor> heads) {
    auto& [y0, y1] = heads;
    return {(y0 + y1) * 0.5, std::move(y0), std::move(y1)};
  }

  // Stages [computed, end) of both branches, each followed by its fusion tap, then the
  // heads. Stages before `computed` were run by the caller; their taps still apply here.
  std::pair<at::Tensor, at::Tensor> run(at::Tensor h0, at::Tensor h1, const TwoBranchContext& ctx,
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

// The two-branch utilization probe of before (metrics/utilization_probe.h).
struct TwoBranchReport {
  double accuracy = NAN;       ///< A(f): y = (y0 + y1) / 2
  double accuracy0 = NAN;      ///< A(f0): head y0
  double accuracy0_cut = NAN;  ///< A(f0'): head y0 with m1 cut off
  double accuracy1 = NAN;      ///< A(f1)
  double accuracy1_cut = NAN;  ///< A(f1')
  double u_m1_given_m0 = NAN;  ///< (A(f0) - A(f0')) / A(f0): what m1 adds to branch 0
  double u_m0_given_m1 = NAN;  ///< (A(f1) - A(f1')) / A(f1)
  double d_util = NAN;         ///< u(m1|m0) - u(m0|m1), in [-1, 1]
  std::int64_t samples = 0;    ///< evaluation samples
};

template <class Net, class TrainData>
void record_two_branch(Net& net, const TrainData& train) {
  const EvalModeGuard<Net> eval_mode(net);
  const at::Device device = net->parameters().front().device();
  net->reset_squeeze_averages();
  for (const auto& batch : train) {
    net->record_squeeze(batch.x0.to(device), batch.x1.to(device));
  }
  for (RunningMean m : net->squeeze_means()) m->commit();
}

template <class Net, class EvalData>
TwoBranchReport evaluate_two_branch(Net& net, const EvalData& eval) {
  const EvalModeGuard<Net> eval_mode(net);
  TORCH_CHECK(net->has_squeeze_averages(),
              "evaluate_utilization: no squeeze averages recorded; run record_squeeze_averages "
              "over the training data first");
  const at::Device device = net->parameters().front().device();
  // correct predictions of y, y0, y0', y1, y1', then the sample count
  at::Tensor correct = at::zeros({6}, at::TensorOptions(at::kLong).device(device));
  for (const auto& batch : eval) {
    const at::Tensor target = batch.target.to(device);
    const auto out = net->forward_probe(batch.x0.to(device), batch.x1.to(device));
    TORCH_CHECK(target.dim() == 1 && target.size(0) == out.y0.size(0),
                "evaluate_utilization: target must be (batch) class indices with batch ",
                out.y0.size(0), ", got ", detail::shape_string(target));
    const at::Tensor logits =
        at::stack({(out.y0 + out.y1) * 0.5, out.y0, out.y0_cut, out.y1, out.y1_cut});
    correct.narrow(0, 0, 5).add_(logits.argmax(-1).eq(target.unsqueeze(0)).sum(1));
    correct.narrow(0, 5, 1).add_(target.size(0));
  }
  const at::Tensor counts = correct.to(at::kCPU);
  const std::int64_t samples = counts.data_ptr<std::int64_t>()[5];
  TORCH_CHECK(samples > 0, "evaluate_utilization: the evaluation data is empty");

  const at::Tensor host = counts.narrow(0, 0, 5).to(at::kDouble) / static_cast<double>(samples);
  const double* a = host.data_ptr<double>();
  TwoBranchReport r;
  r.samples = samples;
  r.accuracy = a[0];
  r.accuracy0 = a[1];
  r.accuracy0_cut = a[2];
  r.accuracy1 = a[3];
  r.accuracy1_cut = a[4];
  r.u_m1_given_m0 = r.accuracy0 > 0 ? (r.accuracy0 - r.accuracy0_cut) / r.accuracy0 : NAN;
  r.u_m0_given_m1 = r.accuracy1 > 0 ? (r.accuracy1 - r.accuracy1_cut) / r.accuracy1 : NAN;
  r.d_util = r.u_m1_given_m0 - r.u_m0_given_m1;
  return r;
}

}  // namespace mmbalance::testing::reference
