#include <catch2/catch.hpp>

#include <sstream>

#include "support.h"

using namespace mmbalance;

TEST_CASE("RunningMean: staged rows count only once committed, weighted by samples",
          "[running_mean]") {
  RunningMean m(2, /*initial=*/1.0);
  CHECK(torch::equal(m->mean, torch::tensor({1.0, 1.0}, at::kDouble)));
  CHECK(m->samples.item<double>() == 0.0);

  m->stage(torch::tensor({{1.0, 2.0}, {3.0, 4.0}}));       // 2 rows
  m->stage(torch::tensor({{5.0, 6.0}}, at::kFloat));        // 1 row, float
  CHECK(torch::equal(m->staged(), torch::tensor({9.0, 12.0, 3.0}, at::kDouble)));
  CHECK(torch::equal(m->mean, torch::tensor({1.0, 1.0}, at::kDouble)));  // not yet
  m->commit();
  // Mean of the 3 rows: (1+3+5)/3, (2+4+6)/3; the initial value carries no weight.
  CHECK(torch::allclose(m->mean, torch::tensor({3.0, 4.0}, at::kDouble), 0, 1e-15));
  CHECK(m->samples.item<double>() == 3.0);
  CHECK(torch::equal(m->staged(), torch::zeros({3}, at::kDouble)));

  // One more row of (7, 0): the mean of 4 rows, not the mean of two batch means.
  m->stage(torch::tensor({{7.0, 0.0}}));
  m->commit();
  CHECK(torch::allclose(m->mean, torch::tensor({4.0, 3.0}, at::kDouble), 0, 1e-15));
  CHECK(m->samples.item<double>() == 4.0);

  // Dropped rows and a commit of nothing change nothing.
  m->stage(torch::tensor({{100.0, 100.0}}));
  m->drop();
  m->commit();
  m->commit();
  CHECK(torch::allclose(m->mean, torch::tensor({4.0, 3.0}, at::kDouble), 0, 1e-15));
  CHECK(m->samples.item<double>() == 4.0);

  m->clear();
  CHECK(torch::equal(m->mean, torch::tensor({1.0, 1.0}, at::kDouble)));
  CHECK(m->samples.item<double>() == 0.0);
}

TEST_CASE("RunningMean: staged sums of two shards, added up, commit like one batch",
          "[running_mean]") {
  auto rows = at::randn({7, 3}, at::detail::createCPUGenerator(3));
  RunningMean whole(3), shard0(3), shard1(3);
  whole->stage(rows);
  whole->commit();
  shard0->stage(rows.narrow(0, 0, 4));
  shard1->stage(rows.narrow(0, 4, 3));
  // What DataParallel does: add the staged sums up in place on every rank, then commit.
  const at::Tensor total = shard0->staged() + shard1->staged();
  shard0->staged().copy_(total);
  shard0->commit();
  CHECK(torch::allclose(shard0->mean, rows.to(at::kDouble).mean(0), 0, 1e-12));
  CHECK(torch::allclose(shard0->mean, whole->mean, 0, 1e-12));
  CHECK(shard0->samples.item<double>() == 7.0);
}

TEST_CASE("RunningMean keeps exact double counts under the model's dtype moves",
          "[running_mean]") {
  // In half precision 2048 + 1 == 2048, in bfloat16 256 + 1 == 256: counts must not follow.
  for (const auto dtype : {at::kHalf, at::kBFloat16, at::kFloat}) {
    RunningMean m(2);
    m->to(dtype);
    CHECK(m->mean.scalar_type() == at::kDouble);
    CHECK(m->samples.scalar_type() == at::kDouble);
    for (int i = 0; i < 9; ++i) {
      m->stage(torch::ones({1000, 2}, dtype));
      m->commit();
    }
    m->stage(torch::full({1, 2}, 3.0, dtype));
    m->commit();
    CHECK(m->samples.item<double>() == 9001.0);
    CHECK(m->mean[0].item<double>() == Approx((9000.0 + 3.0) / 9001.0).epsilon(1e-12));
  }
  RunningMean m(2);
  m->to(at::Device(at::kCPU), at::kHalf);
  CHECK(m->mean.scalar_type() == at::kDouble);
}

TEST_CASE("RunningMean: committed state saves and clones, staged rows do not travel",
          "[running_mean]") {
  RunningMean m(2);
  m->stage(torch::tensor({{1.0, 3.0}}));
  m->commit();
  m->stage(torch::tensor({{5.0, 5.0}}));  // staged, not committed
  std::stringstream buffer;
  torch::save(m, buffer);
  RunningMean loaded(2);
  torch::load(loaded, buffer);
  CHECK(torch::equal(loaded->mean, m->mean));
  CHECK(loaded->samples.item<double>() == 1.0);
  CHECK(torch::equal(loaded->staged(), torch::zeros({3}, at::kDouble)));

  auto copy = std::dynamic_pointer_cast<RunningMeanImpl>(m->clone());
  CHECK(torch::equal(copy->mean, m->mean));
  CHECK_FALSE(copy->mean.is_same(m->mean));
  CHECK(torch::equal(copy->staged(), torch::zeros({3}, at::kDouble)));
}

TEST_CASE("RunningMean rejects rows of the wrong shape", "[running_mean][bad-input]") {
  RunningMean m(3);
  CHECK_THROWS_WITH(m->stage(torch::zeros({2, 4})),
                    Catch::Contains("expected (batch, 3) rows") && Catch::Contains("[2, 4]"));
  CHECK_THROWS_WITH(m->stage(torch::zeros({3})), Catch::Contains("[3]"));
  CHECK_THROWS_WITH(RunningMean(0), Catch::Contains("dim must be positive, got 0"));
}
