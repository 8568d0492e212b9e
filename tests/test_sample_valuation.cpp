// Sample-level modality valuation: the forward pass with modalities absent row by row,
// each sample's contributions against the original's per-sample loop transcribed
// (code/sample_level.py, `execute_modulation`) and, for three branches, against Shapley
// values averaged over every order of the modalities; the copies against a table of the
// original's bounds written in the test; the resampled rows by hand; the policy's loss.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// Row r of a (rows, branches) bool tensor.
at::Tensor presence_rows(const std::vector<std::vector<bool>>& rows) {
  at::Tensor p = at::empty({static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(rows[0].size())}, at::kBool);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    for (std::size_t k = 0; k < rows[r].size(); ++k) p[static_cast<std::int64_t>(r)][static_cast<std::int64_t>(k)] = static_cast<bool>(rows[r][k]);
  }
  return p;
}

// The original's valuation of two modalities, sample by sample: y with both, with audio
// (branch 0) alone (the visual features zeroed) and with visual alone.
std::vector<std::pair<double, double>> original_contributions(Net& net, const MultiModalBatch& b) {
  torch::NoGradGuard no_grad;
  net->eval();
  const at::Tensor out = net->forward({b.x0, b.x1}).y;
  const at::Tensor out_a = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(1, 0.0)).y;  // drop visual
  const at::Tensor out_v = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.0)).y;  // drop audio
  std::vector<std::pair<double, double>> contribution;
  for (std::int64_t i = 0; i < b.target.size(0); ++i) {
    const std::int64_t label = b.target[i].item<std::int64_t>();
    const double value_all = out[i].argmax().item<std::int64_t>() == label ? 2.0 : 0.0;
    const double value_a = out_a[i].argmax().item<std::int64_t>() == label ? 1.0 : 0.0;
    const double value_v = out_v[i].argmax().item<std::int64_t>() == label ? 1.0 : 0.0;
    contribution.emplace_back((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0);
  }
  return contribution;
}

// Any number of modalities; predicts class 0 for every row whatever is present.
struct AlwaysClassZeroImpl : torch::nn::Module {
  NetOutput forward(const std::vector<at::Tensor>& x, StepPlan /*plan*/, const at::Tensor& /*presence*/) {
    NetOutput out;
    out.y = at::zeros({x[0].size(0), 3});
    out.y.select(1, 0).fill_(1.0);
    return out;
  }
};
TORCH_MODULE(AlwaysClassZero);

}  // namespace

TEST_CASE("sample_contributions are exact for four and five modalities: 1 where every subset is right, "
          "0 where none is", "[sample-valuation]") {
  for (const std::size_t n : {4, 5}) {
    INFO(n << " modalities");
    AlwaysClassZero net;
    const std::vector<at::Tensor> inputs(n, at::zeros({4, 1}));
    const at::Tensor target = at::tensor({0, 0, 1, 0}, at::kLong);  // row 2: never right
    const at::Tensor phi = sample_contributions(net, inputs, target, 1);
    const at::Tensor expected = target.eq(0).to(at::kFloat).unsqueeze(1).expand({4, static_cast<std::int64_t>(n)});
    CHECK(torch::equal(phi, expected));  // exactly: 1 is the copies' upper bound
    CHECK(SampleValuationPolicy::copies(phi).sum().item<std::int64_t>() == 2 * static_cast<std::int64_t>(n));
  }
}

TEST_CASE("sample_contributions of two modalities are the original's, sample by sample", "[sample-valuation]") {
  Net net = small_net(31);
  const MultiModalBatch b = small_batch(96, 32);
  net->train();
  const at::Tensor phi = sample_contributions(net, {b.x0, b.x1}, b.target);
  CHECK(net->is_training());  // each module's mode given back
  REQUIRE(phi.sizes() == at::IntArrayRef({96, 2}));
  const auto expected = original_contributions(net, b);
  std::set<double> seen;
  for (std::int64_t i = 0; i < 96; ++i) {
    CHECK(phi[i][0].item<double>() == expected[static_cast<std::size_t>(i)].first);
    CHECK(phi[i][1].item<double>() == expected[static_cast<std::size_t>(i)].second);
    seen.insert(phi[i][0].item<double>());
  }
  CHECK(seen.size() >= 3);  // the batch exercises several cases of the game
  // One copy of the batch a pass gives the same.
  CHECK(torch::equal(sample_contributions(net, {b.x0, b.x1}, b.target, 1), phi));
}

