#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

std::vector<at::Tensor> gate_averages(Net& net) {
  std::vector<at::Tensor> out;
  for (auto& tap : net->taps) {
    out.push_back(tap.module->gate_mean->mean.clone());
    out.push_back(tap.module->gate_mean->samples.clone());
  }
  return out;
}

// Parameters equal bit for bit (buffers apart: BatchNorm statistics, gate means).
bool same_parameters(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto pa = a.parameters(), pb = b.parameters();
  if (pa.size() != pb.size()) return false;
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (!torch::equal(pa[i], pb[i])) return false;
  }
  return true;
}

// Every buffer but the fusion modules' gate means equal bit for bit.
bool same_buffers_but_gate_means(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto ba = a.named_buffers(), bb = b.named_buffers();
  if (ba.size() != bb.size()) return false;
  for (const auto& x : ba) {
    if (x.key().find("gate_mean") != std::string::npos) continue;
    if (!torch::equal(x.value(), bb[x.key()])) return false;
  }
  return true;
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
  CHECK(same_parameters(*plain, *balanced));
  CHECK(same_buffers_but_gate_means(*plain, *balanced));  // BatchNorm statistics included
  // The gate means: committed by the balancer step by step; a loop without one only
  // stages them (nothing uses them there).
  for (auto& mean : balanced->gate_means()) CHECK(mean->samples.item<double>() == 48.0);
  for (auto& mean : plain->gate_means()) CHECK(mean->samples.item<double>() == 0.0);
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
  // alpha 0: every regular step opens a 2-step window in the direction of its d_speed,
  // so after the 4 warm-up steps the kinds follow a fixed table: R x x, repeated.
  for (int i = 4; i < 16; i += 3) {
    INFO("steps " << i << ".." << i + 2);
    CHECK(kinds[i] == StepKind::regular);
    const StepKind expected = speeds[i] > 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1;
    CHECK(kinds[i + 1] == expected);
    CHECK(kinds[i + 2] == expected);
    CHECK(speeds[i + 1] == speeds[i]);  // no measurement in a re-balancing step
  }
  CHECK(balancer.meter().steps() == 8);  // 4 warm-up + 4 regular
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
  auto replay = for_branches(RandomPolicy(RandomOptions().seed(5)), 2);
  for (int i = 8; i < 20; ++i) CHECK(kinds[i] == replay.next_plan());
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
  while (balancer.policy().window_open())
    train_steps(net, opt, balancer, 2, 3, 100);
  auto b = small_batch(8, 99);

  SECTION("non-finite loss") {
    const auto before = saved_bytes(balancer);
    const auto gates = gate_averages(net);
    const StepKind kind = balancer.next_step();
    REQUIRE(kind == StepKind::regular);
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target) * INFINITY;
    opt.zero_grad();
    loss.backward();
    CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite loss inf"));
    CHECK(saved_bytes(balancer) == before);
    CHECK(all_equal(gates, gate_averages(net)));
    // The loop can go on.
    train_steps(net, opt, balancer, 3, 4, 100);
  }
  SECTION("non-finite gradient") {
    const auto before = saved_bytes(balancer);
    const auto gates = gate_averages(net);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    net->taps[1].module->excite[1]->weight.grad()[0][0] = NAN;
    CHECK_THROWS_WITH(balancer.observe(loss),
                      Catch::Contains("non-finite gradient in group theta1'"));
    CHECK(saved_bytes(balancer) == before);
    CHECK(all_equal(gates, gate_averages(net)));
  }
  SECTION("parameter group of norm zero") {
    {
      torch::NoGradGuard ng;
      for (auto& p : net->branch1->parameters()) p.zero_();
    }
    const auto before = saved_bytes(balancer);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    CHECK_THROWS_WITH(balancer.observe(loss),
                      Catch::Contains("group theta1 (branch 1) has squared norm 0"));
    CHECK(saved_bytes(balancer) == before);
  }
}

TEST_CASE("A rejected re-balancing step restores the policy's window", "[balancer][bad-input]") {
  auto net = small_net(15);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 1, 100);
  REQUIRE(balancer.policy().window_open());
  const auto before = saved_bytes(balancer);
  const StepKind kind = balancer.next_step();
  REQUIRE(kind != StepKind::regular);
  auto b = small_batch(8, 1);
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target) * NAN;
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite loss"));
  CHECK(saved_bytes(balancer) == before);
  CHECK(balancer.policy().window_step() == 0);
}

namespace {

// A user's policy with the epoch hook: it records the epochs it was told of and throws
// while `fail` is set (shared by its copies, so the test can set it from outside).
struct EpochRecorder {
  std::vector<std::int64_t> started;
  std::shared_ptr<bool> fail = std::make_shared<bool>(false);
  StepPlan next_plan() { return StepKind::regular; }
  void start_epoch(std::int64_t e) {
    TORCH_CHECK(!*fail, "simulated: start_epoch failed");
    started.push_back(e);
  }
};

// The same with epoch losses it wants at every boundary (epochs after warm-up recorded).
struct MeasuringEpochRecorder : EpochRecorder {
  std::vector<std::int64_t> measured;
  bool wants_epoch_losses(std::int64_t) const { return true; }
  void observe_epoch_losses(const EpochLosses& losses) { measured.push_back(losses.epochs); }
};

}  // namespace

