// A fusion module written as a user would (examples/concat_gate_fusion.h): it satisfies
// FusionModule with a handful of members, trains through the Balancer, and the probe is
// right for it although it ignores FusionContext::live_rows.
#include <catch2/catch.hpp>

#include <concat_gate_fusion.h>

#include "support.h"

using namespace mmbalance;
using UserNet = MultiModalNet<ConvBranch, ConvBranch, ConcatGate>;

static_assert(FusionModule<ConcatGate>);
static_assert(!handles_live_rows<ConcatGate>());
static_assert(handles_live_rows<MMTM>());
static_assert(MultiModalModel<UserNet>);

namespace {

UserNet user_net(std::uint64_t seed) {
  torch::manual_seed(seed);
  auto opts = [](std::int64_t in) { return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}); };
  return UserNet(ConvBranch(opts(3)), ConvBranch(opts(1)),
                 {{0, ConcatGate(4, 4)}, {1, ConcatGate(8, 8)}});
}

// The cut heads computed the naive way: stage by stage, every fusion module told to cut.
std::pair<at::Tensor, at::Tensor> naive_cut(UserNet& net, const at::Tensor& x0, const at::Tensor& x1) {
  FusionContext cut;
  cut.sides = {SideMode::averaged_squeeze, SideMode::averaged_squeeze};
  at::Tensor h0 = x0, h1 = x1;
  std::size_t tap = 0;
  for (std::size_t i = 0; i < net->branch0->num_stages(); ++i) {
    h0 = net->branch0->forward_stage(i, h0);
    h1 = net->branch1->forward_stage(i, h1);
    if (tap < net->taps.size() && net->taps[tap].stages[0] == i) {
      std::tie(h0, h1) = mmbalance::testing::as_pair(net->taps[tap].module->forward({h0, h1}, cut));
      ++tap;
    }
  }
  return {net->branch0->head(h0), net->branch1->head(h1)};
}

}  // namespace

TEST_CASE("A user-written fusion module trains through the balancer", "[fusion_module]") {
  auto net = user_net(1);
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                          BalancerOptions().warmup_epochs(1));
  const auto fixed = mmbalance::testing::small_batch(16, 100);
  const auto loss_of = [&] {  // in eval mode: BatchNorm's running statistics
    torch::NoGradGuard ng;
    net->eval();
    const double loss = modality_specific_loss(net->forward(fixed.x0, fixed.x1), fixed.target).item<double>();
    net->train();
    return loss;
  };
  const double before = loss_of();
  std::vector<StepKind> kinds;
  for (int i = 0; i < 40; ++i) {
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(fixed.x0, fixed.x1, kind), fixed.target);
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
    kinds.push_back(kind);
    if ((i + 1) % 4 == 0) balancer.end_epoch();
  }
  CHECK(loss_of() < 0.8 * before);  // 2.16 -> 1.44 when written; two thirds re-balancing
  const auto& counts = balancer.total_step_counts();
  CHECK(counts[1] + counts[2] > 0);  // it re-balanced
  // Gate means: committed from the regular steps only, 16 rows each.
  for (auto& mean : net->gate_means()) CHECK(mean->samples.item<double>() == 16.0 * counts[0]);
  CHECK(std::isfinite(balancer.last_d_speed()));
}