TEST_CASE("sample_contributions of three modalities are Shapley values over every order", "[sample-valuation]") {
  ThreeWay net = small_three_way(33);
  const Batch b = n_way_batch(3, 64, 34);
  const at::Tensor phi = sample_contributions(net, b.inputs, b.target, 64 * 2);
  REQUIRE(phi.sizes() == at::IntArrayRef({64, 3}));
  // v(S) = |S| · [correct with S present], one pass per subset, every row the same subset.
  net->eval();
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> v(8);
  v[0] = at::zeros({64});
  for (int s = 1; s < 8; ++s) {
    std::vector<bool> row{(s & 1) != 0, (s & 2) != 0, (s & 4) != 0};
    const at::Tensor presence = presence_rows({row}).expand({64, 3}).contiguous();
    const at::Tensor y = net->forward(b.inputs, StepPlan::regular(), presence).y;
    v[s] = y.argmax(1).eq(b.target).to(at::kFloat) * static_cast<double>((s & 1) + (s >> 1 & 1) + (s >> 2 & 1));
  }
  // Shapley: the marginal value of k over the 6 orders of the three modalities, averaged.
  std::vector<int> order{0, 1, 2};
  std::vector<at::Tensor> expected(3, at::zeros({64}));
  do {
    int before = 0;
    for (int k : order) {
      expected[k] = expected[k] + (v[before | 1 << k] - v[before]) / 6.0;
      before |= 1 << k;
    }
  } while (std::next_permutation(order.begin(), order.end()));
  for (int k = 0; k < 3; ++k) CHECK(torch::allclose(phi.select(1, k), expected[k], 0, 1e-6));
  // Efficiency: the values sum to 3 for a sample predicted correctly, 0 otherwise.
  CHECK(torch::allclose(phi.sum(1), v[7], 0, 1e-6));
}

TEST_CASE("sample_contributions refuses bad input by name", "[sample-valuation][bad-input]") {
  Net net = small_net(35);
  const MultiModalBatch b = small_batch(8, 36);
  CHECK_THROWS_WITH(sample_contributions(net, {b.x0, b.x1}, b.target.narrow(0, 0, 4)),
                    Catch::Contains("target must be (batch) int64 class indices with batch 8, got [4]"));
  CHECK_THROWS_WITH(sample_contributions(net, {b.x0, b.x1}, b.target, 0),
                    Catch::Contains("rows_per_pass must be >= 1, got 0"));
}

TEST_CASE("The forward pass with modalities absent row by row", "[sample-valuation][forward]") {
  Net net = small_net(37);
  net->eval();
  const MultiModalBatch b = small_batch(3, 38);
  torch::NoGradGuard no_grad;
  const at::Tensor presence = presence_rows({{true, true}, {false, true}, {true, false}});
  const NetOutput out = net->forward({b.x0, b.x1}, StepPlan::regular(), presence);
  // Row by row, the forward pass that drops the absent branch for every row (eval mode:
  // rows independent).
  const NetOutput plain = net->forward({b.x0, b.x1});
  const NetOutput without0 = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(0, 0.0));
  const NetOutput without1 = net->forward({b.x0, b.x1}, StepPlan::regular().modulating(1, 0.0));
  const NetOutput* expected[] = {&plain, &without0, &without1};
  for (std::int64_t r = 0; r < 3; ++r) {
    CHECK(torch::allclose(out.y[r], expected[r]->y[r]));
    for (std::size_t k = 0; k < 2; ++k) {
      CHECK(torch::allclose(out.heads[k][r], expected[r]->heads[k][r]));
      CHECK(torch::allclose(out.features[k][r], expected[r]->features[k][r]));
    }
  }
  CHECK(out.features[0][1].abs().max().item<double>() == 0.0);
  // A row without branch 0 trains none of branch 0's parameters but its head's bias (the
  // rows are independent in eval mode).
  {
    const torch::AutoGradMode with_gradients(true);
    net->zero_grad();
    net->forward({b.x0, b.x1}, StepPlan::regular(), presence).y[1].sum().backward();
    for (const auto& p : net->branch0->named_parameters()) {
      INFO(p.key());
      if (p.key() == "classifier.bias") {
        CHECK(p.value().grad().abs().sum().item<double>() > 0);
      } else {
        CHECK((!p.value().grad().defined() || p.value().grad().abs().max().item<double>() == 0.0));
      }
    }
  }
  // In training mode it stages no gates.
  net->train();
  for (auto& m : net->gate_means()) m->drop();
  net->forward({b.x0, b.x1}, StepPlan::regular(), presence);
  CHECK(net->gate_means()[0]->staged()[-1].item<double>() == 0.0);
  CHECK_THROWS_WITH(net->forward({b.x0, b.x1}, StepPlan::regular(), presence.to(at::kFloat)),
                    Catch::Contains("presence must be a bool (batch, branches) = (3, 2) tensor on cpu, got [3, 2] Float"));
  CHECK_THROWS_WITH(net->forward({b.x0, b.x1}, StepPlan::regular(), presence.narrow(0, 0, 2)),
                    Catch::Contains("got [2, 2] Bool"));
  CHECK_THROWS_WITH(net->forward({b.x0, b.x1}, StepPlan::regular(), at::Tensor()),
                    Catch::Contains("got an undefined tensor"));
}

