#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <tuple>

#include <cmath>

#include "support.h"

using namespace mmbalance;
using mmbalance::testing::small_batch;
using mmbalance::testing::small_net;

namespace {

// The official code's way: per parameter, two squared norms read to the host, summed there.
std::array<double, 4> naive_mu(const ParameterGroups& g) {
  std::array<const std::vector<at::Tensor>*, 4> lists{&g.branch[0], &g.branch[1], &g.fusion[0],
                                                      &g.fusion[1]};
  std::array<double, 4> mu{};
  for (int i = 0; i < 4; ++i) {
    double gs = 0, ps = 0;
    for (const auto& p : *lists[i]) {
      ps += p.to(at::kDouble).pow(2).sum().item<double>();
      if (p.grad().defined()) gs += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    }
    mu[i] = gs / ps;
  }
  return mu;
}

void backward_once(mmbalance::testing::Net& net, std::uint64_t seed) {
  auto b = small_batch(8, seed);
  net->zero_grad();
  modality_specific_loss(net->forward(b.x0, b.x1), b.target).backward();
}

}  // namespace

TEST_CASE("LearningSpeedMeter equals a naive per-parameter computation", "[meter]") {
  auto net = small_net(1);
  LearningSpeedMeter meter(net->parameter_groups());
  std::array<double, 4> expected_m{};
  for (std::uint64_t step = 0; step < 3; ++step) {
    backward_once(net, step);
    const auto naive = naive_mu(net->parameter_groups());
    const at::Tensor mu = LearningSpeedMeter::mu(meter.measure());
    for (int g = 0; g < 4; ++g) {
      CHECK(mu[g].item<double>() == Approx(naive[g]).epsilon(1e-6));
      expected_m[g] += naive[g];
    }
    meter.accumulate(mu);
    torch::NoGradGuard ng;
    for (auto& p : net->parameters()) p.sub_(p.grad() * 0.1);  // move the parameters
  }
  CHECK(meter.steps() == 3);
  const auto s = meter.summary();
  const double s10 = std::log10(expected_m[2] / expected_m[0]);
  const double s01 = std::log10(expected_m[3] / expected_m[1]);
  CHECK(s.s_m1_given_m0 == Approx(s10).epsilon(1e-6));
  CHECK(s.s_m0_given_m1 == Approx(s01).epsilon(1e-6));
  CHECK(s.d_speed == Approx(s10 - s01).epsilon(1e-6));
}

TEST_CASE("LearningSpeedMeter counts a shared parameter in both fusion groups", "[meter]") {
  auto net = small_net(2);
  backward_once(net, 7);
  LearningSpeedMeter meter(net->parameter_groups());
  const at::Tensor m = meter.measure();
  // Named by hand from MMTM's layout, not from the library's group lists: the joint layer
  // (`joint`) is on both paths, each excitation on its own side's.
  double grad0 = 0, grad1 = 0, param0 = 0, param1 = 0;
  for (const auto& tap : net->taps) {
    const auto& f = tap.module;
    for (const auto& layer : {f->joint, f->excite[0]}) {
      for (const auto& p : {layer->weight, layer->bias}) {
        param0 += p.pow(2).sum().item<double>();
        grad0 += p.grad().pow(2).sum().item<double>();
      }
    }
    for (const auto& layer : {f->joint, f->excite[1]}) {
      for (const auto& p : {layer->weight, layer->bias}) {
        param1 += p.pow(2).sum().item<double>();
        grad1 += p.grad().pow(2).sum().item<double>();
      }
    }
  }
  CHECK(m[1][2].item<double>() == Approx(param0).epsilon(1e-6));  // ||θ0'||²
  CHECK(m[1][3].item<double>() == Approx(param1).epsilon(1e-6));  // ||θ1'||²
  CHECK(m[0][2].item<double>() == Approx(grad0).epsilon(1e-6));   // ||G(θ0')||²
  CHECK(m[0][3].item<double>() == Approx(grad1).epsilon(1e-6));   // ||G(θ1')||²
  CHECK(m[0][3].item<double>() != Approx(m[0][2].item<double>()));  // two different groups
}