TEST_CASE("A policy's start_epoch hook is told each epoch after warm-up, and one that throws "
          "leaves the epoch and the policy as they were", "[balancer][bad-input]") {
  Net net = small_net(19);
  auto opt = make_sgd(net);
  Balancer<EpochRecorder> balancer(net, EpochRecorder(), BalancerOptions().warmup_epochs(2));
  train_steps(net, opt, balancer, 0, 12, 4);  // three epochs ended: epochs 1 and 2 of warm-up, then 0
  // Epoch 2 (the first after warm-up) and epoch 3: the hook's 0 and 1; none in warm-up.
  CHECK(balancer.policy().started == std::vector<std::int64_t>{0, 1});
  CHECK(balancer.epoch() == 3);
  train_steps(net, opt, balancer, 12, 14, 100);  // two steps into epoch 3
  *balancer.policy().fail = true;
  CHECK_THROWS_WITH(balancer.end_epoch(), Catch::Contains("simulated: start_epoch failed"));
  CHECK(balancer.epoch() == 3);
  CHECK(balancer.epoch_step_counts() == StepCounts{2, 0, 0});
  *balancer.policy().fail = false;
  balancer.end_epoch();
  CHECK(balancer.epoch() == 4);
  CHECK(balancer.policy().started == std::vector<std::int64_t>{0, 1, 2});
  CHECK(balancer.epoch_step_counts() == StepCounts{0, 0, 0});
}

TEST_CASE("A start_epoch hook that throws after the policy took the epoch's losses undoes "
          "both", "[balancer][bad-input]") {
  Net net = small_net(20);
  auto opt = make_sgd(net);
  Balancer<MeasuringEpochRecorder> balancer(net, MeasuringEpochRecorder(), BalancerOptions().warmup_epochs(1));
  const std::vector<MultiModalBatch> sample{small_batch(4, 301)}, held_out{small_batch(4, 302)};
  train_steps(net, opt, balancer, 0, 1, 100);
  balancer.end_epoch(net, sample, held_out);  // the end of warm-up: measured (0), epoch 0 starts
  CHECK(balancer.policy().measured == std::vector<std::int64_t>{0});
  CHECK(balancer.policy().started == std::vector<std::int64_t>{0});
  train_steps(net, opt, balancer, 1, 2, 100);
  *balancer.policy().fail = true;
  CHECK_THROWS_WITH(balancer.end_epoch(net, sample, held_out), Catch::Contains("simulated: start_epoch failed"));
  CHECK(balancer.policy().measured == std::vector<std::int64_t>{0});
  CHECK(balancer.epoch() == 1);
  *balancer.policy().fail = false;
  balancer.end_epoch(net, sample, held_out);
  CHECK(balancer.policy().measured == std::vector<std::int64_t>{0, 1});
  CHECK(balancer.policy().started == std::vector<std::int64_t>{0, 1});
  CHECK(balancer.epoch() == 2);
}

TEST_CASE("Balancer enforces the call order", "[balancer][bad-input]") {
  auto net = small_net(16);
  VanillaBalancer balancer(net);
  CHECK_THROWS_WITH(balancer.observe(at::zeros({})), Catch::Contains("call next_step()"));
  balancer.next_step();
  CHECK_THROWS_WITH(balancer.next_step(), Catch::Contains("was not observed"));
  CHECK_THROWS_WITH(balancer.end_epoch(), Catch::Contains("was not observed"));
  CHECK_THROWS_WITH(balancer.observe(at::zeros({2})), Catch::Contains("loss must be a scalar"));
  CHECK_NOTHROW(balancer.next_step());  // the rejected step was abandoned
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

TEST_CASE("SpeedRead::previous_step: every window is exactly Q steps, in the direction of the "
          "speed that opened it", "[balancer]") {
  // The documented lagged rule: a regular step's d_speed reaches the policy when the next
  // step is observed, and is dropped if that step is already re-balancing. With alpha 0
  // every delivered speed opens a window, so after the 4 warm-up steps the kinds follow a
  // fixed table: R R x x, repeated, where step 4k+2's window was opened by step 4k's speed.
  auto net = small_net(18);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                          BalancerOptions().warmup_epochs(1).check_every_step(false).speed_read(
                              SpeedRead::previous_step));
  std::vector<StepKind> kinds;
  std::vector<double> speeds;  // d_speed right after each step, read here
  for (int i = 0; i < 24; ++i) {
    kinds.push_back(train_steps(net, opt, balancer, i, i + 1, 4)[0]);
    speeds.push_back(balancer.speed().d_speed);
  }
  for (int i = 0; i < 4; ++i) CHECK(kinds[i] == StepKind::regular);
  for (int i = 4; i < 24; i += 4) {
    INFO("steps " << i << ".." << i + 3);
    CHECK(kinds[i] == StepKind::regular);
    CHECK(kinds[i + 1] == StepKind::regular);
    const StepKind expected = speeds[i] > 0 ? StepKind::rebalance_m0 : StepKind::rebalance_m1;
    CHECK(kinds[i + 2] == expected);
    CHECK(kinds[i + 3] == expected);
  }
}

