#include <catch2/catch.hpp>

#include <set>
#include <sstream>
#include <tuple>
#include <vector>

#include "support.h"

using namespace mmbalance;

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
                                    const NWayFusionContext& ctx) {
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

TEST_CASE("NWayMultiModalNet with two random branches draws in MultiModalNet's order",
          "[n-way-net]") {
  using Pair = MultiModalNet<DropoutBranch, DropoutBranch, MMTM>;
  using NWay = NWayMultiModalNet<NWayMMTM, DropoutBranch, DropoutBranch>;
  torch::manual_seed(80);
  Pair pair(DropoutBranch(branch_options(3, {4, 8, 8}, {1, 2, 1})),
            DropoutBranch(branch_options(1, {4, 8, 8}, {1, 2, 1})), {{1, MMTM(8, 8)}});
  NWay n_way(std::tuple{DropoutBranch(branch_options(3, {4, 8, 8}, {1, 2, 1})),
                        DropoutBranch(branch_options(1, {4, 8, 8}, {1, 2, 1}))},
             {{{1, 1}, NWayMMTM(NWayMMTMOptions({8, 8}))}});
  testing::copy_state(pair, n_way);
  const auto b = testing::small_batch(4, 81);
  torch::manual_seed(82);
  const ModelOutput p = pair->forward(b.x0, b.x1);
  torch::manual_seed(82);
  const NWayOutput q = n_way->forward({b.x0, b.x1});
  CHECK(torch::equal(p.y0, q.heads[0]));
  CHECK(torch::equal(p.y1, q.heads[1]));
}

TEST_CASE("NWayMultiModalNet with two branches is MultiModalNet bit for bit",
          "[n-way-net]") {
  testing::Net pair = testing::small_net(5);
  TwoWay n_way = small_two_way();
  // Same submodule names: the pair network's saved state loads into the N-way one.
  testing::copy_state(pair, n_way);
  REQUIRE(testing::same_state(*pair, *n_way));

  const auto b = testing::small_batch(6, 50);
  for (const StepKind kind : {StepKind::regular, StepKind::rebalance_m0, StepKind::rebalance_m1}) {
    CAPTURE(to_string(kind));
    const ModelOutput p = pair->forward(b.x0, b.x1, kind);
    const NWayOutput q = n_way->forward({b.x0, b.x1}, kind);
    CHECK(torch::equal(p.y, q.y));
    CHECK(torch::equal(p.y0, q.heads[0]));
    CHECK(torch::equal(p.y1, q.heads[1]));
    // The regular training step staged the same gates; commit them on both.
    for (auto& m : pair->gate_means()) m->commit();
    for (auto& m : n_way->gate_means()) m->commit();
    CHECK(testing::same_state(*pair, *n_way));
  }

  pair->eval();
  n_way->eval();
  const auto r = testing::small_batch(5, 51);
  pair->record_squeeze(r.x0, r.x1);
  n_way->record_squeeze({r.x0, r.x1});
  for (auto& m : pair->squeeze_means()) m->commit();
  for (auto& m : n_way->squeeze_means()) m->commit();
  CHECK(n_way->has_squeeze_averages());
  const ProbeOutput p = pair->forward_probe(b.x0, b.x1);
  const NWayProbeOutput q = n_way->forward_probe({b.x0, b.x1});
  CHECK(torch::equal(p.y0, q.heads[0]));
  CHECK(torch::equal(p.y1, q.heads[1]));
  CHECK(torch::equal(p.y0_cut, q.cut_heads[0]));
  CHECK(torch::equal(p.y1_cut, q.cut_heads[1]));

  const ParameterGroups pg = pair->parameter_groups();
  const NWayParameterGroups ng = n_way->parameter_groups();
  CHECK(all_equal(pg.theta0, ng.branch[0]));
  CHECK(all_equal(pg.theta1, ng.branch[1]));
  CHECK(all_equal(pg.theta0_fusion, ng.fusion[0]));
  CHECK(all_equal(pg.theta1_fusion, ng.fusion[1]));
}

TEST_CASE("NWayMultiModalNet with three branches of different depths matches a hand-wired "
          "network", "[n-way-net]") {
  ThreeWay net = small_three_way(60);
  const auto x = three_inputs(4, 61);
  net->eval();  // BatchNorm statistics fixed, so the two passes see the same network

  const NWayOutput out = net->forward(x);
  const auto heads = naive_heads(net, x, {});
  REQUIRE(out.heads.size() == 3);
  for (std::size_t k = 0; k < 3; ++k) CHECK(torch::equal(out.heads[k], heads[k]));
  CHECK(torch::allclose(out.y, (heads[0] + heads[1] + heads[2]) / 3.0, 1e-6, 1e-6));

  for (std::size_t held = 0; held < 3; ++held) {
    CAPTURE(held);
    NWayFusionContext ctx;
    ctx.sides.assign(3, SideMode::live);
    ctx.sides[held] = SideMode::held_gate;
    const auto expect = naive_heads(net, x, ctx);
    const NWayOutput got = net->forward(x, StepPlan::hold(held));
    for (std::size_t k = 0; k < 3; ++k) CHECK(torch::equal(got.heads[k], expect[k]));
    CHECK_FALSE(torch::equal(got.heads[held], out.heads[held]));
  }

  // The probe: normal heads and f_k' for every k, from one stacked pass.
  net->record_squeeze(three_inputs(7, 62));
  for (auto& m : net->squeeze_means()) m->commit();
  const NWayProbeOutput probe = net->forward_probe(x);
  NWayFusionContext cut;
  cut.sides.assign(3, SideMode::averaged_squeeze);
  const auto expect_cut = naive_heads(net, x, cut);
  for (std::size_t k = 0; k < 3; ++k) {
    CHECK(torch::allclose(probe.heads[k], heads[k], 1e-5, 1e-6));
    CHECK(torch::allclose(probe.cut_heads[k], expect_cut[k], 1e-5, 1e-6));
    CHECK_FALSE(torch::equal(probe.cut_heads[k], probe.heads[k]));
  }
}

TEST_CASE("NWayMultiModalNet::forward_missing skips absent branches, the others read their "
          "averages", "[n-way-net]") {
  ThreeWay net = small_three_way(74);
  net->eval();
  const auto x = three_inputs(4, 75);
  CHECK_THROWS_WITH(net->forward_missing(x, {1}), Catch::Contains("no squeeze averages recorded"));
  net->record_squeeze(three_inputs(6, 76));
  for (auto& m : net->squeeze_means()) m->commit();

  // By hand: branches 0 and 2 run, the fusion modules see modality 1 as absent.
  NWayFusionContext missing1;
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

  const NWayOutput out = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});
  CHECK_FALSE(out.heads[1].defined());
  CHECK(torch::equal(out.heads[0], y0));
  CHECK(torch::equal(out.heads[2], y2));
  CHECK(torch::allclose(out.y, (y0 + y2) / 2.0, 1e-6, 1e-6));
  // The absent input is ignored; the live network differs.
  CHECK(torch::equal(net->forward_missing({x[0], x[1] * 50.0, x[2]}, {1}).heads[0], y0));
  CHECK_FALSE(torch::equal(net->forward(x).heads[0], y0));
  // One modality present: its head is the probe's cut network f_k', the others averaged.
  const NWayProbeOutput probe = net->forward_probe(x);
  CHECK(torch::allclose(net->forward_missing({at::Tensor(), at::Tensor(), x[2]}, {0, 1}).heads[2],
                        probe.cut_heads[2], 1e-5, 1e-6));
  // Two of three missing: y is the one present head.
  const NWayOutput only2 = net->forward_missing({at::Tensor(), at::Tensor(), x[2]}, {0, 1});
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

