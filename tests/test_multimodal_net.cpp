#include <catch2/catch.hpp>

#include <set>
#include <sstream>
#include <tuple>
#include <vector>

#include "reference/two_branch.h"
#include "support.h"

using namespace mmbalance;
using mmbalance::testing::small_net;
using mmbalance::testing::Net;
using mmbalance::testing::small_batch;
using mmbalance::testing::small_late_net;
using mmbalance::testing::tensor_ids;

TEST_CASE("Parameter groups partition the parameters as specified", "[model]") {
  auto net = small_net();
  const auto groups = net->parameter_groups();
  const auto all = tensor_ids(net->parameters());
  const auto t0 = tensor_ids(groups.branch[0]), t1 = tensor_ids(groups.branch[1]);
  const auto f0 = tensor_ids(groups.fusion[0]), f1 = tensor_ids(groups.fusion[1]);

  CHECK(t0 == tensor_ids(net->branch0->parameters()));
  CHECK(t1 == tensor_ids(net->branch1->parameters()));
  std::set<const void*> shared, fusion;
  for (const auto& tap : net->taps) {
    for (const auto& p : tap.module->joint->parameters()) shared.insert(p.unsafeGetTensorImpl());
    for (const auto& p : tap.module->parameters()) fusion.insert(p.unsafeGetTensorImpl());
  }
  // θ0' ∩ θ1' is exactly the shared joint layers; θ0' ∪ θ1' is every fusion parameter.
  std::set<const void*> inter, uni(f0);
  for (auto p : f0)
    if (f1.count(p)) inter.insert(p);
  uni.insert(f1.begin(), f1.end());
  CHECK(inter == shared);
  CHECK(uni == fusion);
  // Every parameter is in exactly one of θ0, θ1, fusion.
  std::set<const void*> everything(t0);
  everything.insert(t1.begin(), t1.end());
  everything.insert(uni.begin(), uni.end());
  CHECK(everything == all);
  CHECK(t0.size() + t1.size() + uni.size() == all.size());
  // The excitations go to their own side only.
  for (const auto& tap : net->taps) {
    CHECK(f0.count(tap.module->excite[0]->weight.unsafeGetTensorImpl()) == 1);
    CHECK(f1.count(tap.module->excite[0]->weight.unsafeGetTensorImpl()) == 0);
    CHECK(f1.count(tap.module->excite[1]->weight.unsafeGetTensorImpl()) == 1);
  }
}

TEST_CASE("MultiModalNet forward returns y = (y0 + y1) / 2", "[model]") {
  auto net = small_net();
  auto batch = mmbalance::testing::small_batch(5, 1);
  auto out = net->forward(batch.x0, batch.x1);
  CHECK(out.y0.sizes().vec() == std::vector<int64_t>{5, 3});
  CHECK(torch::allclose(out.y, (out.y0 + out.y1) / 2));
}

TEST_CASE("Re-balancing steps cut one branch from the other modality", "[model]") {
  auto net = small_net();
  auto batch = mmbalance::testing::small_batch(6, 2);
  net->forward(batch.x0, batch.x1, StepKind::regular);  // fills the gate averages
  net->eval();
  auto a = net->forward(batch.x0, batch.x1, StepKind::rebalance_m0);
  auto b = net->forward(batch.x0, batch.x1 * 2.0, StepKind::rebalance_m0);
  CHECK(torch::equal(a.y0, b.y0));  // branch 0 does not see m1
  CHECK_FALSE(torch::allclose(a.y1, b.y1));
  auto c = net->forward(batch.x0, batch.x1, StepKind::rebalance_m1);
  auto d = net->forward(batch.x0 * 2.0, batch.x1, StepKind::rebalance_m1);
  CHECK(torch::equal(c.y1, d.y1));
}