TEST_CASE("SpeedRead::previous_step with Q 3: no window is restarted or mixed", "[balancer]") {
  auto net = small_net(28);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0).check_every_step(false).speed_read(
                              SpeedRead::previous_step));
  const auto kinds = train_steps(net, opt, balancer, 0, 25, 100);
  // R R x x x, five times.
  for (int i = 0; i < 25; ++i) {
    INFO("step " << i);
    if (i % 5 < 2) {
      CHECK(kinds[i] == StepKind::regular);
    } else {
      CHECK(kinds[i] != StepKind::regular);
      if (i % 5 > 2) CHECK(kinds[i] == kinds[i - 1]);
    }
  }
}

TEST_CASE("SpeedRead::previous_step needs per-step checks off", "[balancer][bad-input]") {
  auto net = small_net(19);
  CHECK_THROWS_WITH(GuidedBalancer(net, GuidedPolicy(),
                                   BalancerOptions().speed_read(SpeedRead::previous_step)),
                    Catch::Contains("set check_every_step(false) too"));
}

TEST_CASE("A re-balancing step with a NaN gradient is rejected too, before the optimizer "
          "writes it into the parameters", "[balancer][bad-input]") {
  auto net = small_net(30);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 1, 100);  // regular; alpha 0 opens a window
  REQUIRE(balancer.policy().window_open());
  const auto before = saved_bytes(balancer);
  const StepKind kind = balancer.next_step();
  REQUIRE(kind != StepKind::regular);
  auto b = small_batch(8, 1);
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
  opt.zero_grad();
  loss.backward();
  net->branch0->classifier->bias.grad()[0] = NAN;  // the loss stays finite
  CHECK(std::isfinite(loss.item<double>()));
  CHECK_THROWS_WITH(balancer.observe(loss),
                    Catch::Contains("non-finite gradient in group theta0 (branch 0)") &&
                        Catch::Contains(std::string(to_string(kind))));
  CHECK(saved_bytes(balancer) == before);
  // Without the check the NaN would reach the parameters; with it the loop goes on.
  opt.zero_grad();
  train_steps(net, opt, balancer, 2, 6, 100);
  for (const auto& p : net->parameters()) CHECK(torch::isfinite(p).all().item<bool>());
}

TEST_CASE("A frozen branch (no gradient): a named error with checks, no re-balancing without",
          "[balancer][bad-input]") {
  auto frozen_net = [] {
    auto net = small_net(31);
    for (auto& p : net->branch1->parameters()) p.set_requires_grad(false);
    return net;
  };
  SECTION("checks on") {
    auto net = frozen_net();
    auto opt = make_sgd(net);
    GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.1).Q(2)));
    CHECK_THROWS_WITH(train_steps(net, opt, balancer, 0, 1),
                      Catch::Contains("group theta1 (branch 1) has had a zero gradient") &&
                          Catch::Contains("frozen"));
  }
  SECTION("checks off: d_speed is undefined (NaN), never infinite, and guided stays regular") {
    auto net = frozen_net();
    auto opt = make_sgd(net);
    GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.1).Q(2)),
                            BalancerOptions().warmup_epochs(1).check_every_step(false));
    const auto kinds = train_steps(net, opt, balancer, 0, 16, 4);
    for (const auto k : kinds) CHECK(k == StepKind::regular);
    CHECK(std::isnan(balancer.last_d_speed()));
    CHECK(std::isnan(balancer.speed().s_m0_given_m1));
    CHECK(std::isfinite(balancer.speed().s_m1_given_m0));
  }
}

TEST_CASE("A rejected regular step in eval mode does not roll back the step before it",
          "[balancer][bad-input]") {
  auto net = small_net(32);
  auto opt = make_sgd(net);
  VanillaBalancer balancer(net);
  train_steps(net, opt, balancer, 0, 3, 100);  // accepted: the gate means moved
  const auto after_accepted = gate_averages(net);
  net->eval();  // a regular step in eval mode stages no gates
  auto b = small_batch(8, 9);
  const StepKind kind = balancer.next_step();
  auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target) * NAN;
  opt.zero_grad();
  loss.backward();
  CHECK_THROWS_WITH(balancer.observe(loss), Catch::Contains("non-finite loss"));
  CHECK(all_equal(after_accepted, gate_averages(net)));
}

TEST_CASE("abandon_step: a step whose forward or backward threw leaves no trace",
          "[balancer]") {
  auto net = small_net(33);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                          BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, balancer, 0, 1, 100);
  const auto before = saved_bytes(balancer);
  const auto gates = gate_averages(net);
  balancer.abandon_step();  // nothing pending: no effect
  CHECK(saved_bytes(balancer) == before);
  // A re-balancing step given up after its forward pass, twice: abandon_step restores the
  // policy, so the second next_step() asks for the same step again.
  for (int i = 0; i < 2; ++i) {
    const StepKind kind = balancer.next_step();
    CHECK(kind != StepKind::regular);
    auto b = small_batch(8, 40);
    net->forward(b.x0, b.x1, kind);
    balancer.abandon_step();
    CHECK(saved_bytes(balancer) == before);
    CHECK(all_equal(gates, gate_averages(net)));
  }
  // The loop goes on as if they had never been asked for.
  auto twin = small_net(33);
  auto twin_opt = make_sgd(twin);
  GuidedBalancer twin_balancer(twin, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)),
                               BalancerOptions().warmup_epochs(0));
  train_steps(twin, twin_opt, twin_balancer, 0, 1, 100);
  CHECK(train_steps(net, opt, balancer, 1, 6, 100) ==
        train_steps(twin, twin_opt, twin_balancer, 1, 6, 100));
  // Parameters and gate means; BatchNorm's running statistics did see the abandoned
  // forward passes (LibTorch's own, in any training loop).
  CHECK(same_parameters(*net, *twin));
  CHECK(all_equal(gate_averages(net), gate_averages(twin)));
}

