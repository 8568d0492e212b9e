#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <tuple>
#include <vector>

#include "reference/two_branch.h"
#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

std::vector<MultiModalBatch> probe_batches(int n, std::uint64_t seed) {
  std::vector<MultiModalBatch> out;
  for (int i = 0; i < n; ++i) out.push_back(small_batch(8, seed + static_cast<std::uint64_t>(i)));
  return out;
}

// Relabels the data with the model's own predictions of `head` (0: y0, 1: y1), so that
// head's accuracy is 1.
void label_with_predictions(Net& net, std::vector<MultiModalBatch>& data, int head) {
  torch::NoGradGuard ng;
  net->eval();
  for (auto& b : data) {
    auto out = net->forward(b.x0, b.x1);
    b.target = (head == 0 ? out.y0 : out.y1).argmax(1);
  }
  net->train();
}

// The first half of the batches labelled by head y0, the rest by y1: both heads are
// right on at least half the samples.
void label_half_by_each_head(Net& net, std::vector<MultiModalBatch>& data) {
  std::vector<MultiModalBatch> by0(data.begin(), data.begin() + data.size() / 2),
      by1(data.begin() + data.size() / 2, data.end());
  label_with_predictions(net, by0, 0);
  label_with_predictions(net, by1, 1);
  data = by0;
  data.insert(data.end(), by1.begin(), by1.end());
}

// Zeroes, in every MMTM's joint layer, the columns that read side `side`'s squeeze vector.
void blind_joint_layers_to(Net& net, int side) {
  torch::NoGradGuard ng;
  for (auto& tap : net->taps) {
    auto& w = tap.module->joint->weight;
    const int64_t c0 = tap.module->options.dims()[0];
    if (side == 1) w.narrow(1, c0, w.size(1) - c0).zero_();
    else w.narrow(1, 0, c0).zero_();
  }
}

}  // namespace

TEST_CASE("Utilization probe: branch 0 that cannot use m1 gives u(m1|m0) = 0", "[probe]") {
  auto net = small_net(21);
  blind_joint_layers_to(net, 1);
  auto train = probe_batches(3, 100);
  auto eval = probe_batches(4, 200);
  label_half_by_each_head(net, eval);
  const auto r = probe_utilization(net, train, eval);
  CHECK(r.samples == 32);
  CHECK(r.accuracy0 >= 0.5);
  CHECK(r.accuracy0_cut == r.accuracy0);
  CHECK(r.u_m1_given_m0 == 0.0);
  CHECK(r.d_util == Approx(-r.u_m0_given_m1));
  CHECK(net->is_training());  // mode restored
}

TEST_CASE("Utilization probe: the symmetric case gives u(m0|m1) = 0", "[probe]") {
  auto net = small_net(22);
  blind_joint_layers_to(net, 0);
  auto train = probe_batches(2, 300);
  auto eval = probe_batches(3, 400);
  label_half_by_each_head(net, eval);
  const auto r = probe_utilization(net, train, eval);
  CHECK(r.accuracy1 >= 0.5);
  CHECK(r.accuracy1_cut == r.accuracy1);
  CHECK(r.u_m0_given_m1 == 0.0);
}