TEST_CASE("MultiModalNet rejects bad taps and inputs with the values", "[model][bad-input]") {
  auto opts = [](int64_t in) { return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}); };
  using Net = ConvMMTMNet;
  CHECK_THROWS_WITH(Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{2, MMTM(8, 8)}}),
                    Catch::Contains("tap 0 reads stage 2 of branch 0, which has stages 0..1"));
  CHECK_THROWS_WITH(Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{1, MMTM(8, 6)}}),
                    Catch::Contains("expects 6 channels from branch 1, whose stage 1 has 8"));
  CHECK_THROWS_WITH(
      Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{1, MMTM(8, 8)}, {0, MMTM(4, 4)}}),
      Catch::Contains("strictly increasing"));
  CHECK_THROWS_WITH(Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{1, MMTM(MMTMOptions({8, 8, 8}))}}),
                    Catch::Contains("joins 3 branches, the network has 2"));
  // Branches of different depths are fine; a tap past the shorter one is not.
  const ConvBranchOptions one_stage = ConvBranchOptions(1, 3).channels({4}).strides({1});
  CHECK_NOTHROW(Net(ConvBranch(opts(3)), ConvBranch(one_stage), {{{1, 0}, MMTM(8, 4)}}));
  CHECK_THROWS_WITH(Net(ConvBranch(opts(3)), ConvBranch(one_stage), {{1, MMTM(8, 4)}}),
                    Catch::Contains("reads stage 1 of branch 1, which has stages 0..0"));
  auto net = small_net();
  CHECK_THROWS_WITH(net->forward(at::randn({4, 3, 8, 8}), at::randn({5, 1, 8, 8})),
                    Catch::Contains("batch sizes differ: m0 has 4") && Catch::Contains("m1 has 5"));
  CHECK_THROWS_WITH(net->forward(at::randn({4, 1, 8, 8}), at::randn({4, 1, 8, 8})),
                    Catch::Contains("expected input (batch, 3"));
}

TEST_CASE("MultiModalNet clone is deep and keeps the running averages", "[model]") {
  auto net = small_net();
  auto batch = mmbalance::testing::small_batch(4, 3);
  net->forward(batch.x0, batch.x1);
  auto copy = net.clone();
  CHECK(mmbalance::testing::same_state(*net, *copy));
  CHECK(copy->is_training());
  for (const auto& p : copy->parameters()) {
    for (const auto& q : net->parameters()) CHECK_FALSE(p.is_same(q));
  }
  net->eval();
  copy->eval();
  CHECK(torch::equal(net->forward(batch.x0, batch.x1).y, copy->forward(batch.x0, batch.x1).y));
  {
    torch::NoGradGuard ng;
    copy->taps[0].module->excite[0]->bias.add_(1.0);
  }
  CHECK_FALSE(torch::equal(net->forward(batch.x0, batch.x1).y, copy->forward(batch.x0, batch.x1).y));
  // The clone's groups point at the clone's parameters.
  CHECK(copy->parameter_groups().fusion[0][0].is_same(copy->taps[0].module->joint->weight));
}

TEST_CASE("forward_probe's live half equals the normal eval forward", "[model]") {
  auto net = small_net();
  auto batch = mmbalance::testing::small_batch(5, 4);
  net->eval();
  CHECK_FALSE(net->has_squeeze_averages());
  net->record_squeeze({batch.x0, batch.x1});
  CHECK_FALSE(net->has_squeeze_averages());  // staged, not committed
  commit_squeeze_averages(net);
  CHECK(net->has_squeeze_averages());
  auto probe = net->forward_probe({batch.x0, batch.x1});
  auto normal = net->forward(batch.x0, batch.x1);
  CHECK(torch::allclose(probe.heads[0], normal.y0, 1e-5, 1e-6));
  CHECK(torch::allclose(probe.heads[1], normal.y1, 1e-5, 1e-6));
  CHECK_FALSE(torch::allclose(probe.cut_heads[0], normal.y0));
  net->train();
  CHECK_THROWS_WITH(net->forward_probe({batch.x0, batch.x1}), Catch::Contains("needs eval mode"));
}

