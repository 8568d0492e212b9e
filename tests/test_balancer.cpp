#include <catch2/catch.hpp>

#include <sstream>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// The balancer's whole state as bytes, to check that a rejected step changed nothing.
template <class B>
std::string state_bytes(const B& balancer) {
  torch::serialize::OutputArchive out;
  balancer.save(out);
  std::stringstream s;
  out.save_to(s);
  return s.str();
}

std::vector<at::Tensor> gate_averages(Net& net) {
  std::vector<at::Tensor> out;
  for (auto& tap : net->taps) {
    out.push_back(tap.module->gate_average0.clone());
    out.push_back(tap.module->gate_average1.clone());
    out.push_back(tap.module->gate_samples.clone());
  }
  return out;
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return a.size() == b.size();
}

}  // namespace

TEST_CASE("Vanilla training through the Balancer equals plain training bit for bit",
          "[balancer]") {
  auto plain = small_net(11);
  auto balanced = small_net(11);
  REQUIRE(same_state(*plain, *balanced));
  auto opt_plain = make_sgd(plain);
  auto opt_balanced = make_sgd(balanced);
  VanillaBalancer balancer(balanced);
  for (int i = 0; i < 6; ++i) {
    auto b = small_batch(8, static_cast<std::uint64_t>(i));
    auto loss = modality_specific_loss(plain->forward(b.x0, b.x1), b.target);
    opt_plain.zero_grad();
    loss.backward();
    opt_plain.step();
  }
  train_steps(balanced, opt_balanced, balancer, 0, 6, 3);
  CHECK(same_state(*plain, *balanced));
  CHECK(balancer.total_step_counts()[0] == 6);
  CHECK(balancer.meter().steps() == 6);
  CHECK(std::isfinite(balancer.last_d_speed()));
}

TEST_CASE("Guided balancing: warm-up epoch, then the policy driven by measured d_speed",
          "[balancer]") {
  auto net = small_net(12);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
  std::vector<double> speeds;
  std::vector<StepKind> kinds;
  for (int i = 0; i < 16; ++i) {
    auto k = train_steps(net, opt, balancer, i, i + 1, 4);
    kinds.push_back(k[0]);
    speeds.push_back(balancer.last_d_speed());
    if (i < 4) CHECK(k[0] == StepKind::regular);  // warm-up epoch
  }
  CHECK(balancer.epoch() == 4);
  // Replay the policy by hand on the d_speed values after each post-warm-up regular step.
  GuidedPolicy replay(GuidedOptions().alpha(0.0).Q(2));
  int rebalancing = 0;
  for (int i = 4; i < 16; ++i) {
    CHECK(replay.next_step() == kinds[i]);
    if (kinds[i] == StepKind::regular) {
      replay.observe_d_speed(speeds[i]);
    } else {
      ++rebalancing;
      CHECK(speeds[i] == speeds[i - 1]);  // no measurement in a re-balancing step
    }
  }
  CHECK(rebalancing == 8);  // alpha = 0: every regular step opens a 2-step window
  CHECK(balancer.meter().steps() == 8);
  CHECK(balancer.total_step_counts()[0] == 8);
}

TEST_CASE("Random balancing through the Balancer is regular in warm-up, then mixed",
          "[balancer]") {
  auto net = small_net(13);
  auto opt = make_sgd(net);
  RandomBalancer balancer(net, RandomPolicy(RandomOptions().seed(5)),
                          BalancerOptions().warmup_epochs(2));
  auto kinds = train_steps(net, opt, balancer, 0, 20, 4);
  for (int i = 0; i < 8; ++i) CHECK(kinds[i] == StepKind::regular);
  RandomPolicy replay(RandomOptions().seed(5));
  for (int i = 8; i < 20; ++i) CHECK(kinds[i] == replay.next_step());
  const auto& counts = balancer.total_step_counts();
  CHECK(counts[0] + counts[1] + counts[2] == 20);
  CHECK(counts[1] + counts[2] > 0);
}

