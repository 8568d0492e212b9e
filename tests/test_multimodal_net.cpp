#include <catch2/catch.hpp>

#include <set>

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
  const auto t0 = tensor_ids(groups.theta0), t1 = tensor_ids(groups.theta1);
  const auto f0 = tensor_ids(groups.theta0_fusion), f1 = tensor_ids(groups.theta1_fusion);

  CHECK(t0 == tensor_ids(net->branch0->parameters()));
  CHECK(t1 == tensor_ids(net->branch1->parameters()));
  std::set<const void*> shared, fusion;
  for (const auto& tap : net->taps) {
    for (const auto& p : tap.module->squeeze->parameters()) shared.insert(p.unsafeGetTensorImpl());
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
    CHECK(f0.count(tap.module->excite0->weight.unsafeGetTensorImpl()) == 1);
    CHECK(f1.count(tap.module->excite0->weight.unsafeGetTensorImpl()) == 0);
    CHECK(f1.count(tap.module->excite1->weight.unsafeGetTensorImpl()) == 1);
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
                    Catch::Contains("tap 0 is at stage 2") && Catch::Contains("stages 0..1"));
  CHECK_THROWS_WITH(Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{1, MMTM(8, 6)}}),
                    Catch::Contains("expects 6 channels from branch 1, which has 8"));
  CHECK_THROWS_WITH(
      Net(ConvBranch(opts(3)), ConvBranch(opts(1)), {{1, MMTM(8, 8)}, {0, MMTM(4, 4)}}),
      Catch::Contains("strictly increasing"));
  CHECK_THROWS_WITH(
      Net(ConvBranch(opts(3)),
          ConvBranch(ConvBranchOptions(1, 3).channels({4}).strides({1})), {}),
      Catch::Contains("branch 0 has 2 stages, branch 1 has 1"));
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
    copy->taps[0].module->excite0->bias.add_(1.0);
  }
  CHECK_FALSE(torch::equal(net->forward(batch.x0, batch.x1).y, copy->forward(batch.x0, batch.x1).y));
  // The clone's groups point at the clone's parameters.
  CHECK(copy->parameter_groups().theta0_fusion[0].is_same(copy->taps[0].module->squeeze->weight));
}

TEST_CASE("forward_probe's live half equals the normal eval forward", "[model]") {
  auto net = small_net();
  auto batch = mmbalance::testing::small_batch(5, 4);
  net->eval();
  CHECK_FALSE(net->has_squeeze_averages());
  net->record_squeeze(batch.x0, batch.x1);
  CHECK_FALSE(net->has_squeeze_averages());  // staged, not committed
  commit_squeeze_averages(net);
  CHECK(net->has_squeeze_averages());
  auto probe = net->forward_probe(batch.x0, batch.x1);
  auto normal = net->forward(batch.x0, batch.x1);
  CHECK(torch::allclose(probe.y0, normal.y0, 1e-5, 1e-6));
  CHECK(torch::allclose(probe.y1, normal.y1, 1e-5, 1e-6));
  CHECK_FALSE(torch::allclose(probe.y0_cut, normal.y0));
  net->train();
  CHECK_THROWS_WITH(net->forward_probe(batch.x0, batch.x1), Catch::Contains("needs eval mode"));
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
  CHECK(groups.theta0_fusion.empty());
  CHECK(groups.theta1_fusion.empty());
  CHECK(groups.theta0.size() + groups.theta1.size() == net->parameters().size());
  CHECK(net->gate_means().empty());

  // Cutting a modality off a branch that never sees it changes nothing: u = 0 both ways.
  const std::vector<MultiModalBatch> train = {small_batch(8, 33)};
  const std::vector<MultiModalBatch> eval = {b, small_batch(8, 34)};
  const UtilizationReport r = probe_utilization(net, train, eval);
  CHECK(r.accuracy0_cut == r.accuracy0);
  CHECK(r.accuracy1_cut == r.accuracy1);
  CHECK(r.d_util == 0.0);
}