TEST_CASE("A regular forward stages the gates in training mode only, other steps never",
          "[model]") {
  auto net = small_net(5);
  auto batch = mmbalance::testing::small_batch(6, 5);
  auto staged_rows = [&] {
    std::vector<double> rows;
    for (auto& mean : net->gate_means()) rows.push_back(mean->staged()[-1].item<double>());
    return rows;
  };
  net->eval();
  net->forward(batch.x0, batch.x1, StepKind::regular);
  CHECK(staged_rows() == std::vector<double>{0.0, 0.0});
  net->train();
  net->forward(batch.x0, batch.x1, StepKind::rebalance_m0);
  net->forward(batch.x0, batch.x1, StepKind::rebalance_m1);
  CHECK(staged_rows() == std::vector<double>{0.0, 0.0});
  net->forward(batch.x0, batch.x1, StepKind::regular);
  CHECK(staged_rows() == std::vector<double>{6.0, 6.0});
  // Only staged: the committed means are still those of a zero excitation.
  for (auto& mean : net->gate_means()) CHECK(mean->samples.item<double>() == 0.0);
}

TEST_CASE("Late fusion (no fusion modules): each head is its branch alone, y their mean, and "
          "the probe finds no cross-modal use", "[model][late-fusion]") {
  Net net = small_late_net(31);
  const auto b = small_batch(8, 32);
  const ModelOutput out = net->forward(b.x0, b.x1);
  // Each head is the branch's own forward over its own modality, nothing else.
  CHECK(torch::allclose(out.y0, net->branch0->forward(b.x0)));
  CHECK(torch::allclose(out.y1, net->branch1->forward(b.x1)));
  CHECK(torch::allclose(out.y, (out.y0 + out.y1) * 0.5));
  const ModelOutput other_m1 = net->forward(b.x0, b.x1 + 1);
  CHECK(torch::equal(other_m1.y0, out.y0));
  CHECK_FALSE(torch::equal(other_m1.y1, out.y1));
  const ParameterGroups groups = net->parameter_groups();
  CHECK(groups.fusion[0].empty());
  CHECK(groups.fusion[1].empty());
  CHECK(groups.branch[0].size() + groups.branch[1].size() == net->parameters().size());
  CHECK(net->gate_means().empty());

  // Cutting a modality off a branch that never sees it changes nothing: u = 0 both ways.
  const std::vector<MultiModalBatch> train = {small_batch(8, 33)};
  const std::vector<MultiModalBatch> eval = {b, small_batch(8, 34)};
  const UtilizationReport r = probe_utilization(net, train, eval);
  CHECK(r.accuracy0_cut == r.accuracy0);
  CHECK(r.accuracy1_cut == r.accuracy1);
  CHECK(r.d_util == 0.0);
}

namespace {

using testing::branch_options;
using testing::small_three_way;
using testing::small_two_way;
using testing::ThreeWay;
using testing::TwoWay;
using testing::all_equal;
using testing::tensor_ids;


std::vector<at::Tensor> three_inputs(std::int64_t n, std::uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::randn({n, 3, 8, 8}, gen), at::randn({n, 1, 8, 8}, gen), at::randn({n, 2, 8, 8}, gen)};
}

// The three-branch network written out by hand: each branch's stages called one by one,
// the fusion modules called where the test's layout puts them, the heads averaged.
std::vector<at::Tensor> naive_heads(ThreeWay& net, std::vector<at::Tensor> h,
                                    const FusionContext& ctx) {
  auto& b0 = std::get<0>(net->branches);
  auto& b1 = std::get<1>(net->branches);
  auto& b2 = std::get<2>(net->branches);
  h[0] = b0->forward_stage(1, b0->forward_stage(0, h[0]));
  h[1] = b1->forward_stage(0, h[1]);
  h[2] = b2->forward_stage(0, h[2]);
  h = net->taps[0].module->forward(h, ctx);
  h[0] = b0->forward_stage(2, h[0]);
  h[1] = b1->forward_stage(1, h[1]);
  h[2] = b2->forward_stage(1, h[2]);
  h = net->taps[1].module->forward(h, ctx);
  return {b0->head(h[0]), b1->head(h[1]), b2->head(h[2])};
}