TEST_CASE("LearningSpeedMeter treats a missing gradient as zero", "[meter]") {
  auto net = small_net(3);
  LearningSpeedMeter meter(net->parameter_groups());
  net->zero_grad(/*set_to_none=*/true);
  const at::Tensor m = meter.measure();
  CHECK(m[0].sum().item<double>() == 0.0);
  CHECK(m[1].min().item<double>() > 0.0);
}

TEST_CASE("LearningSpeedMeter summary is NaN before any step", "[meter]") {
  auto net = small_net(4);
  LearningSpeedMeter meter(net->parameter_groups());
  CHECK(std::isnan(meter.summary().d_speed));
}

TEST_CASE("LearningSpeedMeter::restore refuses counts it cannot hold, changing nothing",
          "[meter][bad-input]") {
  auto net = small_net(3);
  LearningSpeedMeter meter(net->parameter_groups());
  meter.restore(at::full({4}, 2.0, at::kDouble), 5, 1);
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  CHECK_THROWS_WITH(meter.restore(at::zeros({4}, at::kDouble), big, 1),
                    Catch::Contains("sum representable") && Catch::Contains("1 skipped"));
  CHECK_THROWS_WITH(meter.restore(at::zeros({4}, at::kDouble), 1, -1), Catch::Contains(">= 0"));
  CHECK_THROWS_WITH(meter.restore(at::zeros({3}, at::kDouble), 1, 0), Catch::Contains("4 entries"));
  CHECK(meter.steps() == 5);
  CHECK(torch::equal(meter.accumulated(), at::full({4}, 2.0, at::kDouble)));
}

TEST_CASE("LearningSpeedMeter for three branches equals a naive computation of s_k",
          "[meter][n-way]") {
  using ThreeWay = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, MMTM>;
  torch::manual_seed(40);
  auto opts = [](std::int64_t in, std::vector<std::int64_t> c) {
    return ConvBranchOptions(in, 3).channels(c).strides(std::vector<std::int64_t>(c.size(), 1));
  };
  ThreeWay net(std::tuple{ConvBranch(opts(3, {4, 6})), ConvBranch(opts(1, {5, 8})),
                          ConvBranch(opts(2, {3, 4}))},
               {{{0, 0, 0}, MMTM(MMTMOptions({4, 5, 3}))},
                {{1, 1, 1}, MMTM(MMTMOptions({6, 8, 4}))}});
  const ParameterGroups groups = net->parameter_groups();
  LearningSpeedMeter meter(groups);
  REQUIRE(meter.num_groups() == 6);
  CHECK(meter.group_name(4) == "theta1' (fusion path into branch 1)");
  // The official code's way, per parameter and read to the host, for the 6 groups.
  auto naive = [&] {
    std::vector<double> mu;
    for (const auto* lists : {&groups.branch, &groups.fusion}) {
      for (const auto& group : *lists) {
        double gs = 0, ps = 0;
        for (const auto& p : group) {
          ps += p.to(at::kDouble).pow(2).sum().item<double>();
          if (p.grad().defined()) gs += p.grad().to(at::kDouble).pow(2).sum().item<double>();
        }
        mu.push_back(gs / ps);
      }
    }
    return mu;
  };
  std::vector<double> m(6, 0.0);
  for (std::uint64_t step = 0; step < 3; ++step) {
    auto gen = at::detail::createCPUGenerator(step);
    std::vector<at::Tensor> x = {at::randn({6, 3, 6, 6}, gen), at::randn({6, 1, 6, 6}, gen),
                                 at::randn({6, 2, 6, 6}, gen)};
    const at::Tensor target = at::randint(3, {6}, gen);
    net->zero_grad();
    const NetOutput out = net->forward(x);
    at::Tensor loss = at::cross_entropy_loss(out.heads[0], target);
    for (std::size_t k = 1; k < 3; ++k) loss = loss + at::cross_entropy_loss(out.heads[k], target);
    loss.backward();
    const auto expect = naive();
    const at::Tensor mu = LearningSpeedMeter::mu(meter.measure());
    REQUIRE(mu.numel() == 6);
    for (int g = 0; g < 6; ++g) {
      CHECK(mu[g].item<double>() == Approx(expect[g]).epsilon(1e-6));
      m[g] += expect[g];
    }
    meter.accumulate(mu);
  }
  const SpeedSummary s = meter.summary();
  std::vector<double> speeds;
  for (int k = 0; k < 3; ++k) speeds.push_back(std::log10(m[3 + k] / m[k]));
  REQUIRE(s.speeds.size() == 3);
  for (int k = 0; k < 3; ++k) CHECK(s.speeds[k] == Approx(speeds[k]).epsilon(1e-6));
  const auto hi = std::max_element(speeds.begin(), speeds.end());
  CHECK(s.spread == Approx(*hi - *std::min_element(speeds.begin(), speeds.end())).epsilon(1e-6));
  CHECK(s.fastest == hi - speeds.begin());
  // No signed two-branch values for three branches.
  CHECK(std::isnan(s.d_speed));
  CHECK(std::isnan(s.s_m1_given_m0));
  CHECK(std::isnan(s.s_m0_given_m1));
}

