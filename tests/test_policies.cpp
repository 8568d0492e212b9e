#include <catch2/catch.hpp>

#include <array>
#include <cmath>

#include "support.h"

using namespace mmbalance;
using mmbalance::testing::for_branches;

namespace {

// Two-branch speeds whose d_speed is exactly `d` (s_0 = d, s_1 = 0).
SpeedSummary with_d_speed(double d) { return SpeedSummary::from_speeds({d, 0.0}); }

}  // namespace

TEST_CASE("Vanilla takes regular steps only", "[policy]") {
  VanillaPolicy p;
  for (int i = 0; i < 10; ++i) CHECK(p.next_plan() == StepKind::regular);
}

TEST_CASE("Joint training trains CE(y) of the fused output alone, and refuses a loss it did not "
          "form", "[policy]") {
  using mmbalance::testing::Net;
  Net net = mmbalance::testing::small_late_net(5), twin = mmbalance::testing::small_late_net(9);
  mmbalance::testing::copy_state(net, twin);
  const auto b = mmbalance::testing::small_batch(8, 3);
  Balancer<JointTrainingPolicy> balancer(net, JointTrainingPolicy(), BalancerOptions().warmup_epochs(1));
  balancer.next_plan();
  const ModelOutput out = net->forward(b.x0, b.x1);
  const at::Tensor loss = balancer.loss(out, b.target);
  // −log softmax((y0 + y1) / 2)[t], averaged, written out.
  double by_hand = 0;
  for (std::int64_t i = 0; i < 8; ++i) {
    std::array<double, 3> y{};
    double z = 0;
    for (std::int64_t c = 0; c < 3; ++c) {
      y[static_cast<std::size_t>(c)] = (out.y0[i][c].item<double>() + out.y1[i][c].item<double>()) / 2;
      z += std::exp(y[static_cast<std::size_t>(c)]);
    }
    by_hand += std::log(z) - y[static_cast<std::size_t>(b.target[i].item<std::int64_t>())];
  }
  CHECK(loss.item<double>() == Approx(by_hand / 8).epsilon(1e-5));
  loss.backward();
  balancer.observe(loss);
  // The gradients of the fused output's CE, taken on a twin.
  at::cross_entropy_loss(twin->forward(b.x0, b.x1).y, b.target).backward();
  const auto p = net->parameters(), q = twin->parameters();
  for (std::size_t j = 0; j < p.size(); ++j) CHECK(at::equal(p[j].grad(), q[j].grad()));
  // A loop that forms the sum of the heads' losses itself would train something else.
  balancer.next_plan();
  const at::Tensor summed = modality_specific_loss(net->forward(b.x0, b.x1), b.target);
  net->zero_grad();
  summed.backward();
  CHECK_THROWS_WITH(balancer.observe(summed),
                    Catch::Contains("trains the objective fused, not the sum of the heads' losses") &&
                        Catch::Contains("form the loss with balancer.loss(out, target)"));
}

TEST_CASE("Guided policy: threshold, Q-step window and direction by sign", "[policy]") {
  auto p = for_branches(GuidedPolicy(GuidedOptions().alpha(0.1).Q(3)), 2);
  CHECK(p.next_plan() == StepKind::regular);
  p.observe_speeds(with_d_speed(0.05));  // within tolerance
  CHECK(p.next_plan() == StepKind::regular);
  p.observe_speeds(with_d_speed(-0.1));  // |d| == alpha: not above it
  CHECK(p.next_plan() == StepKind::regular);

  p.observe_speeds(with_d_speed(0.3));  // m1 helps branch 0 more: accelerate m0
  CHECK(p.window_open());
  CHECK(p.next_plan() == StepKind::rebalance_m0);
  CHECK(p.next_plan() == StepKind::rebalance_m0);
  CHECK(p.next_plan() == StepKind::rebalance_m0);
  CHECK_FALSE(p.window_open());
  CHECK(p.next_plan() == StepKind::regular);

  p.observe_speeds(with_d_speed(-0.2));  // accelerate m1
  for (int i = 0; i < 3; ++i) CHECK(p.next_plan() == StepKind::rebalance_m1);
  CHECK(p.next_plan() == StepKind::regular);
  p.observe_speeds(with_d_speed(0.0));
  CHECK(p.next_plan() == StepKind::regular);
}

TEST_CASE("Guided policy with Q = 1 and alpha = 0", "[policy]") {
  auto p = for_branches(GuidedPolicy(GuidedOptions().alpha(0.0).Q(1)), 2);
  p.observe_speeds(with_d_speed(1e-9));
  CHECK(p.next_plan() == StepKind::rebalance_m0);
  CHECK(p.next_plan() == StepKind::regular);
}