// A ConvBranch with dropout after every stage in training mode: a branch that draws
// random numbers, so that the order in which branches run shows in the outputs.
class DropoutBranchImpl : public torch::nn::Cloneable<DropoutBranchImpl> {
 public:
  explicit DropoutBranchImpl(ConvBranchOptions options) : options_(std::move(options)) { reset(); }
  void reset() override { conv = register_module("conv", ConvBranch(options_)); }
  std::size_t num_stages() const { return conv->num_stages(); }
  std::int64_t stage_channels(std::size_t i) const { return conv->stage_channels(i); }
  at::Tensor forward_stage(std::size_t i, const at::Tensor& x) {
    return at::dropout(conv->forward_stage(i, x), 0.3, is_training());
  }
  at::Tensor head(const at::Tensor& x) { return conv->head(x); }
  ConvBranch conv{nullptr};

 private:
  ConvBranchOptions options_;
};
TORCH_MODULE(DropoutBranch);

}  // namespace

TEST_CASE("MultiModalNet with two random branches draws in the two-branch network's order",
          "[n-way-net]") {
  using Reference = testing::reference::TwoBranchNetImpl<DropoutBranch, DropoutBranch,
                                                         testing::reference::TwoBranchMMTM>;
  torch::manual_seed(80);
  auto pair = std::make_shared<Reference>(
      DropoutBranch(branch_options(3, {4, 8, 8}, {1, 2, 1})),
      DropoutBranch(branch_options(1, {4, 8, 8}, {1, 2, 1})),
      std::vector<Reference::Tap>{{1, testing::reference::TwoBranchMMTM(8, 8)}});
  MultiModalNet<DropoutBranch, DropoutBranch, MMTM> n_way(
      std::tuple{DropoutBranch(branch_options(3, {4, 8, 8}, {1, 2, 1})),
                 DropoutBranch(branch_options(1, {4, 8, 8}, {1, 2, 1}))},
      {{{1, 1}, MMTM(MMTMOptions({8, 8}))}});
  testing::copy_state(pair, n_way);
  const auto b = testing::small_batch(4, 81);
  torch::manual_seed(82);
  const auto p = pair->forward(b.x0, b.x1);
  torch::manual_seed(82);
  const NetOutput q = n_way->forward({b.x0, b.x1});
  CHECK(torch::equal(p.y0, q.heads[0]));
  CHECK(torch::equal(p.y1, q.heads[1]));
}

TEST_CASE("MultiModalNet with two branches is the two-branch network of before, bit for bit",
          "[n-way-net]") {
  using Reference = testing::reference::TwoBranchNetImpl<ConvBranch, ConvBranch,
                                                         testing::reference::TwoBranchMMTM>;
  TwoWay n_way = small_two_way();
  torch::manual_seed(5);
  auto pair = std::make_shared<Reference>(
      ConvBranch(branch_options(3, {4, 8}, {1, 2})), ConvBranch(branch_options(1, {4, 8}, {1, 2})),
      std::vector<Reference::Tap>{{0, testing::reference::TwoBranchMMTM(4, 4)},
                                  {1, testing::reference::TwoBranchMMTM(8, 8)}});
  // Same submodule names: the two-branch network's saved state loads.
  testing::copy_state(pair, n_way);
  REQUIRE(testing::same_values_in_order(*pair, *n_way));

  const auto b = testing::small_batch(6, 50);
  for (const StepKind kind : {StepKind::regular, StepKind::rebalance_m0, StepKind::rebalance_m1}) {
    CAPTURE(to_string(kind));
    const auto p = pair->forward(b.x0, b.x1, kind);
    const ModelOutput q = n_way->forward(b.x0, b.x1, kind);
    CHECK(torch::equal(p.y, q.y));
    CHECK(torch::equal(p.y0, q.y0));
    CHECK(torch::equal(p.y1, q.y1));
    CHECK(q.heads.size() == 2);
    CHECK(q.heads[0].is_same(q.y0));
    CHECK(q.heads[1].is_same(q.y1));
    // The regular training step staged the same gates; commit them on both.
    for (auto& m : pair->gate_means()) m->commit();
    for (auto& m : n_way->gate_means()) m->commit();
    CHECK(testing::same_values_in_order(*pair, *n_way));
  }

  pair->eval();
  n_way->eval();
  const auto r = testing::small_batch(5, 51);
  pair->record_squeeze(r.x0, r.x1);
  n_way->record_squeeze({r.x0, r.x1});
  for (auto& m : pair->squeeze_means()) m->commit();
  for (auto& m : n_way->squeeze_means()) m->commit();
  CHECK(n_way->has_squeeze_averages());
  const auto p = pair->forward_probe(b.x0, b.x1);
  const ProbeOutput q = n_way->forward_probe({b.x0, b.x1});
  CHECK(torch::equal(p.y0, q.heads[0]));
  CHECK(torch::equal(p.y1, q.heads[1]));
  CHECK(torch::equal(p.y0_cut, q.cut_heads[0]));
  CHECK(torch::equal(p.y1_cut, q.cut_heads[1]));

  const auto pg = pair->parameter_groups();
  const ParameterGroups ng = n_way->parameter_groups();
  CHECK(all_equal(pg.theta0, ng.branch[0]));
  CHECK(all_equal(pg.theta1, ng.branch[1]));
  CHECK(all_equal(pg.theta0_fusion, ng.fusion[0]));
  CHECK(all_equal(pg.theta1_fusion, ng.fusion[1]));
}

