#pragma once
/// \file
/// MMTM, the multi-modal transfer module (Joze et al. 2020; docs/algorithm.md §2), for any
/// number of branches (the paper defines it for N inputs).

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
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
/// MMTM mmtm(MMTMOptions(64, 64).ratio(4).gate_scale(2.0));   // two branches
/// MMTM mmtm3(MMTMOptions({64, 32, 16}));                     // three
/// ```
struct MMTMOptions {
  /// Two branches, with `dim0` and `dim1` channels at the tap.
  MMTMOptions(std::int64_t dim0, std::int64_t dim1) : dims_({dim0, dim1}) {}
  /// Any number of branches: the channels of each at the tap, in branch order.
  /* implicit */ MMTMOptions(std::vector<std::int64_t> dims) : dims_(std::move(dims)) {}
  /* implicit */ MMTMOptions(std::initializer_list<std::int64_t> dims) : dims_(dims) {}
  /// Channels of each branch at the tap, in branch order (at least two).
  TORCH_ARG(std::vector<std::int64_t>, dims);
  /// The joint layer has 2 (dims[0] + ... + dims[N-1]) / ratio units.
  TORCH_ARG(std::int64_t, ratio) = 4;
  /// Gate = gate_scale * sigmoid(E). The paper writes 2 (App. A.1), the official code 1.
  TORCH_ARG(double, gate_scale) = 2.0;
};

/// Squeezes every input over its spatial dimensions, computes one joint representation
/// Z = relu(W [S_0, ..., S_{N-1}] + b) and gates each input k channel-wise with
/// gate_scale * sigmoid(W_k Z + b_k).
///
/// Side modes (`FusionContext::side(k)`):
/// - live: side k's gate reads every branch's current squeeze vector;
/// - held_gate: side k's gate is its part of `gate_mean` (re-balancing of branch k);
/// - averaged_squeeze: side k's gate reads its own squeeze vector and every *other*
///   branch's training-set average squeeze (the probe's f_k');
/// - absent: modality k is missing; every other side's gate reads its training-set
///   average squeeze in its place, and side k has no output.
/// Running means (`RunningMean` submodules, saved, loaded and moved with the module), all
/// sides' channels in branch order:
/// - `gate_mean`: the sample-weighted mean gate over the accepted regular training steps,
///   used by re-balancing steps. Before any commit it holds the gate of a zero excitation
///   (gate_scale / 2), so a re-balancing step is well defined.
/// - `squeeze_mean`: the training-set mean of the squeeze vectors, recorded by the
///   utilization probe.
/// The forward pass only stages rows into them; the balancer and the probe commit.
class MMTMImpl : public torch::nn::Cloneable<MMTMImpl> {
 public:
  /// Honours `FusionContext::live_rows` (the probe's stacked pass).
  static constexpr bool handles_live_rows = true;

  MMTMImpl(std::int64_t dim0, std::int64_t dim1) : MMTMImpl(MMTMOptions(dim0, dim1)) {}
  explicit MMTMImpl(const MMTMOptions& options) : options(options) { reset(); }

  void reset() override {
    const auto& dims = options.dims();
    TORCH_CHECK(dims.size() >= 2, "MMTM: needs at least 2 branches, got ", dims.size());
    offsets_.assign(1, 0);
    for (std::size_t k = 0; k < dims.size(); ++k) {
      TORCH_CHECK(dims[k] > 0, "MMTM: channel counts must be positive, got dims[", k,
                  "]=", dims[k]);
      offsets_.push_back(offsets_.back() + dims[k]);
    }
    TORCH_CHECK(options.ratio() > 0, "MMTM: ratio must be positive, got ", options.ratio());
    const std::int64_t joint_dim = offsets_.back();
    const std::int64_t hidden = 2 * joint_dim / options.ratio();
    TORCH_CHECK(hidden > 0, "MMTM: 2*(sum of dims)/ratio = 2*", joint_dim, "/",
                options.ratio(), " is 0; lower the ratio");
    joint = register_module("joint", torch::nn::Linear(joint_dim, hidden));
    excite.clear();
    for (std::size_t k = 0; k < dims.size(); ++k) {
      excite.push_back(
          register_module("excite" + std::to_string(k), torch::nn::Linear(hidden, dims[k])));
    }
    gate_mean = register_module("gate_mean", RunningMean(joint_dim, options.gate_scale() * 0.5));
    squeeze_mean = register_module("squeeze_mean", RunningMean(joint_dim));
  }

