#include <catch2/catch.hpp>

#include "support.h"

using namespace mmbalance;

TEST_CASE("modality_specific_loss is CE(y0) + CE(y1)", "[loss]") {
  auto y0 = at::randn({4, 3}), y1 = at::randn({4, 3});
  auto t = at::tensor({0, 2, 1, 2}, at::kLong);
  const NetOutput out{(y0 + y1) / 2, {y0, y1}, {}};
  auto expected = -(at::log_softmax(y0, 1).gather(1, t.unsqueeze(1)).mean() +
                    at::log_softmax(y1, 1).gather(1, t.unsqueeze(1)).mean());
  CHECK(modality_specific_loss(out, t).item<double>() == Approx(expected.item<double>()));
  const auto heads = modality_losses(out, t);
  CHECK(heads[0].item<double>() ==
        Approx(-at::log_softmax(y0, 1).gather(1, t.unsqueeze(1)).mean().item<double>()));
  CHECK(heads[1].item<double>() ==
        Approx(-at::log_softmax(y1, 1).gather(1, t.unsqueeze(1)).mean().item<double>()));
}

TEST_CASE("modality_specific_loss names a bad target shape", "[loss][bad-input]") {
  const NetOutput out{at::randn({4, 3}), {at::randn({4, 3}), at::randn({4, 3})}, {}};
  CHECK_THROWS_WITH(modality_specific_loss(out, at::zeros({5}, at::kLong)),
                    Catch::Contains("batch 4, got [5]"));
}

TEST_CASE("modality_specific_loss for N heads is the sum of each head's CE", "[loss]") {
  auto gen = at::detail::createCPUGenerator(5);
  const std::vector<at::Tensor> heads = {at::randn({4, 3}, gen), at::randn({4, 3}, gen),
                                         at::randn({4, 3}, gen)};
  const auto t = at::tensor({0, 2, 1, 2}, at::kLong);
  const NetOutput out{(heads[0] + heads[1] + heads[2]) / 3, heads, {}};
  // By hand: the log-softmax of each row, at its target, averaged over the rows.
  double expected_sum = 0;
  const auto losses = modality_losses(out, t);
  REQUIRE(losses.size() == 3);
  for (std::size_t k = 0; k < 3; ++k) {
    double ce = 0;
    for (std::int64_t r = 0; r < 4; ++r) {
      double norm = 0;
      for (std::int64_t c = 0; c < 3; ++c) norm += std::exp(heads[k][r][c].item<double>());
      ce -= heads[k][r][t[r].item<std::int64_t>()].item<double>() - std::log(norm);
    }
    CHECK(losses[k].item<double>() == Approx(ce / 4));
    expected_sum += ce / 4;
  }
  CHECK(modality_specific_loss(out, t).item<double>() == Approx(expected_sum));
  CHECK_THROWS_WITH(modality_specific_loss(out, at::zeros({5}, at::kLong)),
                    Catch::Contains("batch 4, got [5]"));
}

TEST_CASE("fused_loss is CE of y alone, and each Objective's terms", "[loss]") {
  auto y0 = at::randn({4, 3}), y1 = at::randn({4, 3});
  auto t = at::tensor({0, 2, 1, 2}, at::kLong);
  const NetOutput out{(y0 + y1) / 2, {y0, y1}, {}};
  // −log softmax(y)[t] averaged, written out with the log-sum-exp.
  const at::Tensor y = (y0 + y1) / 2;
  double by_hand = 0;
  for (std::int64_t i = 0; i < 4; ++i) {
    double z = 0;
    for (std::int64_t c = 0; c < 3; ++c) z += std::exp(y[i][c].item<double>());
    by_hand += std::log(z) - y[i][t[i].item<std::int64_t>()].item<double>();
  }
  CHECK(fused_loss(out, t).item<double>() == Approx(by_hand / 4).epsilon(1e-6));
  CHECK_THROWS_WITH(fused_loss(out, at::zeros({5}, at::kLong)), Catch::Contains("batch 4, got [5]"));
  // Which terms each objective trains, weight 1 each: heads, then y.
  const struct {
    Objective objective;
    std::vector<double> heads;
    double fused;
  } table[] = {{Objective::modality_specific, {1, 1, 1}, 0},
               {Objective::fused, {0, 0, 0}, 1},
               {Objective::fused_and_modality_specific, {1, 1, 1}, 1}};
  for (const auto& row : table) {
    const LossWeights w = weights_of(row.objective, 3);
    CHECK(w.heads == row.heads);
    CHECK(w.fused == row.fused);
  }
  CHECK(to_string(Objective::fused) == "fused");
  CHECK(to_string(static_cast<Objective>(7)) == "invalid");
}