TEST_CASE("MultiModalNet with three branches of different depths matches a hand-wired "
          "network", "[n-way-net]") {
  ThreeWay net = small_three_way(60);
  const auto x = three_inputs(4, 61);
  net->eval();  // BatchNorm statistics fixed, so the two passes see the same network

  const NetOutput out = net->forward(x);
  const auto heads = naive_heads(net, x, {});
  REQUIRE(out.heads.size() == 3);
  for (std::size_t k = 0; k < 3; ++k) CHECK(torch::equal(out.heads[k], heads[k]));
  CHECK(torch::allclose(out.y, (heads[0] + heads[1] + heads[2]) / 3.0, 1e-6, 1e-6));

  for (std::size_t held = 0; held < 3; ++held) {
    CAPTURE(held);
    FusionContext ctx;
    ctx.sides.assign(3, SideMode::live);
    ctx.sides[held] = SideMode::held_gate;
    const auto expect = naive_heads(net, x, ctx);
    const NetOutput got = net->forward(x, StepPlan::hold(held));
    for (std::size_t k = 0; k < 3; ++k) CHECK(torch::equal(got.heads[k], expect[k]));
    CHECK_FALSE(torch::equal(got.heads[held], out.heads[held]));
  }

  // The probe: normal heads and f_k' for every k, from one stacked pass.
  net->record_squeeze(three_inputs(7, 62));
  for (auto& m : net->squeeze_means()) m->commit();
  const ProbeOutput probe = net->forward_probe(x);
  FusionContext cut;
  cut.sides.assign(3, SideMode::averaged_squeeze);
  const auto expect_cut = naive_heads(net, x, cut);
  for (std::size_t k = 0; k < 3; ++k) {
    CHECK(torch::allclose(probe.heads[k], heads[k], 1e-5, 1e-6));
    CHECK(torch::allclose(probe.cut_heads[k], expect_cut[k], 1e-5, 1e-6));
    CHECK_FALSE(torch::equal(probe.cut_heads[k], probe.heads[k]));
  }
}