TEST_CASE("Guided policy rejects alpha < 0 and Q < 1", "[policy][bad-input]") {
  CHECK_THROWS_WITH(GuidedPolicy(GuidedOptions().alpha(-0.5)),
                    Catch::Contains("alpha must be >= 0, got -0.5"));
  CHECK_THROWS_WITH(GuidedPolicy(GuidedOptions().Q(0)), Catch::Contains("Q must be >= 1, got 0"));
  CHECK_THROWS_WITH(GuidedPolicy(GuidedOptions().alpha(NAN)), Catch::Contains("got nan"));
  auto never = for_branches(GuidedPolicy(GuidedOptions().alpha(INFINITY)), 2);
  never.observe_speeds(with_d_speed(1e300));
  CHECK(never.next_plan() == StepKind::regular);
}

TEST_CASE("Random policy draws are uniform (chi-square) and reproducible by seed", "[policy]") {
  auto p = for_branches(RandomPolicy(RandomOptions().seed(42)), 2);
  std::array<int, 3> counts{};
  std::vector<StepKind> first;
  const int n = 30000;
  for (int i = 0; i < n; ++i) {
    const StepKind k = to_step_kind(p.next_plan());
    ++counts[static_cast<int>(k)];
    if (i < 100) first.push_back(k);
  }
  double chi2 = 0;
  for (int c : counts) chi2 += (c - n / 3.0) * (c - n / 3.0) / (n / 3.0);
  CHECK(chi2 < 13.82);  // chi-square, 2 degrees of freedom, p = 0.001

  auto again = for_branches(RandomPolicy(RandomOptions().seed(42)), 2);
  for (auto k : first) CHECK(again.next_plan() == k);

  auto other = for_branches(RandomPolicy(RandomOptions().seed(43)), 2);
  int same = 0;
  for (auto k : first) same += other.next_plan() == k;
  CHECK(same < 60);
}

TEST_CASE("Policies' state round-trips through an archive", "[policy]") {
  auto p = for_branches(RandomPolicy(RandomOptions().seed(9)), 2);
  for (int i = 0; i < 17; ++i) p.next_plan();
  torch::serialize::OutputArchive out;
  p.save(out);
  std::stringstream buffer;
  out.save_to(buffer);
  torch::serialize::InputArchive in;
  in.load_from(buffer);
  // Another seed is refused, naming both, and changes nothing.
  auto other = for_branches(RandomPolicy(RandomOptions().seed(1)), 2);
  const RandomPolicy other_before = other;
  CHECK_THROWS_WITH(other.load(in), Catch::Contains("made with seed 9") &&
                                        Catch::Contains("this policy has seed 1"));
  RandomPolicy untouched = other_before;
  for (int i = 0; i < 20; ++i) CHECK(other.next_plan() == untouched.next_plan());
  // The same seed resumes the sequence where it was saved.
  buffer.seekg(0);
  torch::serialize::InputArchive again;
  again.load_from(buffer);
  auto q = for_branches(RandomPolicy(RandomOptions().seed(9)), 2);
  q.load(again);
  for (int i = 0; i < 50; ++i) CHECK(q.next_plan() == p.next_plan());
}

TEST_CASE("RandomPolicy refuses a generator record that is not one, and changes nothing",
          "[policy][bad-input][checkpoint]") {
  const auto record = [](const c10::IValue& engine) {
    torch::serialize::OutputArchive out;
    out.write("engine", engine);
    out.write("seed", std::int64_t{9});
    out.write("branches", std::int64_t{2});
    std::stringstream bytes;
    out.save_to(bytes);
    return bytes.str();
  };
  auto p = for_branches(RandomPolicy(RandomOptions().seed(9)), 2);
  p.next_plan();
  const RandomPolicy before = p;
  CHECK_THROWS_WITH(mmbalance::testing::load_saved(p, record(c10::IValue(std::int64_t{5}))),
                    Catch::Contains("RandomPolicy: damaged state in checkpoint"));
  CHECK_THROWS_WITH(mmbalance::testing::load_saved(p, record(c10::IValue(std::string("12 x 7")))),
                    Catch::Contains("RandomPolicy: corrupt generator state in checkpoint"));
  RandomPolicy untouched = before;
  for (int i = 0; i < 20; ++i) CHECK(p.next_plan() == untouched.next_plan());
}