TEST_CASE("NWayMultiModalNet::forward_missing runs in eval mode whatever mode the network is "
          "in, and leaves each module's mode and every buffer as it was", "[n-way-net]") {
  ThreeWay net = small_three_way(74);
  net->eval();
  net->record_squeeze(three_inputs(6, 76));
  for (auto& m : net->squeeze_means()) m->commit();
  const auto x = three_inputs(4, 75);
  const NWayOutput in_eval = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});

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
  const NWayOutput in_training = net->forward_missing({x[0], at::Tensor(), x[2]}, {1});
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

TEST_CASE("NWayMultiModalNet stages gates only in regular training steps", "[n-way-net]") {
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

TEST_CASE("NWayMultiModalNet parameter groups: each branch, and each side's fusion path",
          "[n-way-net]") {
  ThreeWay net = small_three_way(65);
  const NWayParameterGroups g = net->parameter_groups();
  REQUIRE(g.branch.size() == 3);
  REQUIRE(g.fusion.size() == 3);
  CHECK(tensor_ids(g.branch[0]) == tensor_ids(std::get<0>(net->branches)->parameters()));
  CHECK(tensor_ids(g.branch[1]) == tensor_ids(std::get<1>(net->branches)->parameters()));
  CHECK(tensor_ids(g.branch[2]) == tensor_ids(std::get<2>(net->branches)->parameters()));
  for (std::size_t k = 0; k < 3; ++k) {
    std::set<const void*> expect;
    for (const auto& tap : net->taps) {
      for (const auto& p : tap.module->squeeze->parameters()) expect.insert(p.unsafeGetTensorImpl());
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

TEST_CASE("NWayMultiModalNet clones deeply", "[n-way-net]") {
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

TEST_CASE("NWayMultiModalNet rejects bad layouts and inputs with the values",
          "[n-way-net][bad-input]") {
  auto branches = [] {
    return std::tuple{ConvBranch(branch_options(3, {4, 6, 8}, {1, 2, 1})),
                      ConvBranch(branch_options(1, {5, 8}, {2, 1})),
                      ConvBranch(branch_options(2, {3, 4}, {1, 2}))};
  };
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 2, 0}, NWayMMTM(NWayMMTMOptions({6, 5, 3}))}}),
                    Catch::Contains("reads stage 2 of branch 1, which has stages 0..1"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0, 0}, NWayMMTM(NWayMMTMOptions({6, 4, 3}))}}),
                    Catch::Contains("expects 4 channels from branch 1, whose stage 0 has 5"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0}, NWayMMTM(NWayMMTMOptions({6, 5, 3}))}}),
                    Catch::Contains("names 2 stages"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 0, 0}, NWayMMTM(NWayMMTMOptions({6, 5}))}}),
                    Catch::Contains("joins 2 branches, the network has 3"));
  CHECK_THROWS_WITH(ThreeWay(branches(), {{{1, 1, 0}, NWayMMTM(NWayMMTMOptions({6, 8, 3}))},
                                          {{2, 1, 1}, NWayMMTM(NWayMMTMOptions({8, 8, 4}))}}),
                    Catch::Contains("tap 1 reads stage 1 of branch 1, tap 0 stage 1"));

  ThreeWay net = small_three_way(68);
  auto x = three_inputs(4, 69);
  CHECK_THROWS_WITH(net->forward({x[0], x[1]}), Catch::Contains("got 2 modalities for 3 branches"));
  CHECK_THROWS_WITH(net->forward({x[0], x[1], x[2].narrow(0, 0, 3)}),
                    Catch::Contains("batch sizes differ: m0 has 4") && Catch::Contains("m2 has 3"));
  CHECK_THROWS_WITH(net->forward(x, StepPlan::hold(3)),
                    Catch::Contains("holds branch 3, the network has branches 0..2"));
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
                        std::vector<NWayFusionTap<NWayMMTM>>{});
  const NWayBatch b = testing::n_way_batch(3, 8, 82);
  const NWayOutput out = net->forward(b.inputs);
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