TEST_CASE("MultiModalNet::forward_missing skips absent branches, the others read their "
          "averages", "[n-way-net]") {
  ThreeWay net = small_three_way(74);
  net->eval();
  const auto x = three_inputs(4, 75);
  CHECK_THROWS_WITH(net->forward_missing(x, {1}), Catch::Contains("no squeeze averages recorded"));
  net->record_squeeze(three_inputs(6, 76));
  for (auto& m : net->squeeze_means()) m->commit();

  // By hand: branches 0 and 2 run, the fusion modules see modality 1 as absent.
  FusionContext missing1;
  missing1.sides = {SideMode::live, SideMode::absent, SideMode::live};
  auto& b0 = std::get<0>(net->branches);
  auto& b2 = std::get<2>(net->branches);
  std::vector<at::Tensor> h = {b0->forward_stage(1, b0->forward_stage(0, x[0])), at::Tensor(),
                               b2->forward_stage(0, x[2])};
  h = net->taps[0].module->forward(h, missing1);
  h[0] = b0->forward_stage(2, h[0]);
  h[2] = b2->forward_stage(1, h[2]);
  h = net->taps[1].module->forward(h, missing1);
  const at::Tensor y0 = b0->head(h[0]), y2 = b2->head(h[2]);

  const NetOutput out = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});
  CHECK_FALSE(out.heads[1].defined());
  CHECK(torch::equal(out.heads[0], y0));
  CHECK(torch::equal(out.heads[2], y2));
  CHECK(torch::allclose(out.y, (y0 + y2) / 2.0, 1e-6, 1e-6));
  // The absent input is ignored; the live network differs.
  CHECK(torch::equal(net->forward_missing({x[0], x[1] * 50.0, x[2]}, {1}).heads[0], y0));
  CHECK_FALSE(torch::equal(net->forward(x).heads[0], y0));
  // One modality present: its head is the probe's cut network f_k', the others averaged.
  const ProbeOutput probe = net->forward_probe(x);
  CHECK(torch::allclose(net->forward_missing({at::Tensor(), at::Tensor(), x[2]}, {0, 1}).heads[2],
                        probe.cut_heads[2], 1e-5, 1e-6));
  // Two of three missing: y is the one present head.
  const NetOutput only2 = net->forward_missing({at::Tensor(), at::Tensor(), x[2]}, {0, 1});
  CHECK(torch::equal(only2.y, only2.heads[2] * 1.0));
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 0.0);

  CHECK_THROWS_WITH(net->forward_missing(x, {0, 1, 2}), Catch::Contains("every modality is absent"));
  CHECK_THROWS_WITH(net->forward_missing(x, {3}),
                    Catch::Contains("modality 3 is out of range") && Catch::Contains("0..2"));
  CHECK_THROWS_WITH(net->forward_missing(x, {1, 1}), Catch::Contains("modality 1 is listed twice"));
  CHECK_THROWS_WITH(net->forward_missing({x[0], at::Tensor(), x[2].narrow(0, 0, 2)}, {1}),
                    Catch::Contains("batch sizes differ: m0 has 4") && Catch::Contains("m2 has 2"));
  CHECK_THROWS_WITH(net->forward_missing({x[0], at::Tensor(), at::Tensor()}, {1}),
                    Catch::Contains("modality 2 needs a batch"));
}

TEST_CASE("MultiModalNet::forward_missing runs in eval mode whatever mode the network is "
          "in, and leaves each module's mode and every buffer as it was", "[n-way-net]") {
  ThreeWay net = small_three_way(74);
  net->eval();
  net->record_squeeze(three_inputs(6, 76));
  for (auto& m : net->squeeze_means()) m->commit();
  const auto x = three_inputs(4, 75);
  const NetOutput in_eval = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});

  // In training mode (as the utilization probe leaves a network), with one BatchNorm kept
  // in eval mode by the user.
  net->train();
  std::shared_ptr<torch::nn::Module> frozen;
  std::size_t batch_norms = 0;
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (m->name().find("BatchNorm") == std::string::npos) continue;
    ++batch_norms;
    if (!frozen) (frozen = m)->eval();
  }
  REQUIRE(batch_norms >= 2);
  std::vector<at::Tensor> before;
  for (const at::Tensor& b : net->buffers()) before.push_back(b.clone());
  const NetOutput in_training = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});
  CHECK(torch::equal(in_training.heads[0], in_eval.heads[0]));
  CHECK(torch::equal(in_training.y, in_eval.y));
  const auto after = net->buffers();
  REQUIRE(after.size() == before.size());
  for (std::size_t i = 0; i < after.size(); ++i) CHECK(torch::equal(after[i], before[i]));
  CHECK(net->is_training());
  CHECK_FALSE(frozen->is_training());
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (m != frozen) CHECK(m->is_training());
  }
}

TEST_CASE("MultiModalNet stages gates only in regular training steps", "[n-way-net]") {
  ThreeWay net = small_three_way(63);
  const auto x = three_inputs(5, 64);
  net->forward(x, StepPlan::hold(2));
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 0.0);
  net->forward(x);
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 5.0);
  for (auto& m : net->gate_means()) m->drop();
  net->eval();
  net->forward(x);
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 0.0);
}