TEST_CASE("LearningSpeedMeter for two branches of an N-branch net is the two-branch meter",
          "[meter][n-way]") {
  auto net = small_net(41);
  backward_once(net, 42);
  const ParameterGroups g = net->parameter_groups();
  LearningSpeedMeter pair(g);
  LearningSpeedMeter n_way(ParameterGroups{{g.branch[0], g.branch[1]}, {g.fusion[0], g.fusion[1]}});
  CHECK(torch::equal(pair.measure(), n_way.measure()));
  pair.accumulate(LearningSpeedMeter::mu(pair.measure()));
  n_way.accumulate(LearningSpeedMeter::mu(n_way.measure()));
  const SpeedSummary a = pair.summary();
  const SpeedSummary b = n_way.summary();
  CHECK(b.speeds == std::vector<double>{a.s_m1_given_m0, a.s_m0_given_m1});
  CHECK(b.d_speed == a.d_speed);
}

TEST_CASE("SpeedSummary from a table of accumulators", "[meter][n-way]") {
  // M: branches 1, 10, 100; fusion paths 10, 10, 10 -> s = 1, 0, -1.
  const SpeedSummary s = SpeedSummary::from_accumulators({1, 10, 100, 10, 10, 10});
  CHECK(s.speeds == std::vector<double>{1.0, 0.0, -1.0});
  CHECK(s.spread == 2.0);
  CHECK(s.fastest == 0);
  CHECK(std::isnan(s.d_speed));  // three branches: no signed value
  // Two branches: M 100, 1, then 10, 10 -> s = -1, 1: d_speed signed, the spread not.
  const SpeedSummary two = SpeedSummary::from_accumulators({100, 1, 10, 10});
  CHECK(two.d_speed == -2.0);
  CHECK(two.spread == 2.0);
  CHECK(two.s_m1_given_m0 == -1.0);
  CHECK(two.s_m0_given_m1 == 1.0);
  CHECK(two.fastest == 1);
  // A frozen group (M = 0): NaN, no fastest branch.
  const SpeedSummary frozen = SpeedSummary::from_accumulators({1, 0, 1, 10, 10, 10});
  CHECK(std::isnan(frozen.speeds[1]));
  CHECK(std::isnan(frozen.spread));
  CHECK(frozen.fastest == -1);
  const SpeedSummary frozen_two = SpeedSummary::from_accumulators({1, 0, 10, 10});
  CHECK(std::isnan(frozen_two.d_speed));
  CHECK(std::isnan(frozen_two.spread));
  CHECK_THROWS_WITH(SpeedSummary::from_accumulators({1, 2, 3}), Catch::Contains("got 3"));
  // Ties: the lowest index is the fastest.
  CHECK(SpeedSummary::from_accumulators({1, 1, 10, 10, 10, 10}).fastest == 0);
  CHECK(SpeedSummary::from_accumulators({10, 1, 1, 10, 10, 10}).fastest == 1);
}

