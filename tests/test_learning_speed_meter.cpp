#include <catch2/catch.hpp>

#include <limits>

#include <cmath>

#include "support.h"

using namespace mmbalance;
using mmbalance::testing::small_batch;
using mmbalance::testing::small_net;

namespace {

// The official code's way: per parameter, two squared norms read to the host, summed there.
std::array<double, 4> naive_mu(const ParameterGroups& g) {
  std::array<const std::vector<at::Tensor>*, 4> lists{&g.theta0, &g.theta1, &g.theta0_fusion,
                                                      &g.theta1_fusion};
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
    const at::Tensor mu = LearningSpeedMeter::speeds(meter.measure());
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
  // (`squeeze`) is on both paths, each excitation on its own side's.
  double grad0 = 0, grad1 = 0, param0 = 0, param1 = 0;
  for (const auto& tap : net->taps) {
    const auto& f = tap.module;
    for (const auto& layer : {f->squeeze, f->excite0}) {
      for (const auto& p : {layer->weight, layer->bias}) {
        param0 += p.pow(2).sum().item<double>();
        grad0 += p.grad().pow(2).sum().item<double>();
      }
    }
    for (const auto& layer : {f->squeeze, f->excite1}) {
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

TEST_CASE("LearningSpeedMeter rejects empty groups", "[meter][bad-input]") {
  auto net = small_net(5);
  auto groups = net->parameter_groups();
  groups.theta1_fusion.clear();
  CHECK_THROWS_WITH(LearningSpeedMeter(groups), Catch::Contains("theta1'") &&
                                                    Catch::Contains("is empty"));
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
