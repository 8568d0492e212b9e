#pragma once
// A fusion module of your own, complete: each branch's channels are gated by a sigmoid of
// the concatenated squeeze vectors of both branches (no joint layer, unlike MMTM). Copy it
// and change `forward`; docs/concepts.md walks through it.
//
//   using Net = mmbalance::MultiModalNet<mmbalance::ConvBranch, mmbalance::ConvBranch, ConcatGate>;
//   Net net(branch0, branch1, {{1, ConcatGate(64, 64)}, {2, ConcatGate(128, 128)}});

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <mmbalance/mmbalance.h>

class ConcatGateImpl : public torch::nn::Cloneable<ConcatGateImpl> {
 public:
  ConcatGateImpl(std::int64_t dim0, std::int64_t dim1) : dim0_(dim0), dim1_(dim1) { reset(); }

  void reset() override {
    gate0 = register_module("gate0", torch::nn::Linear(dim0_ + dim1_, dim0_));
    gate1 = register_module("gate1", torch::nn::Linear(dim0_ + dim1_, dim1_));
    // Before any regular step a re-balancing step holds the gate at sigmoid(0) = 0.5.
    gate_mean = register_module("gate_mean", mmbalance::RunningMean(dim0_ + dim1_, 0.5));
    squeeze_mean = register_module("squeeze_mean", mmbalance::RunningMean(dim0_ + dim1_));
  }

  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& a, const at::Tensor& b,
                                            const mmbalance::FusionContext& ctx = {}) {
    using mmbalance::SideMode;
    const at::Tensor sa = a.flatten(2).mean(-1), sb = b.flatten(2).mean(-1);
    // The utilization probe's pass over the training set.
    if (ctx.record_squeeze) squeeze_mean->stage(at::cat({sa, sb}, 1).detach());
    // The probe's cut network: a side's gate sees the other side's training-set average
    // (the running means are double whatever the model's dtype).
    const at::Tensor sb_for_0 =
        ctx.side0 == SideMode::averaged_squeeze
            ? squeeze_mean->mean.narrow(0, dim0_, dim1_).to(sb.dtype()).expand_as(sb)
            : sb;
    const at::Tensor sa_for_1 =
        ctx.side1 == SideMode::averaged_squeeze
            ? squeeze_mean->mean.narrow(0, 0, dim0_).to(sa.dtype()).expand_as(sa)
            : sa;
    at::Tensor g0 = torch::sigmoid(gate0(at::cat({sa, sb_for_0}, 1)));
    at::Tensor g1 = torch::sigmoid(gate1(at::cat({sa_for_1, sb}, 1)));
    // A regular training step: the balancer commits these if it accepts the step.
    if (ctx.stage_gates) gate_mean->stage(at::cat({g0, g1}, 1).detach());
    // A re-balancing step: the held side gets the average gate of the regular steps.
    if (ctx.side0 == SideMode::held_gate) {
      g0 = gate_mean->mean.narrow(0, 0, dim0_).to(g0.dtype()).expand_as(g0);
    }
    if (ctx.side1 == SideMode::held_gate) {
      g1 = gate_mean->mean.narrow(0, dim0_, dim1_).to(g1.dtype()).expand_as(g1);
    }
    return {a * per_channel(g0, a), b * per_channel(g1, b)};
  }

  std::int64_t channels(int side) const { return side == 0 ? dim0_ : dim1_; }

  // The parameters on the path into `side` (θ0' or θ1'): that side's gate layer.
  std::vector<at::Tensor> side_parameters(int side) const {
    return (side == 0 ? gate0 : gate1)->parameters();
  }

  torch::nn::Linear gate0{nullptr}, gate1{nullptr};
  mmbalance::RunningMean gate_mean{nullptr}, squeeze_mean{nullptr};

 private:
  // (batch, channels) -> (batch, channels, 1, ...) to scale x's channels.
  static at::Tensor per_channel(const at::Tensor& gate, const at::Tensor& x) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
    shape[0] = gate.size(0);
    shape[1] = gate.size(1);
    return gate.reshape(shape);
  }

  std::int64_t dim0_, dim1_;
};
TORCH_MODULE(ConcatGate);