TEST_CASE("abandon_step drops the gates a regular step's forward pass staged", "[balancer]") {
  auto net = small_net(35);
  VanillaBalancer balancer(net);
  REQUIRE(balancer.next_step() == StepKind::regular);
  auto b = small_batch(8, 41);
  net->forward(b.x0, b.x1, StepKind::regular);
  for (auto& m : net->gate_means()) CHECK(m->staged()[-1].item<double>() == 8.0);
  balancer.abandon_step();
  for (auto& m : net->gate_means()) {
    CHECK(m->staged()[-1].item<double>() == 0.0);
    CHECK(m->samples.item<double>() == 0.0);
  }
}

TEST_CASE("meter().steps() counts accumulated steps, not skipped ones", "[balancer]") {
  auto net = small_net(34);
  auto opt = make_sgd(net);
  VanillaBalancer balancer(net, VanillaPolicy(), BalancerOptions().check_every_step(false));
  train_steps(net, opt, balancer, 0, 3, 100);
  {  // a step with a NaN gradient, left out; the optimizer does not take it
    auto b = small_batch(8, 3);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    opt.zero_grad();
    loss.backward();
    net->branch0->classifier->bias.grad()[0] = NAN;
    balancer.observe(loss);
    opt.zero_grad();
  }
  train_steps(net, opt, balancer, 4, 6, 100);
  CHECK(balancer.skipped_steps() == 1);
  CHECK(balancer.meter().steps() == 5);
  CHECK(balancer.total_step_counts()[0] == 6);
  // The skipped step's gates were not committed either: 5 steps of 8 rows.
  for (auto& mean : net->gate_means()) CHECK(mean->samples.item<double>() == 40.0);
}

TEST_CASE("Resuming with other options is refused, naming the option and both values",
          "[balancer][bad-input]") {
  auto net = small_net(35);
  auto opt = make_sgd(net);
  GuidedBalancer saved(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(5)),
                       BalancerOptions().warmup_epochs(0));
  train_steps(net, opt, saved, 0, 3, 100);  // mid-window: regular, then 2 of 5
  REQUIRE(saved.policy().window_open());
  torch::serialize::OutputArchive out;
  saved.save(out);
  std::stringstream bytes;
  out.save_to(bytes);
  auto load_into = [&](auto& balancer) {
    std::stringstream copy(bytes.str());
    torch::serialize::InputArchive in;
    in.load_from(copy);
    balancer.load(in);
  };
  GuidedBalancer other_q(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                         BalancerOptions().warmup_epochs(0));
  const auto untouched = saved_bytes(other_q);
  CHECK_THROWS_WITH(load_into(other_q), Catch::Contains("made with Q 5, this policy has Q 2"));
  CHECK(saved_bytes(other_q) == untouched);
  GuidedBalancer other_alpha(net, GuidedPolicy(GuidedOptions().alpha(0.5).Q(5)),
                             BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(load_into(other_alpha), Catch::Contains("alpha 0") && Catch::Contains("alpha 0.5"));
  GuidedBalancer other_warmup(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(5)),
                              BalancerOptions().warmup_epochs(1));
  CHECK_THROWS_WITH(load_into(other_warmup),
                    Catch::Contains("warmup_epochs 0, this balancer has warmup_epochs 1"));
  CHECK(other_warmup.options().warmup_epochs() == 1);
  GuidedBalancer other_read(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(5)),
                            BalancerOptions().warmup_epochs(0).check_every_step(false).speed_read(
                                SpeedRead::previous_step));
  CHECK_THROWS_WITH(load_into(other_read),
                    Catch::Contains("speed_read same_step, this balancer has previous_step"));
  RandomBalancer other_policy(net, RandomPolicy(), BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(load_into(other_policy), Catch::Contains("made with policy 'mmbalance.guided'") &&
                                                 Catch::Contains("this balancer's policy is 'mmbalance.random'"));
  // The same options resume; the window goes on to exactly 5 steps.
  GuidedBalancer same(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(5)),
                      BalancerOptions().warmup_epochs(0));
  load_into(same);
  const auto kinds = train_steps(net, opt, same, 3, 7, 100);
  CHECK(kinds[0] != StepKind::regular);
  CHECK(kinds[2] != StepKind::regular);
  CHECK(kinds[3] == StepKind::regular);  // 1 regular + 5 re-balancing, then regular
}

// ---- N branches: the same Balancer with step plans --------------------------------------