TEST_CASE("Utilization probe equals the cut network computed tap by tap", "[probe]") {
  auto net = small_net(23);
  {
    torch::NoGradGuard ng;  // make the gates depend strongly on the squeeze vectors
    for (auto& tap : net->taps) tap.module->joint->weight.mul_(20.0);
  }
  auto train = probe_batches(3, 500);
  auto eval = probe_batches(4, 600);
  label_half_by_each_head(net, eval);

  const auto before = net->taps[0].module->gate_mean->mean.clone();
  net->eval();
  const auto r = probe_utilization(net, train, eval);
  CHECK_FALSE(net->is_training());  // eval mode restored as eval
  CHECK(torch::equal(before, net->taps[0].module->gate_mean->mean));  // untouched
  CHECK(net->taps[0].module->squeeze_mean->samples.item<double>() == 24.0);

  // The cut network by hand (docs/algorithm.md §7), not through MMTM's cut mode: first the
  // training-set squeeze averages at each tap, from the live network...
  torch::NoGradGuard ng;
  std::vector<at::Tensor> sum_a(2), sum_b(2);
  for (const auto& b : train) {
    at::Tensor h0 = b.x0, h1 = b.x1;
    for (size_t i = 0; i < 2; ++i) {
      h0 = net->branch0->forward_stage(i, h0);
      h1 = net->branch1->forward_stage(i, h1);
      const auto sa = h0.flatten(2).mean(-1).sum(0), sb = h1.flatten(2).mean(-1).sum(0);
      sum_a[i] = sum_a[i].defined() ? sum_a[i] + sa : sa;
      sum_b[i] = sum_b[i].defined() ? sum_b[i] + sb : sb;
      std::tie(h0, h1) = testing::as_pair(net->taps[i].module->forward({h0, h1}));
    }
  }
  // ...then each side's gate from the weights, the other side's squeeze replaced.
  auto cut_tap = [&](size_t i, const at::Tensor& a, const at::Tensor& b) {
    auto& m = *net->taps[i].module;
    const int64_t n = a.size(0);
    const at::Tensor sa = a.flatten(2).mean(-1), sb = b.flatten(2).mean(-1);
    const at::Tensor avg_a = (sum_a[i] / 24.0).expand({n, -1}), avg_b = (sum_b[i] / 24.0).expand({n, -1});
    auto joint = [&](const at::Tensor& l, const at::Tensor& r) {
      return at::relu(at::cat({l, r}, 1).matmul(m.joint->weight.t()) + m.joint->bias);
    };
    const at::Tensor g0 = 2.0 * at::sigmoid(joint(sa, avg_b).matmul(m.excite[0]->weight.t()) + m.excite[0]->bias);
    const at::Tensor g1 = 2.0 * at::sigmoid(joint(avg_a, sb).matmul(m.excite[1]->weight.t()) + m.excite[1]->bias);
    return std::pair{a * g0.view({n, -1, 1, 1}), b * g1.view({n, -1, 1, 1})};
  };
  std::array<int64_t, 5> correct{};
  for (const auto& b : eval) {
    at::Tensor h0 = b.x0, h1 = b.x1, c0 = b.x0, c1 = b.x1;
    for (size_t i = 0; i < 2; ++i) {
      h0 = net->branch0->forward_stage(i, h0);
      h1 = net->branch1->forward_stage(i, h1);
      c0 = net->branch0->forward_stage(i, c0);
      c1 = net->branch1->forward_stage(i, c1);
      std::tie(h0, h1) = testing::as_pair(net->taps[i].module->forward({h0, h1}));
      std::tie(c0, c1) = cut_tap(i, c0, c1);
    }
    auto y0 = net->branch0->head(h0), y1 = net->branch1->head(h1);
    auto y0c = net->branch0->head(c0), y1c = net->branch1->head(c1);
    int k = 0;
    for (const auto& y : {(y0 + y1) / 2, y0, y0c, y1, y1c})
      correct[k++] += y.argmax(1).eq(b.target).sum().item<int64_t>();
  }
  const double n = 32;
  CHECK(r.accuracy == correct[0] / n);
  CHECK(r.accuracy0 == correct[1] / n);
  CHECK(r.accuracy0_cut == correct[2] / n);
  CHECK(r.accuracy1 == correct[3] / n);
  CHECK(r.accuracy1_cut == correct[4] / n);
  CHECK(r.accuracy0 >= 0.5);
  CHECK(r.accuracy1 >= 0.5);
  CHECK(r.u_m1_given_m0 == Approx((r.accuracy0 - r.accuracy0_cut) / r.accuracy0));
  CHECK(r.u_m0_given_m1 == Approx((r.accuracy1 - r.accuracy1_cut) / r.accuracy1));
  CHECK(r.d_util == Approx(r.u_m1_given_m0 - r.u_m0_given_m1));
}

TEST_CASE("Utilization probe rejects empty evaluation data and bad targets",
          "[probe][bad-input]") {
  auto net = small_net(24);
  auto train = probe_batches(1, 1);
  std::vector<MultiModalBatch> empty;
  CHECK_THROWS_WITH(probe_utilization(net, train, empty),
                    Catch::Contains("evaluation data is empty"));
  auto bad = probe_batches(1, 2);
  bad[0].target = bad[0].target.narrow(0, 0, 3);
  CHECK_THROWS_WITH(probe_utilization(net, train, bad), Catch::Contains("batch 8, got [3]"));
  CHECK(net->is_training());
}