TEST_CASE("MultiModalNet parameter groups: each branch, and each side's fusion path",
          "[n-way-net]") {
  ThreeWay net = small_three_way(65);
  const ParameterGroups g = net->parameter_groups();
  REQUIRE(g.branch.size() == 3);
  REQUIRE(g.fusion.size() == 3);
  CHECK(tensor_ids(g.branch[0]) == tensor_ids(std::get<0>(net->branches)->parameters()));
  CHECK(tensor_ids(g.branch[1]) == tensor_ids(std::get<1>(net->branches)->parameters()));
  CHECK(tensor_ids(g.branch[2]) == tensor_ids(std::get<2>(net->branches)->parameters()));
  for (std::size_t k = 0; k < 3; ++k) {
    std::set<const void*> expect;
    for (const auto& tap : net->taps) {
      for (const auto& p : tap.module->joint->parameters()) expect.insert(p.unsafeGetTensorImpl());
      for (const auto& p : tap.module->excite[k]->parameters()) expect.insert(p.unsafeGetTensorImpl());
    }
    CHECK(tensor_ids(g.fusion[k]) == expect);
  }
  // Every parameter of the network is in a branch group or a fusion group.
  std::set<const void*> all;
  for (const auto& group : g.branch) all.merge(tensor_ids(group));
  for (const auto& group : g.fusion) all.merge(tensor_ids(group));
  CHECK(all == tensor_ids(net->parameters()));
}

TEST_CASE("MultiModalNet clones deeply", "[n-way-net]") {
  ThreeWay net = small_three_way(66);
  ThreeWay copy = net.clone();
  CHECK(testing::same_state(*net, *copy));
  net->eval();
  copy->eval();
  const auto x = three_inputs(2, 67);
  const auto before = net->forward(x).heads;
  CHECK(all_equal(before, copy->forward(x).heads));
  {
    torch::NoGradGuard no_grad;
    std::get<2>(copy->branches)->parameters()[0].add_(1.0);
    copy->taps[1].module->excite[2]->bias.add_(1.0);
  }
  CHECK_FALSE(testing::same_state(*net, *copy));
  CHECK(all_equal(before, net->forward(x).heads));  // the original is untouched
  CHECK_FALSE(torch::equal(before[2], copy->forward(x).heads[2]));
}

TEST_CASE("MultiModalNet rejects bad layouts and inputs with the values",
          "[n-way-net][bad-input]") {
  auto branches = [] {
    return std::tuple{ConvBranch(branch_options(3, {4, 6, 8}, {1, 2, 1})),
                      ConvBranch(branch_options(1, {5, 8}, {2, 1})),
                      ConvBranch(branch_options(2, {3, 4}, {1, 2}))};
  };
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 2, 0}, MMTM(MMTMOptions({6, 5, 3}))}}),
                    Catch::Contains("reads stage 2 of branch 1, which has stages 0..1"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0, 0}, MMTM(MMTMOptions({6, 4, 3}))}}),
                    Catch::Contains("expects 4 channels from branch 1, whose stage 0 has 5"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0}, MMTM(MMTMOptions({6, 5, 3}))}}),
                    Catch::Contains("names 2 stages"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0, 0}, MMTM(MMTMOptions({6, 5}))}}),
                    Catch::Contains("joins 2 branches, the network has 3"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 1, 0}, MMTM(MMTMOptions({6, 8, 3}))},
                                          {{2, 1, 1}, MMTM(MMTMOptions({8, 8, 4}))}}),
                    Catch::Contains("tap 1 reads stage 1 of branch 1, tap 0 stage 1"));

  ThreeWay net = small_three_way(68);
  auto x = three_inputs(4, 69);
  CHECK_THROWS_WITH(net->forward({x[0], x[1]}), Catch::Contains("got 2 modalities for 3 branches"));
  CHECK_THROWS_WITH(net->forward({x[0], x[1], x[2].narrow(0, 0, 3)}),
                    Catch::Contains("batch sizes differ: m0 has 4") && Catch::Contains("m2 has 3"));
  CHECK_THROWS_WITH(net->forward(x, StepPlan::hold(3)),
                    Catch::Contains("the step holds branch 3, the network has 3 branches (0..2)"));
  CHECK_THROWS_WITH(net->forward_probe(x), Catch::Contains("needs eval mode"));
  // Nothing was staged by the refused calls.
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 0.0);
}

