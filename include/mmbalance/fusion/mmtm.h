#pragma once
/// \file
/// MMTM, the multi-modal transfer module (Joze et al. 2020; docs/algorithm.md §2).

#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/detail/channel_gating.h"
#include "mmbalance/detail/check.h"
#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/fusion_module.h"
#include "mmbalance/fusion/running_mean.h"

namespace mmbalance {

/// Options for `MMTM`.
///
/// Example:
/// ```
/// MMTM mmtm(MMTMOptions(64, 64).ratio(4).gate_scale(2.0));
/// ```
struct MMTMOptions {
  MMTMOptions(std::int64_t dim0, std::int64_t dim1) : dim0_(dim0), dim1_(dim1) {}
  /// Channels of branch 0 at the tap.
  TORCH_ARG(std::int64_t, dim0);
  /// Channels of branch 1 at the tap.
  TORCH_ARG(std::int64_t, dim1);
  /// The joint layer has 2 (dim0 + dim1) / ratio units.
  TORCH_ARG(std::int64_t, ratio) = 4;
  /// Gate = gate_scale * sigmoid(E). The paper writes 2 (App. A.1), the official code 1.
  TORCH_ARG(double, gate_scale) = 2.0;
};

/// Squeezes both inputs over their spatial dimensions, computes a joint representation
/// Z = relu(W [S_A, S_B] + b) and gates each input channel-wise with
/// gate_scale * sigmoid(W_side Z + b_side).
///
/// Running means (`RunningMean` submodules, saved, loaded and moved with the module):
/// - `gate_mean` (dim0 + dim1 channels: side 0's gate, then side 1's): the sample-weighted
///   mean gate over the accepted regular training steps, used by re-balancing steps.
///   Before any commit it holds the gate of a zero excitation (gate_scale / 2), so a
///   re-balancing step is well defined.
/// - `squeeze_mean` (dim0 + dim1: S_A, then S_B): the training-set mean of the squeeze
///   vectors, recorded by the utilization probe.
/// The forward pass only stages rows into them; the balancer and the probe commit.
class MMTMImpl : public torch::nn::Cloneable<MMTMImpl> {
 public:
  /// MMTM honours `FusionContext::live_rows`, so the probe can evaluate the normal and the
  /// cut network in one stacked pass.
  static constexpr bool handles_live_rows = true;

  MMTMImpl(std::int64_t dim0, std::int64_t dim1) : MMTMImpl(MMTMOptions(dim0, dim1)) {}
  explicit MMTMImpl(const MMTMOptions& options) : options(options) { reset(); }

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
                                            const FusionContext& ctx = {}) {
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

  MMTMOptions options;
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

/// A `ModuleHolder` for `MMTMImpl`; satisfies `FusionModule`.
TORCH_MODULE(MMTM);

static_assert(FusionModule<MMTM>);

}  // namespace mmbalance