TEST_CASE("Utilization probe in two halves: record once, evaluate several sets", "[probe]") {
  auto net = small_net(25);
  auto train = probe_batches(3, 300);
  auto validation = probe_batches(2, 400), test = probe_batches(3, 500);
  label_half_by_each_head(net, validation);
  label_half_by_each_head(net, test);
  const auto whole_validation = probe_utilization(net, train, validation);
  const auto whole_test = probe_utilization(net, train, test);

  auto fresh = small_net(25);
  CHECK_THROWS_WITH(evaluate_utilization(fresh, test),
                    Catch::Contains("no squeeze averages recorded"));
  CHECK(fresh->is_training());
  record_squeeze_averages(fresh, train);
  CHECK(fresh->is_training());
  const std::vector<std::pair<const std::vector<MultiModalBatch>*, UtilizationReport>> sets{
      {&validation, whole_validation}, {&test, whole_test}};
  for (const auto& [data, want] : sets) {
    const auto got = evaluate_utilization(fresh, *data);
    CHECK(got.samples == want.samples);
    CHECK(got.accuracy == want.accuracy);
    CHECK(got.accuracy0_cut == want.accuracy0_cut);
    CHECK(got.accuracy1_cut == want.accuracy1_cut);
    CHECK(got.d_util == Approx(want.d_util));
  }
  CHECK(fresh->is_training());

  // Recording again replaces the averages: on other data the cut heads change.
  record_squeeze_averages(fresh, probe_batches(3, 900));
  const auto t0 = fresh->taps[0].module->squeeze_mean->mean.clone();
  record_squeeze_averages(fresh, train);
  CHECK_FALSE(torch::equal(t0, fresh->taps[0].module->squeeze_mean->mean));
  CHECK(fresh->taps[0].module->squeeze_mean->samples.item<double>() == 24.0);
}

TEST_CASE("A training-set pass with record_squeeze returns forward's outputs and records the "
          "averages", "[probe]") {
  auto net = small_net(26);
  auto train = probe_batches(3, 600);
  record_squeeze_averages(net, train);
  const auto want = net->taps[1].module->squeeze_mean->mean.clone();

  auto other = small_net(26);
  torch::NoGradGuard ng;
  other->eval();
  other->reset_squeeze_averages();
  for (const auto& b : train) {
    const auto recorded = other->record_squeeze({b.x0, b.x1});
    CHECK(torch::equal(recorded.y, other->forward(b.x0, b.x1).y));
  }
  commit_squeeze_averages(other);
  CHECK(torch::allclose(other->taps[1].module->squeeze_mean->mean, want));
}