  /// Returns the gated activations of every branch, in branch order (an undefined tensor
  /// for an absent side, whose input is ignored and may be undefined).
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs,
                                  const FusionContext& ctx = {}) {
    const std::size_t present = check_inputs(inputs, ctx);
    const std::size_t sides = num_inputs();
    const at::Tensor& reference = inputs[present];
    const std::int64_t n = reference.size(0);
    TORCH_CHECK(ctx.live_rows >= 0 && ctx.live_rows <= n, "MMTM: live_rows=", ctx.live_rows,
                " is outside the batch of ", n);
    std::vector<at::Tensor> squeezed;
    squeezed.reserve(sides);
    for (std::size_t k = 0; k < sides; ++k) {
      // A missing modality's squeeze is its training-set average, for every row.
      squeezed.push_back(ctx.side(k) == SideMode::absent
                             ? detail::average_rows({}, squeeze_average(k), reference, 0)
                             : detail::squeeze_spatial(inputs[k]));
    }
    if (ctx.record_squeeze) squeeze_mean->stage(at::cat(squeezed, 1).detach());

    // One joint representation for every side that reads live squeezes; an
    // averaged-squeeze side gets its own, with every other side's part averaged.
    at::Tensor shared_z;
    std::vector<at::Tensor> gates(sides);
    for (std::size_t k = 0; k < sides; ++k) {
      const SideMode mode = ctx.side(k);
      if (mode == SideMode::absent || (mode == SideMode::held_gate && ctx.live_rows == 0)) continue;
      at::Tensor z;
      if (mode == SideMode::averaged_squeeze) {
        std::vector<at::Tensor> cut = squeezed;
        for (std::size_t j = 0; j < sides; ++j) {
          if (j != k) {
            cut[j] = detail::average_rows(squeezed[j], squeeze_average(j), squeezed[j],
                                          ctx.live_rows);
          }
        }
        z = joint_representation(cut);
      } else {
        if (!shared_z.defined()) shared_z = joint_representation(squeezed);
        z = shared_z;
      }
      gates[k] = at::sigmoid(excite[k]->forward(z)) * options.gate_scale();
    }

    if (ctx.stage_gates) gate_mean->stage(at::cat(gates, 1).detach());
    std::vector<at::Tensor> out(sides);
    for (std::size_t k = 0; k < sides; ++k) {
      if (ctx.side(k) == SideMode::absent) continue;
      if (ctx.side(k) == SideMode::held_gate) {
        gates[k] = detail::average_rows(gates[k], gate_average(k), inputs[k], ctx.live_rows);
      }
      out[k] = inputs[k] * detail::broadcastable(gates[k], inputs[k]);
    }
    return out;
  }

  /// How many branches it joins.
  std::size_t num_inputs() const { return options.dims().size(); }

  /// Channels expected from branch `side`.
  std::int64_t channels(std::size_t side) const {
    check_side(side);
    return options.dims()[side];
  }

  /// Parameters on the path into branch `side` (θ_side'): the shared joint layer and that
  /// side's excitation.
  std::vector<at::Tensor> side_parameters(std::size_t side) const {
    check_side(side);
    std::vector<at::Tensor> out = joint->parameters();
    for (const auto& p : excite[side]->parameters()) out.push_back(p);
    return out;
  }

  /// Side `side`'s part of the committed gate mean (a view, double).
  at::Tensor gate_average(std::size_t side) const { return side_part(gate_mean->mean, side); }

  /// Side `side`'s part of the committed squeeze mean (a view, double).
  at::Tensor squeeze_average(std::size_t side) const {
    return side_part(squeeze_mean->mean, side);
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "mmbalance::MMTM(dims=[";
    for (std::size_t k = 0; k < num_inputs(); ++k) stream << (k ? ", " : "") << options.dims()[k];
    stream << "], ratio=" << options.ratio() << ", gate_scale=" << options.gate_scale() << ")";
  }

  /// Reads a state written by `save`; one written while the joint layer was registered as
  /// "squeeze" (up to mmbalance 2026-12-06, checkpoints included) reads as well.
  /// (As `torch::nn::Module::load`, with that one fallback.)
  void load(torch::serialize::InputArchive& archive) override {
    for (auto& p : named_parameters(/*recurse=*/false)) archive.read(p.key(), p.value());
    for (auto& b : named_buffers(/*recurse=*/false)) archive.read(b.key(), b.value(), /*is_buffer=*/true);
    for (const auto& child : named_children()) {
      if (!child.value()->is_serializable()) continue;
      torch::serialize::InputArchive nested;
      TORCH_CHECK(archive.try_read(child.key(), nested) ||
                      (child.key() == "joint" && archive.try_read("squeeze", nested)),
                  "MMTM: no '", child.key(), "' in the saved state");
      child.value()->load(nested);
    }
  }

  MMTMOptions options;
  /// The joint layer: Z = relu(W·[S_0, ..., S_{N-1}] + b) from every side's squeeze vector
  /// (the spatial means), shared by every side's excitation.
  torch::nn::Linear joint{nullptr};
  /// One excitation layer per side, registered as excite0, excite1, ...
  std::vector<torch::nn::Linear> excite;
  RunningMean gate_mean{nullptr}, squeeze_mean{nullptr};

 private:
  void check_side(std::size_t side) const {
    TORCH_CHECK(side < num_inputs(), "MMTM: side ", side, " is out of range; the module joins ",
                num_inputs(), " branches (sides 0..", num_inputs() - 1, ")");
  }

  // Checks the inputs against the modes; returns the index of the first present side.
  std::size_t check_inputs(const std::vector<at::Tensor>& inputs,
                           const FusionContext& ctx) const {
    TORCH_CHECK(inputs.size() == num_inputs(), "MMTM: got ", inputs.size(),
                " inputs, the module joins ", num_inputs(), " branches");
    TORCH_CHECK(ctx.sides.empty() || ctx.sides.size() == num_inputs(), "MMTM: the context has ",
                ctx.sides.size(), " side modes for ", num_inputs(), " branches");
    std::size_t first = inputs.size();
    bool absent = false;
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      if (ctx.side(k) == SideMode::absent) {
        absent = true;
        continue;
      }
      if (first == inputs.size()) first = k;
      const at::Tensor& x = inputs[k];
      TORCH_CHECK(x.defined() && x.dim() >= 2, "MMTM: input ", k,
                  " must be (batch, channels, ...), got ", detail::shape_string(x));
      TORCH_CHECK(x.size(0) == inputs[first].size(0), "MMTM: batch sizes differ: branch ",
                  first, " has ", inputs[first].size(0), ", branch ", k, " has ", x.size(0));
      TORCH_CHECK(x.size(1) == options.dims()[k], "MMTM: branch ", k, " has ", x.size(1),
                  " channels at this tap, the module expects dims[", k, "]=", options.dims()[k]);
    }
    TORCH_CHECK(first < inputs.size(), "MMTM: every side is absent; at least one modality "
                "must be present");
    for (std::size_t k = 0; ctx.stage_gates && k < inputs.size(); ++k) {
      TORCH_CHECK(ctx.side(k) == SideMode::live,
                  "MMTM: gates are only staged in regular steps (every side live), side ", k,
                  " is not");
    }
    TORCH_CHECK(!absent || (!ctx.record_squeeze && ctx.live_rows == 0),
                "MMTM: a pass with an absent side neither records squeeze vectors nor "
                "stacks live rows");
    return first;
  }

  at::Tensor joint_representation(const std::vector<at::Tensor>& squeezed) {
    return at::relu(joint->forward(at::cat(squeezed, 1)));
  }

  at::Tensor side_part(const at::Tensor& all, std::size_t side) const {
    check_side(side);
    return all.narrow(0, offsets_[side], options.dims()[side]);
  }

  // offsets_[k]: where side k's channels start in the concatenated squeeze/gate vectors.
  std::vector<std::int64_t> offsets_;
};

/// A `ModuleHolder` for `MMTMImpl`; satisfies `FusionModule`.
TORCH_MODULE(MMTM);

static_assert(FusionModule<MMTM>);

using NWayMMTMOptions [[deprecated("use MMTMOptions")]] = MMTMOptions;
using NWayMMTMImpl [[deprecated("use MMTMImpl")]] = MMTMImpl;
using NWayMMTM [[deprecated("use MMTM")]] = MMTM;

}  // namespace mmbalance