namespace {

// A policy that holds branch 7 on its first call and branch 0 after: a plan out of range
// for three branches, then a valid one.
struct HoldsBranchSevenFirst {
  int calls = 0;
  StepPlan next_plan() { return ++calls == 1 ? StepPlan::hold(7) : StepPlan::hold(0); }
};

// M per group after each regular step, summed here in double from every parameter of the
// groups `net->parameter_groups()` lists: ||G||^2 / ||theta||^2, one group at a time.
std::vector<double> naive_mu(const ParameterGroups& groups) {
  std::vector<double> mu;
  for (const auto* lists : {&groups.branch, &groups.fusion}) {
    for (const auto& group : *lists) {
      double g2 = 0, p2 = 0;
      for (const auto& p : group) {
        if (p.grad().defined()) g2 += p.grad().to(at::kDouble).pow(2).sum().item<double>();
        p2 += p.to(at::kDouble).pow(2).sum().item<double>();
      }
      mu.push_back(g2 / p2);
    }
  }
  return mu;
}

}  // namespace

TEST_CASE("N-branch balancer with two branches takes the two-branch balancer's steps bit for bit",
          "[balancer][n-way]") {
  auto pair = small_net(102);  // a seed whose run re-balances both branches
  TwoWay twin = small_two_way();
  copy_state(pair, twin);
  auto opt_pair = make_sgd(pair);
  auto opt_twin = make_sgd(twin);
  const auto options = GuidedOptions().alpha(0.02).Q(2);
  GuidedBalancer pair_balancer(pair, GuidedPolicy(options));
  Balancer<GuidedPolicy> twin_balancer(twin, GuidedPolicy(options));
  std::vector<StepPlan> pair_plans;
  std::vector<double> pair_speeds, twin_speeds;
  for (int i = 0; i < 20; ++i) {  // one epoch of warm-up, then guided
    pair_plans.push_back(train_steps(pair, opt_pair, pair_balancer, i, i + 1, 4)[0]);
    pair_speeds.push_back(pair_balancer.last_d_speed());
    REQUIRE(train_plans(twin, opt_twin, twin_balancer, i, i + 1, 4)[0] == pair_plans.back());
    twin_speeds.push_back(twin_balancer.last_d_speed());
  }
  CHECK(pair_speeds == twin_speeds);
  CHECK(same_state(*pair, *twin));
  const auto& counts = twin_balancer.total_plan_counts();
  const StepCounts pair_counts = pair_balancer.total_step_counts();
  const std::vector<std::int64_t> expected(pair_counts.begin(), pair_counts.end());
  CHECK(counts == expected);
  // Both directions were taken, so the comparison covered the choice of branch.
  CHECK(counts[1] > 0);
  CHECK(counts[2] > 0);
}

TEST_CASE("N-branch guided balancing holds the branch whose fusion path learns fastest, for "
          "Q steps (a replay from hand-summed speeds)", "[balancer][n-way]") {
  ThreeWay net = small_three_way(91);
  auto opt = make_sgd(net);
  const double alpha = 0.05;
  const std::int64_t Q = 2;
  Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(alpha).Q(Q)),
                                  BalancerOptions().warmup_epochs(1));
  const auto groups = net->parameter_groups();
  std::vector<double> m(6, 0.0);  // the replay's accumulators
  std::int64_t window_left = 0;
  std::size_t held = 0;
  std::vector<std::int64_t> expected_counts(4, 0);
  for (int i = 0; i < 24; ++i) {
    CAPTURE(i);
    const bool warmup = i < 4;
    const StepPlan expected = window_left > 0 ? StepPlan::hold(held) : StepPlan::regular();
    if (window_left > 0) --window_left;
    const auto b = n_way_batch(3, 8, static_cast<std::uint64_t>(i));
    const StepPlan plan = balancer.next_plan();
    REQUIRE(plan == expected);
    auto loss = modality_specific_loss(net->forward(b.inputs, plan), b.target);
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    if (plan.is_regular()) {
      const auto mu = naive_mu(groups);
      for (std::size_t g = 0; g < 6; ++g) m[g] += mu[g];
      std::vector<double> s;
      for (std::size_t k = 0; k < 3; ++k) s.push_back(std::log10(m[3 + k] / m[k]));
      const auto hi = std::max_element(s.begin(), s.end());
      const double spread = *hi - *std::min_element(s.begin(), s.end());
      CHECK(balancer.last_speeds().spread == Approx(spread).epsilon(1e-6));
      CHECK(std::isnan(balancer.last_d_speed()));  // signed d_speed: two branches only
      for (std::size_t k = 0; k < 3; ++k) {
        CHECK(balancer.last_speeds().speeds[k] == Approx(s[k]).epsilon(1e-6));
      }
      if (!warmup && spread > alpha) {
        held = static_cast<std::size_t>(hi - s.begin());
        window_left = Q;
      }
    }
    ++expected_counts[plan.is_regular() ? 0 : 1 + *plan.held_branch()];
    opt.step();
    if ((i + 1) % 4 == 0) balancer.end_epoch();
  }
  CHECK(balancer.total_plan_counts() == expected_counts);
  CHECK(expected_counts[0] < 24);  // windows were opened
}

