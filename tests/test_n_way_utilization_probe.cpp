#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <tuple>
#include <vector>

#include "support.h"

using namespace mmbalance;

namespace {

using testing::small_three_way;
using testing::ThreeWay;

// `shift` moves every modality's statistics: the probe's training data gets other
// averages than its evaluation data, so that cutting the other modalities matters.
std::vector<NWayBatch> three_way_batches(int count, std::int64_t n, std::uint64_t seed,
                                         double shift = 0.0) {
  std::vector<NWayBatch> out;
  for (int i = 0; i < count; ++i) {
    auto gen = at::detail::createCPUGenerator(seed + static_cast<std::uint64_t>(i));
    const double scale = 1.0 + std::abs(shift);
    out.push_back({{at::randn({n, 3, 8, 8}, gen) * scale + shift,
                    at::randn({n, 1, 8, 8}, gen) * scale - shift,
                    at::randn({n, 2, 8, 8}, gen) * scale + shift},
                   at::randint(3, {n}, gen)});
  }
  return out;
}

// Fusion weights scaled up so that the gates swing with the squeeze vectors: in a small
// untrained network they hardly move, and cutting a modality would change no prediction.
void sharpen_fusion(torch::nn::Module& net) {
  torch::NoGradGuard no_grad;
  for (const auto& p : net.named_parameters()) {
    if (p.key().rfind("fusion", 0) == 0 && p.key().find("weight") != std::string::npos) {
      p.value().mul_(12.0);
    }
  }
}

}  // namespace

TEST_CASE("N-branch probe with two branches reports what the two-branch probe reports",
          "[n-way-probe]") {
  testing::Net pair = testing::small_net(70);
  // Train a little so that the heads and the cut heads disagree on some samples.
  auto opt = torch::optim::SGD(pair->parameters(), torch::optim::SGDOptions(0.05));
  VanillaBalancer balancer(pair);
  testing::train_steps(pair, opt, balancer, 0, 8, 4);
  sharpen_fusion(*pair);
  testing::TwoWay n_way = testing::small_two_way();
  testing::copy_state(pair, n_way);

  std::vector<MultiModalBatch> train, eval;
  std::vector<NWayBatch> n_train, n_eval;
  for (int i = 0; i < 3; ++i) {
    // Training data with other statistics than the evaluation data: the squeeze averages
    // the cut network reads are far from any evaluation sample's, so cutting matters.
    MultiModalBatch t = testing::small_batch(8, 100 + i);
    t.x0 = t.x0 * 4.0 + 3.0;
    t.x1 = t.x1 * 4.0 - 3.0;
    train.push_back(t);
    eval.push_back(testing::small_batch(10, 200 + i));
    n_train.push_back({{train.back().x0, train.back().x1}, train.back().target});
    n_eval.push_back({{eval.back().x0, eval.back().x1}, eval.back().target});
  }
  const UtilizationReport p = probe_utilization(pair, train, eval);
  const NWayUtilizationReport q = probe_utilization(n_way, n_train, n_eval);
  INFO("u " << p.u_m1_given_m0 << " " << p.u_m0_given_m1 << " acc " << p.accuracy0 << " "
            << p.accuracy0_cut << " " << p.accuracy1 << " " << p.accuracy1_cut);
  REQUIRE(p.u_m1_given_m0 != p.u_m0_given_m1);  // a setup where the sign of d_util shows
  CHECK(q.samples == p.samples);
  CHECK(q.accuracy == p.accuracy);
  CHECK(q.head_accuracy == std::vector<double>{p.accuracy0, p.accuracy1});
  CHECK(q.cut_accuracy == std::vector<double>{p.accuracy0_cut, p.accuracy1_cut});
  REQUIRE(q.utilization.size() == 2);
  CHECK(q.utilization[0] == p.u_m1_given_m0);
  CHECK(q.utilization[1] == p.u_m0_given_m1);
  CHECK(q.d_util == p.d_util);  // signed, as the paper's
  CHECK(testing::same_state(*pair, *n_way));  // the squeeze averages too
}