TEST_CASE("The probe is right for a fusion module that ignores live_rows", "[fusion_module]") {
  auto net = user_net(2);
  std::vector<MultiModalBatch> train, eval;
  for (int i = 0; i < 3; ++i) train.push_back(mmbalance::testing::small_batch(8, 200 + i));
  for (int i = 0; i < 2; ++i) eval.push_back(mmbalance::testing::small_batch(8, 300 + i));
  const UtilizationReport r = probe_utilization(net, train, eval);

  // Expected counts from forward passes and the naive cut, batch by batch.
  net->eval();
  torch::NoGradGuard ng;
  double y0 = 0, y0_cut = 0, y1 = 0, y1_cut = 0;
  bool cut_differs = false;
  for (const auto& b : eval) {
    const auto out = net->forward(b.x0, b.x1);
    const auto [c0, c1] = naive_cut(net, b.x0, b.x1);
    cut_differs = cut_differs || !torch::allclose(c0, out.y0, 1e-4, 1e-5);
    y0 += out.y0.argmax(1).eq(b.target).sum().item<double>();
    y1 += out.y1.argmax(1).eq(b.target).sum().item<double>();
    y0_cut += c0.argmax(1).eq(b.target).sum().item<double>();
    y1_cut += c1.argmax(1).eq(b.target).sum().item<double>();
  }
  CHECK(cut_differs);  // the cut network is another network
  CHECK(r.samples == 16);
  CHECK(r.accuracy0 == y0 / 16);
  CHECK(r.accuracy1 == y1 / 16);
  CHECK(r.accuracy0_cut == y0_cut / 16);
  CHECK(r.accuracy1_cut == y1_cut / 16);
}

TEST_CASE("The user-written fusion module joins three branches and runs with a modality missing",
          "[fusion_module]") {
  using Net3 = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, ConcatGate>;
  torch::manual_seed(3);
  auto opts = [](std::int64_t in) { return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}); };
  Net3 net(std::tuple{ConvBranch(opts(3)), ConvBranch(opts(1)), ConvBranch(opts(2))},
           {{1, ConcatGate(std::vector<std::int64_t>{8, 8, 8})}});
  auto gen = at::detail::createCPUGenerator(4);
  std::vector<Batch> train;
  for (int i = 0; i < 2; ++i) {
    train.push_back({{at::randn({6, 3, 8, 8}, gen), at::randn({6, 1, 8, 8}, gen) + 2.0,
                      at::randn({6, 2, 8, 8}, gen)},
                     at::randint(3, {6}, gen)});
  }
  record_squeeze_averages(net, train);
  const std::vector<at::Tensor> x = {at::randn({5, 3, 8, 8}, gen), at::Tensor(), at::randn({5, 2, 8, 8}, gen)};
  const NetOutput out = net->forward_missing(x, {1});

  // By hand: branches 0 and 2 up to the tap, each side's gate from [s_0, average s_1, s_2].
  net->eval();
  torch::NoGradGuard no_grad;
  auto& b0 = std::get<0>(net->branches);
  auto& b2 = std::get<2>(net->branches);
  const at::Tensor h0 = b0->forward_stage(1, b0->forward_stage(0, x[0]));
  const at::Tensor h2 = b2->forward_stage(1, b2->forward_stage(0, x[2]));
  auto& fusion = *net->taps[0].module;
  const at::Tensor average1 = fusion.squeeze_mean->mean.narrow(0, 8, 8).to(at::kFloat).expand({5, 8});
  const at::Tensor joint = at::cat({h0.mean({2, 3}), average1, h2.mean({2, 3})}, 1);
  const at::Tensor y0 = b0->head(h0 * torch::sigmoid(fusion.gates[0](joint)).view({5, 8, 1, 1}));
  const at::Tensor y2 = b2->head(h2 * torch::sigmoid(fusion.gates[2](joint)).view({5, 8, 1, 1}));
  CHECK(torch::allclose(out.heads[0], y0, 1e-5, 1e-6));
  CHECK(torch::allclose(out.heads[2], y2, 1e-5, 1e-6));
  CHECK_FALSE(out.heads[1].defined());
  CHECK(torch::allclose(out.y, (y0 + y2) * 0.5, 1e-5, 1e-6));
  // The average stands in for modality 1: another average, other outputs.
  fusion.squeeze_mean->mean.narrow(0, 8, 8).add_(1.0);
  CHECK_FALSE(torch::allclose(net->forward_missing(x, {1}).heads[0], y0, 1e-4, 1e-5));
}