TEST_CASE("N-branch random balancing: regular in warm-up, then the policy's draws over N + 1 plans",
          "[balancer][n-way]") {
  ThreeWay net = small_three_way(92);
  auto opt = make_sgd(net);
  Balancer<RandomPolicy> balancer(net, RandomPolicy(RandomOptions().seed(4)));
  const auto plans = train_plans(net, opt, balancer, 0, 40, 4);
  // The draws written out: mt19937_64 seeded 4, each draw modulo 4 (0: regular, k: hold k-1).
  std::mt19937_64 engine(4);
  std::vector<std::int64_t> counts(4, 0);
  for (int i = 0; i < 40; ++i) {
    CAPTURE(i);
    StepPlan expected = StepPlan::regular();
    if (i >= 4) {
      const auto draw = engine() % 4;
      if (draw > 0) expected = StepPlan::hold(draw - 1);
    }
    CHECK(plans[i] == expected);
    ++counts[expected.is_regular() ? 0 : 1 + *expected.held_branch()];
  }
  CHECK(balancer.total_plan_counts() == counts);
  CHECK(counts[1] > 0);
  CHECK(counts[2] > 0);
  CHECK(counts[3] > 0);
  CHECK(balancer.epoch_plan_counts() == std::vector<std::int64_t>(4, 0));  // an epoch just ended
}

TEST_CASE("N-branch balancer: policies of another branch count, plans out of range and "
          "two-branch calls are refused with the values", "[balancer][n-way][bad-input]") {
  ThreeWay net = small_three_way(93);
  // The deprecated N-branch constructors name a count, which the network's must match.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  CHECK_THROWS_WITH(GuidedBalancer(net, NWayGuidedPolicy(2, GuidedOptions())),
                    Catch::Contains("the policy was made for 2 branches, the network has 3"));
  CHECK_THROWS_WITH(RandomBalancer(small_net(1), NWayRandomPolicy(3, RandomOptions())),
                    Catch::Contains("the policy was made for 3 branches, the network has 2"));
#pragma GCC diagnostic pop

  Balancer<HoldsBranchSevenFirst> bad(net, HoldsBranchSevenFirst(), BalancerOptions().warmup_epochs(0));
  for (int attempt = 0; attempt < 2; ++attempt) {  // the policy's call is undone each time
    CHECK_THROWS_WITH(bad.next_plan(), Catch::Contains("holds branch 7, the network has 3 branches (0..2)"));
    CHECK(bad.policy().calls == 0);
  }

  VanillaBalancer vanilla(net);
  CHECK_THROWS_WITH(vanilla.next_step(), Catch::Contains("this network has 3; use next_plan()"));
  CHECK_THROWS_WITH(vanilla.epoch_step_counts(), Catch::Contains("use epoch_plan_counts()"));
  auto opt = make_sgd(net);
  train_plans(net, opt, vanilla, 0, 3, 100);  // vanilla runs on N branches through next_plan
  const std::vector<std::int64_t> three_regular = {3, 0, 0, 0};
  CHECK(vanilla.total_plan_counts() == three_regular);
  // Checks on: the speeds are read every step; for N = 3, the spread is max - min and
  // there is no signed d_speed.
  const auto now = vanilla.speed();
  const auto [lo, hi] = std::minmax_element(now.speeds.begin(), now.speeds.end());
  CHECK(vanilla.last_speeds().spread == Approx(*hi - *lo).epsilon(1e-12));
  CHECK(std::isnan(vanilla.last_d_speed()));
  CHECK(std::isnan(now.d_speed));
  CHECK(vanilla.speed().speeds.size() == 3);
}

TEST_CASE("N-branch balancer: a re-balancing step with a NaN gradient in branch 2 is rejected, "
          "naming the group", "[balancer][n-way][bad-input]") {
  ThreeWay net = small_three_way(94);
  auto opt = make_sgd(net);
  Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                                  BalancerOptions().warmup_epochs(0));
  train_plans(net, opt, balancer, 0, 1, 100);  // regular; alpha 0 opens a window
  const auto before = saved_bytes(balancer);
  const StepPlan plan = balancer.next_plan();
  REQUIRE_FALSE(plan.is_regular());
  const auto b = n_way_batch(3, 8, 1);
  auto loss = modality_specific_loss(net->forward(b.inputs, plan), b.target);
  opt.zero_grad();
  loss.backward();
  std::get<2>(net->branches)->classifier->bias.grad()[1] = NAN;
  CHECK_THROWS_WITH(balancer.observe(loss),
                    Catch::Contains("non-finite gradient in group theta2 (branch 2)") &&
                        Catch::Contains(to_string(plan)));
  CHECK(saved_bytes(balancer) == before);
}

