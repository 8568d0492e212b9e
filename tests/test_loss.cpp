#include <catch2/catch.hpp>

#include "support.h"

using namespace mmbalance;

TEST_CASE("modality_specific_loss is CE(y0) + CE(y1)", "[loss]") {
  auto y0 = at::randn({4, 3}), y1 = at::randn({4, 3});
  auto t = at::tensor({0, 2, 1, 2}, at::kLong);
  ModelOutput out{(y0 + y1) / 2, y0, y1};
  auto expected = -(at::log_softmax(y0, 1).gather(1, t.unsqueeze(1)).mean() +
                    at::log_softmax(y1, 1).gather(1, t.unsqueeze(1)).mean());
  CHECK(modality_specific_loss(out, t).item<double>() == Approx(expected.item<double>()));
  const auto heads = modality_losses(out, t);
  CHECK(heads.loss0.item<double>() ==
        Approx(-at::log_softmax(y0, 1).gather(1, t.unsqueeze(1)).mean().item<double>()));
  CHECK(heads.loss1.item<double>() ==
        Approx(-at::log_softmax(y1, 1).gather(1, t.unsqueeze(1)).mean().item<double>()));
}

TEST_CASE("modality_specific_loss names a bad target shape", "[loss][bad-input]") {
  ModelOutput out{at::randn({4, 3}), at::randn({4, 3}), at::randn({4, 3})};
  CHECK_THROWS_WITH(modality_specific_loss(out, at::zeros({5}, at::kLong)),
                    Catch::Contains("batch 4, got [5]"));
}
