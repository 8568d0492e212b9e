#pragma once
/// \file
/// MMTM, the multi-modal transfer module (Joze et al. 2020; algorithm.md §2).

#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/fusion/fusion_context.h"
#include "mmbalance/fusion/fusion_module.h"

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
/// Buffers (saved, loaded and moved with the module):
/// - `gate_average0/1`: sample-weighted running mean of each side's gate over the regular
///   training steps, used by re-balancing steps. Before any regular step it holds the gate
///   of a zero excitation (gate_scale / 2), so a re-balancing step is well defined.
/// - `gate_samples`: samples folded into the gate averages.
/// - `squeeze_average0/1`, `squeeze_samples`: training-set mean of each side's squeeze
///   vector, recorded by the utilization probe.
///
/// Both averages can be read and written as sums (`take_pending_gate_sums`,
/// `fold_gate_sums`, `squeeze_sums`, `set_squeeze_sums`), which is how distributed
/// training makes them what one process with the combined batches would compute.
class MMTMImpl : public torch::nn::Cloneable<MMTMImpl> {
 public:
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
    const double neutral_gate = options.gate_scale() * 0.5;
    gate_average0 = register_buffer("gate_average0", at::full({options.dim0()}, neutral_gate));
    gate_average1 = register_buffer("gate_average1", at::full({options.dim1()}, neutral_gate));
    gate_samples = register_buffer("gate_samples", at::zeros({}, at::kDouble));
    squeeze_average0 = register_buffer("squeeze_average0", at::zeros({options.dim0()}));
    squeeze_average1 = register_buffer("squeeze_average1", at::zeros({options.dim1()}));
    squeeze_samples = register_buffer("squeeze_samples", at::zeros({}, at::kDouble));
    before_last_update_.clear();
  }

  /// Returns the gated activations of branch 0 and branch 1.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& a, const at::Tensor& b,
                                            const FusionContext& ctx = {}) {
    check_inputs(a, b);
    const std::int64_t n = a.size(0);
    TORCH_CHECK(ctx.live_rows >= 0 && ctx.live_rows <= n, "MMTM: live_rows=", ctx.live_rows,
                " is outside the batch of ", n);
    const at::Tensor s_a = squeeze_spatial(a);
    const at::Tensor s_b = squeeze_spatial(b);
    if (ctx.record_squeeze) record_squeeze(s_a, s_b);

    // Each side's gate reads [S_A, S_B]; in averaged-squeeze mode the other side's part
    // is the training-set average (rows past live_rows only).
    const at::Tensor b_for_gate0 =
        ctx.side0 == SideMode::averaged_squeeze ? with_average(s_b, squeeze_average1, ctx.live_rows)
                                                : s_b;
    const at::Tensor a_for_gate1 =
        ctx.side1 == SideMode::averaged_squeeze ? with_average(s_a, squeeze_average0, ctx.live_rows)
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

    if (ctx.update_gate_average && is_training()) {
      TORCH_CHECK(ctx.side0 == SideMode::live && ctx.side1 == SideMode::live,
                  "MMTM: gate averages are only updated by regular steps");
      const at::Tensor sums = batch_gate_sums(gate0, gate1);
      if (ctx.defer_gate_update) {
        pending_gate_sums_ = pending_gate_sums_.defined() ? pending_gate_sums_ + sums : sums;
      } else {
        fold_gate_sums(sums);
      }
    }
    if (ctx.side0 == SideMode::held_gate) gate0 = held(gate0, gate_average0, n, ctx.live_rows);
    if (ctx.side1 == SideMode::held_gate) gate1 = held(gate1, gate_average1, n, ctx.live_rows);
    return {a * broadcastable(gate0, a), b * broadcastable(gate1, b)};
  }

  /// Channels expected from branch `side`.
  std::int64_t channels(int side) const {
    check_side(side);
    return side == 0 ? options.dim0() : options.dim1();
  }

  /// Parameters on the path into branch `side`: the shared joint layer and that side's
  /// excitation (algorithm.md §3).
  std::vector<at::Tensor> side_parameters(int side) const {
    check_side(side);
    std::vector<at::Tensor> out = squeeze->parameters();
    for (const auto& p : (side == 0 ? excite0 : excite1)->parameters()) out.push_back(p);
    return out;
  }

  void reset_squeeze_average() {
    at::NoGradGuard no_grad;
    squeeze_average0.zero_();
    squeeze_average1.zero_();
    squeeze_samples.zero_();
  }

  /// Samples recorded in the squeeze averages (reads one number from the device).
  std::int64_t squeeze_average_samples() const {
    return static_cast<std::int64_t>(squeeze_samples.item<double>());
  }

  /// Gate sums of the regular steps run with `FusionContext::defer_gate_update` since the
  /// last call, as [sum of gate0 over samples, sum of gate1, samples]; zeros if none.
  /// Distributed training adds these up across ranks and folds the total.
  at::Tensor take_pending_gate_sums() {
    at::Tensor out = pending_gate_sums_.defined()
                         ? std::move(pending_gate_sums_)
                         : at::zeros({options.dim0() + options.dim1() + 1}, gate_average0.options());
    pending_gate_sums_ = at::Tensor();
    return out;
  }

  /// Folds gate sums laid out as `take_pending_gate_sums` returns them into the running
  /// averages: avg += (sum / n - avg) * n / (samples + n). Sums of zero samples change
  /// nothing. No host read. `discard_last_gate_update` undoes the last fold.
  void fold_gate_sums(const at::Tensor& sums) {
    const std::int64_t d0 = options.dim0(), d1 = options.dim1();
    TORCH_CHECK(sums.dim() == 1 && sums.size(0) == d0 + d1 + 1, "MMTM::fold_gate_sums: expected ",
                d0 + d1 + 1, " values (dim0 + dim1 + 1), got ", detail::shape_string(sums));
    at::NoGradGuard no_grad;
    before_last_update_ = {gate_average0.clone(), gate_average1.clone(), gate_samples.clone()};
    const at::Tensor n = sums.narrow(0, d0 + d1, 1);
    gate_samples.add_(n.to(gate_samples.dtype()).squeeze(0));
    // With n = 0 the weight is 0 and the clamps keep 0/0 out.
    const at::Tensor weight = (n.to(at::kDouble) / gate_samples.clamp_min(1)).to(gate_average0.dtype());
    const at::Tensor mean = sums.narrow(0, 0, d0 + d1) / n.clamp_min(1);
    gate_average0.add_((mean.narrow(0, 0, d0) - gate_average0) * weight);
    gate_average1.add_((mean.narrow(0, d0, d1) - gate_average1) * weight);
  }

  /// The squeeze averages as sums, [avg0 * samples, avg1 * samples, samples], so that
  /// several ranks' averages can be added up and restored with `set_squeeze_sums`.
  at::Tensor squeeze_sums() const {
    const at::Tensor samples = squeeze_samples.to(squeeze_average0.dtype()).reshape({1});
    return at::cat({squeeze_average0 * samples, squeeze_average1 * samples, samples});
  }

  /// Sets the squeeze averages from sums laid out as `squeeze_sums` returns them.
  void set_squeeze_sums(const at::Tensor& sums) {
    const std::int64_t d0 = options.dim0(), d1 = options.dim1();
    TORCH_CHECK(sums.dim() == 1 && sums.size(0) == d0 + d1 + 1, "MMTM::set_squeeze_sums: expected ",
                d0 + d1 + 1, " values (dim0 + dim1 + 1), got ", detail::shape_string(sums));
    at::NoGradGuard no_grad;
    const at::Tensor n = sums.narrow(0, d0 + d1, 1);
    const at::Tensor mean = sums.narrow(0, 0, d0 + d1) / n.clamp_min(1);
    squeeze_average0.copy_(mean.narrow(0, 0, d0));
    squeeze_average1.copy_(mean.narrow(0, d0, d1));
    squeeze_samples.copy_(n.squeeze(0));
  }

  /// Restores the gate averages as they were before the last regular training step.
  void discard_last_gate_update() {
    pending_gate_sums_ = at::Tensor();
    if (before_last_update_.empty()) return;
    at::NoGradGuard no_grad;
    gate_average0.copy_(before_last_update_[0]);
    gate_average1.copy_(before_last_update_[1]);
    gate_samples.copy_(before_last_update_[2]);
    before_last_update_.clear();
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::MMTM(dim0=" << options.dim0() << ", dim1=" << options.dim1()
           << ", ratio=" << options.ratio() << ", gate_scale=" << options.gate_scale() << ")";
  }

  MMTMOptions options;
  torch::nn::Linear squeeze{nullptr}, excite0{nullptr}, excite1{nullptr};
  at::Tensor gate_average0, gate_average1, gate_samples;
  at::Tensor squeeze_average0, squeeze_average1, squeeze_samples;

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

  static at::Tensor squeeze_spatial(const at::Tensor& x) {
    return x.dim() == 2 ? x : x.flatten(2).mean(-1);
  }

  at::Tensor joint(const at::Tensor& s_a, const at::Tensor& s_b) {
    return at::relu(squeeze->forward(at::cat({s_a, s_b}, 1)));
  }

  at::Tensor gate(torch::nn::Linear& excite, const at::Tensor& z) const {
    return at::sigmoid(excite->forward(z)) * options.gate_scale();
  }

  static at::Tensor with_average(const at::Tensor& s, const at::Tensor& average,
                                 std::int64_t live_rows) {
    const std::int64_t n = s.size(0);
    const at::Tensor cut = average.to(s.dtype()).unsqueeze(0).expand({n - live_rows, -1});
    return live_rows == 0 ? cut : at::cat({s.narrow(0, 0, live_rows), cut}, 0);
  }

  static at::Tensor held(const at::Tensor& live_gate, const at::Tensor& average, std::int64_t n,
                         std::int64_t live_rows) {
    const at::Tensor dtype_src = live_gate.defined() ? live_gate : average;
    const at::Tensor cut = average.to(dtype_src.dtype()).unsqueeze(0).expand({n - live_rows, -1});
    return live_rows == 0 ? cut : at::cat({live_gate.narrow(0, 0, live_rows), cut}, 0);
  }

  static at::Tensor broadcastable(const at::Tensor& gate, const at::Tensor& x) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
    shape[0] = gate.size(0);
    shape[1] = gate.size(1);
    return gate.view(shape);
  }

  // [sum of gate0, sum of gate1, n] over the batch; stays on the device.
  at::Tensor batch_gate_sums(const at::Tensor& gate0, const at::Tensor& gate1) const {
    at::NoGradGuard no_grad;
    const at::Tensor n = at::full({1}, static_cast<double>(gate0.size(0)), gate_average0.options());
    return at::cat({gate0.sum(0).to(n.dtype()), gate1.sum(0).to(n.dtype()), n});
  }

  void record_squeeze(const at::Tensor& s_a, const at::Tensor& s_b) {
    at::NoGradGuard no_grad;
    const auto n = static_cast<double>(s_a.size(0));
    squeeze_samples.add_(n);
    const at::Tensor weight = (n / squeeze_samples).to(squeeze_average0.dtype());
    squeeze_average0.add_((s_a.mean(0) - squeeze_average0) * weight);
    squeeze_average1.add_((s_b.mean(0) - squeeze_average1) * weight);
  }

  std::vector<at::Tensor> before_last_update_;
  at::Tensor pending_gate_sums_;
};

/// A `ModuleHolder` for `MMTMImpl`; satisfies `FusionModule`.
TORCH_MODULE(MMTM);

static_assert(DistributedFusionModule<MMTM>);

}  // namespace mmbalance