TEST_CASE("StepPlan names and the two-branch step kinds", "[n-way-net]") {
  CHECK(to_string(StepPlan::regular()) == "regular");
  CHECK(to_string(StepPlan::hold(3)) == "rebalance_m3");
  CHECK(to_string(StepPlan::hold(1)) == to_string(StepKind::rebalance_m1));
  CHECK(StepPlan(StepKind::regular) == StepPlan::regular());
  CHECK(StepPlan(StepKind::rebalance_m0) == StepPlan::hold(0));
  CHECK(StepPlan(StepKind::rebalance_m1) == StepPlan::hold(1));
  static_assert(StepPlan(StepKind::rebalance_m1) == StepPlan::hold(1));  // usable at compile time
  CHECK_FALSE(StepPlan::hold(0) == StepPlan::hold(1));
  CHECK(StepPlan::hold(2).held_branch() == std::optional<std::size_t>(2));
  CHECK(to_step_kind(StepPlan::regular()) == StepKind::regular);
  CHECK(to_step_kind(StepPlan::hold(0)) == StepKind::rebalance_m0);
  CHECK(to_step_kind(StepPlan::hold(1)) == StepKind::rebalance_m1);
  CHECK_THROWS_WITH(to_step_kind(StepPlan::hold(2)),
                    Catch::Contains("holds branch 2; a two-branch step holds branch 0 or 1"));
}

TEST_CASE("A three-branch network without fusion modules (late fusion): each head its own "
          "branch, re-balancing policies refused, OGM-GE and Gradient-Blending train it",
          "[n-way-net][late-fusion]") {
  torch::manual_seed(81);
  testing::ThreeWay net(std::tuple{ConvBranch(branch_options(3, {4, 6, 8}, {1, 2, 1})),
                                   ConvBranch(branch_options(1, {5, 8}, {2, 1})),
                                   ConvBranch(branch_options(2, {3, 4}, {1, 2}))},
                        std::vector<FusionTap<MMTM>>{});
  const Batch b = testing::n_way_batch(3, 8, 82);
  const NetOutput out = net->forward(b.inputs);
  CHECK(torch::allclose(out.heads[1], std::get<1>(net->branches)->forward(b.inputs[1])));
  CHECK(torch::allclose(out.y, (out.heads[0] + out.heads[1] + out.heads[2]) / 3));
  CHECK_THROWS_WITH(Balancer<GuidedPolicy>(net, GuidedPolicy()),
                    Catch::Contains("GuidedPolicy chooses re-balancing steps"));
  CHECK_THROWS_WITH(Balancer<RandomPolicy>(net, RandomPolicy()),
                    Catch::Contains("no fusion modules (late fusion)"));

  auto opt = testing::make_sgd(net);
  Balancer<OGMGEPolicy> ogm(net, OGMGEPolicy(OGMGEOptions().alpha(0.9)), BalancerOptions().warmup_epochs(0));
  const StepPlan plan = ogm.next_plan();
  const at::Tensor loss = ogm.loss(net->forward(b.inputs, plan), b.target);
  opt.zero_grad();
  loss.backward();
  ogm.observe(loss);
  opt.step();
  CHECK(ogm.meter().steps() == 1);
  CHECK(std::isnan(ogm.last_d_speed()));
  CHECK(ogm.policy().last_coefficients().max().item<double>() == 1.0);
  CHECK(ogm.policy().last_coefficients().min().item<double>() < 1.0);

  Balancer<GradientBlendingPolicy> blend(net, GradientBlendingPolicy(), BalancerOptions().warmup_epochs(0));
  const at::Tensor blended = blend.loss(net->forward(b.inputs, blend.next_plan()), b.target);
  CHECK(std::isfinite(blended.item<double>()));
  blend.abandon_step();
}