TEST_CASE("LearningSpeedMeter rejects empty groups", "[meter][bad-input]") {
  auto net = small_net(5);
  auto groups = net->parameter_groups();
  groups.fusion[1].clear();  // one fusion path but not the other: no network has that
  CHECK_THROWS_WITH(LearningSpeedMeter(groups), Catch::Contains("theta1'") &&
                                                    Catch::Contains("is empty (a late-fusion"));
  groups = net->parameter_groups();
  groups.branch[0].clear();
  CHECK_THROWS_WITH(LearningSpeedMeter(groups), Catch::Contains("theta0 (branch 0) is empty"));
  groups = net->parameter_groups();  // a late-fusion network with an empty branch
  groups.fusion[0].clear();
  groups.fusion[1].clear();
  groups.branch[1].clear();
  CHECK_THROWS_WITH(LearningSpeedMeter(groups), Catch::Contains("theta1 (branch 1) is empty"));
}

TEST_CASE("LearningSpeedMeter on a late-fusion network: the branches' mu as computed naively, "
          "0 for the absent fusion paths, undefined speeds", "[meter][late-fusion]") {
  auto net = mmbalance::testing::small_late_net(6);
  LearningSpeedMeter meter(net->parameter_groups());
  CHECK(meter.late_fusion());
  CHECK_FALSE(LearningSpeedMeter(small_net(6)->parameter_groups()).late_fusion());
  for (std::uint64_t step = 0; step < 2; ++step) {
    backward_once(net, step);
    const auto naive = naive_mu(net->parameter_groups());  // 0 / 0 for the empty groups
    const at::Tensor mu = LearningSpeedMeter::mu(meter.measure());
    CHECK(mu[0].item<double>() == Approx(naive[0]).epsilon(1e-6));
    CHECK(mu[1].item<double>() == Approx(naive[1]).epsilon(1e-6));
    CHECK(mu[2].item<double>() == 0.0);
    CHECK(mu[3].item<double>() == 0.0);
    meter.accumulate(mu);
  }
  const auto s = meter.summary();
  CHECK(std::isnan(s.s_m1_given_m0));
  CHECK(std::isnan(s.s_m0_given_m1));
  CHECK(std::isnan(s.d_speed));
}

TEST_CASE("The meter's CPU sums of squares equal LibTorch's", "[meter]") {
  // Sizes around the 256-value blocks, a scalar, an empty tensor, float and double.
  std::vector<at::Tensor> tensors{at::randn({100'003}), at::randn({256}), at::randn({255}),
                                  at::randn({}), at::randn({0}), at::randn({3, 40'000}, at::kDouble)};
  const at::Tensor got = mmbalance::detail::cpu_sums_of_squares(tensors);
  REQUIRE(got.size(0) == 6);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const double want = tensors[i].to(at::kDouble).square().sum().item<double>();
    CHECK(got[static_cast<std::int64_t>(i)].item<double>() == Approx(want).epsilon(1e-6));
  }
  tensors[1][7] = NAN;
  tensors[2][254] = INFINITY;
  const at::Tensor bad = mmbalance::detail::cpu_sums_of_squares(tensors);
  CHECK(std::isnan(bad[1].item<double>()));
  CHECK(std::isinf(bad[2].item<double>()));
  CHECK(mmbalance::detail::cpu_sums_of_squares_apply(tensors));
  CHECK_FALSE(mmbalance::detail::cpu_sums_of_squares_apply({at::randn({4, 5}).t()}));
  CHECK_FALSE(mmbalance::detail::cpu_sums_of_squares_apply({at::randn({4}).to(at::kHalf)}));
}