TEST_CASE("Balancer::load refuses a record of another branch count and reads the two-branch "
          "record of earlier versions", "[balancer][n-way][bad-input]") {
  ThreeWay three = small_three_way(95);
  auto opt3 = make_sgd(three);
  VanillaBalancer three_balancer(three);
  train_plans(three, opt3, three_balancer, 0, 5, 4);
  torch::serialize::OutputArchive out;
  three_balancer.save(out);
  std::stringstream bytes;
  out.save_to(bytes);

  auto two = small_net(96);
  VanillaBalancer two_balancer(two);
  const auto before = saved_bytes(two_balancer);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  CHECK_THROWS_WITH(two_balancer.load(in),
                    Catch::Contains("made for a network of 3 branches, this one has 2"));
  CHECK(saved_bytes(two_balancer) == before);

  // The record an earlier version wrote: no branch count, the last speeds by name.
  torch::serialize::OutputArchive old;
  old.write("policy_type", std::string(c10::demangle(typeid(VanillaPolicy).name())));
  old.write("accumulated", at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble));
  const auto& numel = two_balancer.meter().group_numel();
  old.write("group_numel", at::tensor(std::vector<std::int64_t>(numel.begin(), numel.end()), at::kLong));
  old.write("meter_steps", std::int64_t{5});
  old.write("step", std::int64_t{7});
  old.write("epoch", std::int64_t{1});
  old.write("last_d_speed", 0.25 - 0.125);
  old.write("s_m1_given_m0", 0.25);
  old.write("s_m0_given_m1", 0.125);
  old.write("skipped", std::int64_t{0});
  old.write("epoch_counts", at::tensor({3, 0, 0}, at::kLong));
  old.write("total_counts", at::tensor({7, 0, 0}, at::kLong));
  old.write("warmup_epochs", std::int64_t{1});
  old.write("speed_read", std::int64_t{0});
  std::stringstream old_bytes;
  old.save_to(old_bytes);
  torch::serialize::InputArchive old_in;
  old_in.load_from(old_bytes);
  two_balancer.load(old_in);
  CHECK(two_balancer.last_d_speed() == 0.125);
  CHECK(two_balancer.last_speeds().fastest == 0);
  CHECK(two_balancer.step() == 7);
  CHECK(two_balancer.total_step_counts() == (StepCounts{7, 0, 0}));
  CHECK(two_balancer.epoch_step_counts() == (StepCounts{3, 0, 0}));
}