namespace {

using testing::small_three_way;
using testing::ThreeWay;

// `shift` moves every modality's statistics: the probe's training data gets other
// averages than its evaluation data, so that cutting the other modalities matters.
std::vector<Batch> three_way_batches(int count, std::int64_t n, std::uint64_t seed,
                                         double shift = 0.0) {
  std::vector<Batch> out;
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

TEST_CASE("The probe with two branches reports what the two-branch probe of before reports",
          "[n-way-probe]") {
  namespace ref = testing::reference;
  using Reference = ref::TwoBranchNetImpl<ConvBranch, ConvBranch, ref::TwoBranchMMTM>;
  testing::Net net = testing::small_net(70);
  // Train a little so that the heads and the cut heads disagree on some samples.
  auto opt = torch::optim::SGD(net->parameters(), torch::optim::SGDOptions(0.05));
  VanillaBalancer balancer(net);
  testing::train_steps(net, opt, balancer, 0, 8, 4);
  sharpen_fusion(*net);
  auto pair = std::make_shared<Reference>(
      ConvBranch(testing::branch_options(3, {4, 8}, {1, 2})),
      ConvBranch(testing::branch_options(1, {4, 8}, {1, 2})),
      std::vector<Reference::Tap>{{0, ref::TwoBranchMMTM(4, 4)}, {1, ref::TwoBranchMMTM(8, 8)}});
  testing::copy_values_in_order(*net, *pair);

  std::vector<MultiModalBatch> train, eval;
  std::vector<Batch> n_train, n_eval;
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
  ref::record_two_branch(pair, train);
  const ref::TwoBranchReport p = ref::evaluate_two_branch(pair, eval);
  INFO("u " << p.u_m1_given_m0 << " " << p.u_m0_given_m1 << " acc " << p.accuracy0 << " "
            << p.accuracy0_cut << " " << p.accuracy1 << " " << p.accuracy1_cut);
  REQUIRE(p.u_m1_given_m0 != p.u_m0_given_m1);  // a setup where the sign of d_util shows
  // Batches of either form.
  for (const UtilizationReport& q :
       {probe_utilization(net, train, eval), probe_utilization(net, n_train, n_eval)}) {
    CHECK(q.samples == p.samples);
    CHECK(q.accuracy == p.accuracy);
    CHECK(q.head_accuracy == std::vector<double>{p.accuracy0, p.accuracy1});
    CHECK(q.cut_accuracy == std::vector<double>{p.accuracy0_cut, p.accuracy1_cut});
    REQUIRE(q.utilization.size() == 2);
    CHECK(q.utilization[0] == p.u_m1_given_m0);
    CHECK(q.utilization[1] == p.u_m0_given_m1);
    CHECK(q.accuracy0 == p.accuracy0);
    CHECK(q.accuracy0_cut == p.accuracy0_cut);
    CHECK(q.accuracy1 == p.accuracy1);
    CHECK(q.accuracy1_cut == p.accuracy1_cut);
    CHECK(q.u_m1_given_m0 == p.u_m1_given_m0);
    CHECK(q.u_m0_given_m1 == p.u_m0_given_m1);
    CHECK(q.d_util == p.d_util);  // signed, as the paper's
    CHECK(q.spread == std::abs(p.d_util));
    CHECK(testing::same_values_in_order(*pair, *net));  // the squeeze averages too
  }
}

TEST_CASE("N-branch probe with three branches counts every head and cut head",
          "[n-way-probe]") {
  ThreeWay net = small_three_way(71);
  sharpen_fusion(*net);
  const auto train = three_way_batches(3, 6, 300, 3.0);
  const auto eval = three_way_batches(4, 5, 400);
  const UtilizationReport r = probe_utilization(net, train, eval);
  REQUIRE(r.cut_accuracy != r.head_accuracy);  // cutting changes predictions here
  CHECK(net->is_training());  // restored

  // The same counts by hand: live heads from plain eval-mode passes, cut heads from the
  // probe's pass, correct predictions tallied one sample at a time.
  net->eval();
  std::vector<double> head(3, 0.0), cut(3, 0.0);
  double mean_correct = 0;
  std::int64_t samples = 0;
  for (const auto& b : eval) {
    const NetOutput live = net->forward(b.inputs);
    const ProbeOutput probe = net->forward_probe(b.inputs);
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
  CHECK(r.spread == Approx(*std::max_element(u.begin(), u.end()) -
                           *std::min_element(u.begin(), u.end())));
  CHECK(r.spread >= 0.0);
  // The signed two-branch names are for two branches only.
  CHECK(std::isnan(r.d_util));
  CHECK(std::isnan(r.u_m1_given_m0));
  CHECK(std::isnan(r.accuracy0));
}

TEST_CASE("N-branch probe: averages over ranks, and bad input with the values",
          "[n-way-probe][bad-input]") {
  ThreeWay net = small_three_way(72);
  const auto train = three_way_batches(2, 4, 500);
  const auto eval = three_way_batches(2, 4, 600);
  const UtilizationReport one = probe_utilization(net, train, eval);
  // Two identical "ranks": sums doubled, the same averages and accuracies.
  auto twice = [](at::Tensor& t) { t.mul_(2); };
  const UtilizationReport two = probe_utilization(net, train, eval, twice);
  CHECK(two.samples == 2 * one.samples);
  CHECK(two.head_accuracy == one.head_accuracy);
  CHECK(two.cut_accuracy == one.cut_accuracy);

  CHECK_THROWS_WITH(evaluate_utilization(net, std::vector<Batch>{}),
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
  const UtilizationReport empty_rank =
      evaluate_utilization(net, std::vector<Batch>{}, [&](at::Tensor& t) { t.add_(other); });
  CHECK(empty_rank.samples == one.samples);
  CHECK(empty_rank.head_accuracy == one.head_accuracy);
  CHECK(empty_rank.cut_accuracy == one.cut_accuracy);
  std::vector<Batch> wrong_target = eval;
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