TEST_CASE("A rejected step leaves the balancer and the gate averages unchanged",
          "[balancer][bad-input]") {
  auto net = small_net(14);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 2, 100);  // regular, then re-balancing
  // Reach a regular step inside the guided cycle.
  while (balancer.policy().mode() != GuidedPolicy::Mode::regular)
    train_steps(net, opt, balancer, 2, 3, 100);
  auto b = small_batch(8, 99);

  SECTION("non-finite loss") {
    const auto before = state_bytes(balancer);
    const auto gates = gate_averages(net);
    const StepKind kind = balancer.next_step();
    REQUIRE(kind == StepKind::regular);
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target) * INFINITY;
    opt.zero_grad();
    loss.backward();
    CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite loss inf"));
    CHECK(state_bytes(balancer) == before);
    CHECK(all_equal(gates, gate_averages(net)));
    // The loop can go on.
    train_steps(net, opt, balancer, 3, 4, 100);
  }
  SECTION("non-finite gradient") {
    const auto before = state_bytes(balancer);
    const auto gates = gate_averages(net);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    net->taps[1].module->excite1->weight.grad()[0][0] = NAN;
    CHECK_THROWS_WITH(balancer.observe(loss),
                      Catch::Contains("non-finite gradient in group theta1'"));
    CHECK(state_bytes(balancer) == before);
    CHECK(all_equal(gates, gate_averages(net)));
  }
  SECTION("parameter group of norm zero") {
    {
      torch::NoGradGuard ng;
      for (auto& p : net->branch1->parameters()) p.zero_();
    }
    const auto before = state_bytes(balancer);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    CHECK_THROWS_WITH(balancer.observe(loss),
                      Catch::Contains("group theta1 (branch 1) has squared norm 0"));
    CHECK(state_bytes(balancer) == before);
  }
}

TEST_CASE("A rejected re-balancing step restores the policy's window", "[balancer][bad-input]") {
  auto net = small_net(15);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 1, 100);
  REQUIRE(balancer.policy().mode() == GuidedPolicy::Mode::rebalance);
  const auto before = state_bytes(balancer);
  const StepKind kind = balancer.next_step();
  REQUIRE(kind != StepKind::regular);
  auto b = small_batch(8, 1);
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target) * NAN;
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite loss"));
  CHECK(state_bytes(balancer) == before);
  CHECK(balancer.policy().window_step() == 0);
}

TEST_CASE("Balancer enforces the call order", "[balancer][bad-input]") {
  auto net = small_net(16);
  VanillaBalancer balancer(net);
  CHECK_THROWS_WITH(balancer.observe(at::zeros({})), Catch::Contains("call next_step()"));
  balancer.next_step();
  CHECK_THROWS_WITH(balancer.next_step(), Catch::Contains("was not observed"));
  CHECK_THROWS_WITH(balancer.end_epoch(), Catch::Contains("was not observed"));
  CHECK_THROWS_WITH(balancer.observe(at::zeros({2})), Catch::Contains("loss must be a scalar"));
  CHECK_THROWS_WITH(VanillaBalancer(net, VanillaPolicy(), BalancerOptions().warmup_epochs(-1)),
                    Catch::Contains("warmup_epochs must be >= 0"));
}

TEST_CASE("Without per-step checks a non-finite step is skipped on the device", "[balancer]") {
  auto net = small_net(17);
  auto opt = make_sgd(net);
  VanillaBalancer balancer(net, VanillaPolicy(), BalancerOptions().check_every_step(false));
  train_steps(net, opt, balancer, 0, 2, 100);
  const at::Tensor before = balancer.meter().accumulated().clone();
  const StepKind kind = balancer.next_step();
  auto b = small_batch(8, 3);
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
  opt.zero_grad();
  loss.backward();
  net->branch0->classifier->bias.grad()[0] = INFINITY;
  CHECK_NOTHROW(balancer.observe(loss));
  CHECK(balancer.skipped_steps() == 1);
  CHECK(torch::equal(before, balancer.meter().accumulated()));
  CHECK(std::isnan(balancer.last_d_speed()));  // vanilla needs no read: nothing was read
  CHECK(std::isfinite(balancer.speed().d_speed));
}

TEST_CASE("SpeedRead::previous_step hands the policy each d_speed one step later",
          "[balancer]") {
  auto net = small_net(18);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                          BalancerOptions().warmup_epochs(1).check_every_step(false).speed_read(
                              SpeedRead::previous_step));
  std::vector<StepKind> kinds;
  std::vector<double> speeds;  // d_speed after each step, read here for the replay
  for (int i = 0; i < 24; ++i) {
    kinds.push_back(train_steps(net, opt, balancer, i, i + 1, 4)[0]);
    speeds.push_back(balancer.speed().d_speed);
  }
  GuidedPolicy replay(GuidedOptions().alpha(0.0).Q(2));
  std::optional<double> pending;
  int rebalancing = 0;
  for (int i = 4; i < 24; ++i) {
    CHECK(replay.next_step() == kinds[i]);
    if (pending) replay.observe_d_speed(*pending);  // delivered when step i is observed
    pending.reset();
    if (kinds[i] == StepKind::regular) pending = speeds[i];
    rebalancing += kinds[i] != StepKind::regular;
  }
  CHECK(rebalancing > 0);
  CHECK(rebalancing < 20);
}

TEST_CASE("SpeedRead::previous_step needs per-step checks off", "[balancer][bad-input]") {
  auto net = small_net(19);
  CHECK_THROWS_WITH(GuidedBalancer(net, GuidedPolicy(),
                                   BalancerOptions().speed_read(SpeedRead::previous_step)),
                    Catch::Contains("set check_every_step(false) too"));
}