TEST_CASE("Balancer::load refuses damaged three-branch records, naming the field, changing nothing",
          "[balancer][n-way][bad-input]") {
  ThreeWay net = small_three_way(97);
  auto opt = make_sgd(net);
  Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
  train_plans(net, opt, balancer, 0, 6, 4);
  const auto before = saved_bytes(balancer);
  // The saved record copied key by key, with one field replaced.
  const auto with = [&](const std::string& replaced, const c10::IValue& value) {
    torch::serialize::OutputArchive saved;
    balancer.save(saved);
    std::stringstream saved_bytes_stream;
    saved.save_to(saved_bytes_stream);
    torch::serialize::InputArchive in;
    in.load_from(saved_bytes_stream);
    torch::serialize::OutputArchive out;
    auto keys = in.keys();
    if (std::find(keys.begin(), keys.end(), replaced) == keys.end()) keys.push_back(replaced);
    for (const auto& key : keys) {
      at::Tensor t;
      c10::IValue v;
      if (key == replaced) {
        if (value.isTensor()) {
          out.write(key, value.toTensor());
        } else {
          out.write(key, value);
        }
      } else if (key == "policy") {
        torch::serialize::OutputArchive policy;
        balancer.policy().save(policy);
        out.write(key, policy);
      } else if (in.try_read(key, t)) {
        out.write(key, t);
      } else if (in.try_read(key, v)) {
        out.write(key, v);
      }
    }
    std::stringstream bytes;
    out.save_to(bytes);
    auto archive = std::make_shared<torch::serialize::InputArchive>();
    archive->load_from(bytes);
    return archive;
  };
  {  // the copy itself loads: the cases below differ from the saved record only in their field
    Balancer<GuidedPolicy> copy(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
    copy.load(*with("step", balancer.step()));
    CHECK(saved_bytes(copy) == before);
  }
  {
    Balancer<GuidedPolicy> copy(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
    CHECK_THROWS_WITH(copy.load(*with("branches", std::string("three"))),
                      Catch::Contains("'branches' is not an integer"));
  }
  const std::vector<std::pair<std::shared_ptr<torch::serialize::InputArchive>, std::string>> cases = {
      {with("branches", std::int64_t{1} << 40), "made for a network of 1099511627776 branches, this one has 3"},
      {with("last_speeds", at::zeros({2}, at::kDouble)), "'last_speeds' must hold 3 numbers, got [2]"},
      {with("last_speeds", at::zeros({3}, at::kLong)), "'last_speeds' must hold 3 numbers"},
      {with("total_counts", at::zeros({3}, at::kLong)), "step counts in checkpoint must be 4 integers"},
      {with("epoch_counts", at::full({4}, 1e30, at::kDouble)), "step counts in checkpoint must be 4 integers"},
      {with("total_counts", at::tensor({1, -2, 0, 0}, at::kLong)), "negative step counts"},
      {with("group_numel", at::full({6}, NAN, at::kDouble)), "(not integers: [6])"},
      {with("accumulated", at::zeros({4}, at::kDouble)), "accumulators must have 6 entries"},
      {with("accumulated", at::zeros({6}, at::kComplexDouble)), "accumulators must have 6 entries"},
      {with("lagged_accumulated", at::zeros({6}, at::kDouble)), "pending for SpeedRead::previous_step"},
  };
  for (const auto& [archive, message] : cases) {
    CAPTURE(message);
    CHECK_THROWS_WITH(balancer.load(*archive), Catch::Contains(message));
    CHECK(saved_bytes(balancer) == before);
  }
}

namespace {

// Holds branch 1 on its first call; throws on its second, after changing its own state.
struct ThrowsOnSecondCall {
  int calls = 0;
  StepPlan next_plan() {
    if (++calls == 2) throw std::runtime_error("policy failed");
    return StepPlan::hold(1);
  }
};

}  // namespace

TEST_CASE("A policy that throws, or a plan out of range, leaves the policy and the staged gates "
          "as they were", "[balancer][n-way][bad-input]") {
  ThreeWay net = small_three_way(98);
  auto opt = make_sgd(net);
  Balancer<ThrowsOnSecondCall> balancer(net, ThrowsOnSecondCall(), BalancerOptions().warmup_epochs(0));
  train_plans(net, opt, balancer, 0, 1, 100);  // the first call: branch 1 held
  // Gates staged by a forward pass of the user's own in training mode, before next_plan.
  net->forward(n_way_batch(3, 4, 9).inputs);
  std::vector<at::Tensor> staged;
  for (auto& m : net->gate_means()) staged.push_back(m->staged().clone());
  REQUIRE(staged.front()[-1].item<double>() == 4);  // four rows staged, the count last
  CHECK_THROWS_WITH(balancer.next_plan(), Catch::Contains("policy failed"));
  CHECK(balancer.policy().calls == 1);
  for (std::size_t i = 0; i < staged.size(); ++i) CHECK(torch::equal(net->gate_means()[i]->staged(), staged[i]));

  Balancer<HoldsBranchSevenFirst> out_of_range(net, HoldsBranchSevenFirst(), BalancerOptions().warmup_epochs(0));
  CHECK_THROWS_WITH(out_of_range.next_plan(), Catch::Contains("holds branch 7"));
  for (std::size_t i = 0; i < staged.size(); ++i) CHECK(torch::equal(net->gate_means()[i]->staged(), staged[i]));
}

// A policy of the user's that holds branch 0 every step and does not declare it.
struct AlwaysHoldsBranch0 {
  int calls = 0;
  StepPlan next_plan() {
    ++calls;
    return StepPlan::hold(0);
  }
};

TEST_CASE("Late fusion: policies that hold fusion gates are refused by name, a re-balancing "
          "plan is refused when chosen, vanilla and OGM-GE train", "[balancer][late-fusion][bad-input]") {
  Net net = small_late_net(41);
  const std::string refused = "chooses re-balancing steps, which hold the fusion modules' gates, "
                              "and this network has no fusion modules (late fusion)";
  CHECK_THROWS_WITH(GuidedBalancer(net, GuidedPolicy()), Catch::Contains("GuidedPolicy " + refused));
  CHECK_THROWS_WITH(Balancer<RandomPolicy>(net, RandomPolicy()), Catch::Contains("RandomPolicy " + refused));

  Balancer<AlwaysHoldsBranch0> holds(net, AlwaysHoldsBranch0(), BalancerOptions().warmup_epochs(0));
  for (int attempt = 0; attempt < 2; ++attempt) {  // refused, and the policy's call undone
    CHECK_THROWS_WITH(holds.next_plan(), Catch::Contains("holds branch 0, a re-balancing step, and "
                                                         "this network has no fusion modules"));
    CHECK(holds.policy().calls == 0);
  }

  // Vanilla: the same steps as plain training; no fusion path, so no learning speed.
  Net plain = small_late_net(41);
  VanillaBalancer vanilla(net);
  auto opt = make_sgd(net);
  auto plain_opt = make_sgd(plain);
  CHECK(train_steps(net, opt, vanilla, 0, 6) == std::vector<StepKind>(6, StepKind::regular));
  for (int i = 0; i < 6; ++i) {
    const auto b = small_batch(8, static_cast<std::uint64_t>(i));
    auto loss = modality_specific_loss(plain->forward(b.x0, b.x1), b.target);
    plain_opt.zero_grad();
    loss.backward();
    plain_opt.step();
  }
  CHECK(same_parameters(*net, *plain));
  CHECK(std::isnan(vanilla.last_d_speed()));
  CHECK(vanilla.meter().steps() == 6);
  // Checks off: the steps are valid on the device (no fusion path makes no step NaN).
  Net unchecked_net = small_late_net(43);
  VanillaBalancer unchecked(unchecked_net, VanillaPolicy(), BalancerOptions().check_every_step(false));
  auto unchecked_opt = make_sgd(unchecked_net);
  train_steps(unchecked_net, unchecked_opt, unchecked, 0, 3);
  CHECK(unchecked.meter().steps() == 3);
  CHECK(unchecked.meter().skipped() == 0);

  // OGM-GE scales the dominant branch as on any network.
  Net ogm_net = small_late_net(42);
  Balancer<OGMGEPolicy> ogm(ogm_net, OGMGEPolicy(OGMGEOptions().alpha(0.9)), BalancerOptions().warmup_epochs(0));
  auto ogm_opt = make_sgd(ogm_net);
  for (int i = 0; i < 2; ++i) {
    const auto b = small_batch(8, static_cast<std::uint64_t>(i));
    const StepKind kind = ogm.next_step();
    auto loss = ogm.loss(ogm_net->forward(b.x0, b.x1, kind), b.target);
    ogm_opt.zero_grad();
    loss.backward();
    ogm.observe(loss);
    ogm_opt.step();
  }
  const at::Tensor k = ogm.policy().last_coefficients();
  REQUIRE(k.defined());
  CHECK(k.max().item<double>() == 1.0);
  CHECK(k.min().item<double>() < 1.0);
}