TEST_CASE("N-branch probe with three branches counts every head and cut head",
          "[n-way-probe]") {
  ThreeWay net = small_three_way(71);
  sharpen_fusion(*net);
  const auto train = three_way_batches(3, 6, 300, 3.0);
  const auto eval = three_way_batches(4, 5, 400);
  const NWayUtilizationReport r = probe_utilization(net, train, eval);
  REQUIRE(r.cut_accuracy != r.head_accuracy);  // cutting changes predictions here
  CHECK(net->is_training());  // restored

  // The same counts by hand: live heads from plain eval-mode passes, cut heads from the
  // probe's pass, correct predictions tallied one sample at a time.
  net->eval();
  std::vector<double> head(3, 0.0), cut(3, 0.0);
  double mean_correct = 0;
  std::int64_t samples = 0;
  for (const auto& b : eval) {
    const NWayOutput live = net->forward(b.inputs);
    const NWayProbeOutput probe = net->forward_probe(b.inputs);
    for (std::int64_t s = 0; s < b.target.size(0); ++s) {
      const std::int64_t t = b.target[s].item<std::int64_t>();
      mean_correct += live.y[s].argmax().item<std::int64_t>() == t;
      for (std::size_t k = 0; k < 3; ++k) {
        head[k] += live.heads[k][s].argmax().item<std::int64_t>() == t;
        cut[k] += probe.cut_heads[k][s].argmax().item<std::int64_t>() == t;
      }
      ++samples;
    }
  }
  net->train();
  CHECK(r.samples == 20);
  CHECK(r.accuracy == Approx(mean_correct / 20.0));
  std::vector<double> u;
  for (std::size_t k = 0; k < 3; ++k) {
    CHECK(r.head_accuracy[k] == Approx(head[k] / 20.0));
    CHECK(r.cut_accuracy[k] == Approx(cut[k] / 20.0));
    u.push_back((head[k] - cut[k]) / head[k]);
    CHECK(r.utilization[k] == Approx(u.back()));
  }
  CHECK(r.d_util == Approx(*std::max_element(u.begin(), u.end()) -
                           *std::min_element(u.begin(), u.end())));
  CHECK(r.d_util >= 0.0);
}

TEST_CASE("N-branch probe: averages over ranks, and bad input with the values",
          "[n-way-probe][bad-input]") {
  ThreeWay net = small_three_way(72);
  const auto train = three_way_batches(2, 4, 500);
  const auto eval = three_way_batches(2, 4, 600);
  const NWayUtilizationReport one = probe_utilization(net, train, eval);
  // Two identical "ranks": sums doubled, the same averages and accuracies.
  auto twice = [](at::Tensor& t) { t.mul_(2); };
  const NWayUtilizationReport two = probe_utilization(net, train, eval, twice);
  CHECK(two.samples == 2 * one.samples);
  CHECK(two.head_accuracy == one.head_accuracy);
  CHECK(two.cut_accuracy == one.cut_accuracy);

  CHECK_THROWS_WITH(evaluate_utilization(net, std::vector<NWayBatch>{}),
                    Catch::Contains("evaluation data is empty"));
  // A rank with an empty shard still takes part in the sum: it gets the other rank's
  // counts (here: those of `one`, added by hand) instead of failing alone.
  at::Tensor other = at::zeros({8}, at::kLong);
  other[0] = static_cast<std::int64_t>(std::llround(one.accuracy * one.samples));
  for (int k = 0; k < 3; ++k) {
    other[1 + k] = static_cast<std::int64_t>(std::llround(one.head_accuracy[k] * one.samples));
    other[4 + k] = static_cast<std::int64_t>(std::llround(one.cut_accuracy[k] * one.samples));
  }
  other[7] = one.samples;
  const NWayUtilizationReport empty_rank =
      evaluate_utilization(net, std::vector<NWayBatch>{}, [&](at::Tensor& t) { t.add_(other); });
  CHECK(empty_rank.samples == one.samples);
  CHECK(empty_rank.head_accuracy == one.head_accuracy);
  CHECK(empty_rank.cut_accuracy == one.cut_accuracy);
  std::vector<NWayBatch> wrong_target = eval;
  wrong_target[1].target = wrong_target[1].target.narrow(0, 0, 3);
  CHECK_THROWS_WITH(evaluate_utilization(net, wrong_target),
                    Catch::Contains("batch 4") && Catch::Contains("[3]"));
  // A pass of one's own with record_squeeze, then commit_squeeze_averages: the same
  // averages as record_squeeze_averages over the same data.
  ThreeWay own = small_three_way(72);
  {
    EvalModeGuard<ThreeWay> eval_mode(own);
    own->reset_squeeze_averages();
    for (const auto& b : train) own->record_squeeze(b.inputs);
  }
  CHECK_FALSE(own->has_squeeze_averages());  // staged, not committed
  commit_squeeze_averages(own);
  record_squeeze_averages(net, train);
  CHECK(testing::same_state(*own, *net));
  ThreeWay fresh = small_three_way(73);
  CHECK_THROWS_WITH(evaluate_utilization(fresh, eval), Catch::Contains("no squeeze averages"));
  CHECK(fresh->is_training());
}