TEST_CASE("SampleValuationPolicy's copies follow the original's bounds", "[sample-valuation]") {
  // (φ, copies): dataloader.py's `0.4 < c < 1` one copy, `-0.1 < c < 0.4` two,
  // `c < -0.1` three, and none otherwise, the bounds themselves included.
  const std::vector<std::pair<double, std::int64_t>> table{
      {1.5, 0}, {1.0, 0},  {0.99, 1}, {0.5, 1},  {0.41, 1}, {0.4, 0},   {0.39, 2},
      {0.0, 2}, {-0.09, 2}, {-0.1, 0}, {-0.11, 3}, {-0.5, 3}, {-1.0, 3}};
  at::Tensor phi = at::empty({static_cast<std::int64_t>(table.size()), 1}, at::kFloat);
  for (std::size_t i = 0; i < table.size(); ++i) phi[static_cast<std::int64_t>(i)][0] = table[i].first;
  const at::Tensor copies = SampleValuationPolicy::copies(phi);
  REQUIRE(copies.scalar_type() == at::kLong);
  for (std::size_t i = 0; i < table.size(); ++i) {
    INFO("phi " << table[i].first);
    CHECK(copies[static_cast<std::int64_t>(i)][0].item<std::int64_t>() == table[i].second);
  }
  CHECK_THROWS_WITH(SampleValuationPolicy::copies(at::zeros({3}, at::kFloat)),
                    Catch::Contains("contributions must be (samples, branches) floats, got [3]"));
}

TEST_CASE("SampleValuationPolicy's resampled rows: every sample, then its copies with one modality",
          "[sample-valuation]") {
  const at::Tensor copies = at::tensor({1, 0, 0, 2, 3, 1}, at::kLong).view({3, 2});
  const ResampledRows rows = SampleValuationPolicy::resampled_rows(copies);
  CHECK(as_doubles(rows.samples) == std::vector<double>{0, 1, 2, 0, 1, 1, 2, 2, 2, 2});
  const at::Tensor expected = presence_rows({{true, true}, {true, true}, {true, true},
                                             {true, false},                // sample 0, modality 0 alone
                                             {false, true}, {false, true},  // sample 1, modality 1 twice
                                             {true, false}, {true, false}, {true, false}, {false, true}});
  CHECK(torch::equal(rows.presence, expected));
  // Three branches: one copy of sample 0 with modality 2 alone.
  const ResampledRows three = SampleValuationPolicy::resampled_rows(at::tensor({0, 0, 1}, at::kLong).view({1, 3}));
  CHECK(as_doubles(three.samples) == std::vector<double>{0, 0});
  CHECK(torch::equal(three.presence, presence_rows({{true, true, true}, {false, false, true}})));
  CHECK_THROWS_WITH(SampleValuationPolicy::resampled_rows(at::tensor({1, -1}, at::kLong).view({1, 2})),
                    Catch::Contains("a negative number of copies"));
  CHECK_THROWS_WITH(SampleValuationPolicy::resampled_rows(at::ones({2, 2}, at::kFloat)),
                    Catch::Contains("copies must be (samples, branches) int64, got [2, 2]"));
}

TEST_CASE("SampleValuationPolicy trains CE(y) on the resampled rows", "[sample-valuation]") {
  Net net = small_late_net(39);
  const MultiModalBatch b = small_batch(6, 40);
  Balancer<SampleValuationPolicy> balancer(net, {}, BalancerOptions().warmup_epochs(0));
  const at::Tensor presence = presence_rows({{true, true}, {true, true}, {false, true}, {true, false}, {true, true}, {false, true}});
  const NetOutput out = net->forward({b.x0, b.x1}, balancer.next_plan(), presence);
  const at::Tensor loss = balancer.loss(out, b.target);
  // By hand: the mean over the rows of −log softmax(y)[target], y the mean of the heads.
  const at::Tensor y = (out.heads[0] + out.heads[1]) / 2;
  const at::Tensor by_hand = -(y.log_softmax(1).gather(1, b.target.unsqueeze(1))).mean();
  CHECK(loss.item<double>() == Approx(by_hand.item<double>()).epsilon(1e-6));
  // A late-fusion row without branch 0 sees its head's bias alone.
  CHECK(torch::allclose(out.heads[0][2], net->branch0->head(at::zeros_like(out.features[0][2]).unsqueeze(0))[0]));
  auto opt = make_sgd(net);
  opt.zero_grad();
  loss.backward();
  balancer.observe(loss);
  opt.step();
  CHECK(balancer.step() == 1);
}
