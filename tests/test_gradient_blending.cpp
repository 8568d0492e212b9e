#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

EpochLosses measured(std::vector<double> train_heads, double train_fused, std::vector<double> held_heads,
                     double held_fused, std::int64_t epochs = 0) {
  return {{std::move(train_heads), train_fused, 10}, {std::move(held_heads), held_fused, 10}, epochs};
}

std::vector<MultiModalBatch> small_batches(std::uint64_t first, int count) {
  std::vector<MultiModalBatch> out;
  for (int i = 0; i < count; ++i) out.push_back(small_batch(8, first + static_cast<std::uint64_t>(i)));
  return out;
}

}  // namespace

TEST_CASE("Gradient-Blending weights follow G / O^2 on a hand-computed table", "[gblend]") {
  // Head 0: L^V 1.0 -> 0.8 (G 0.2), O 1.0 - 0.9 = 0.1 -> 0.8 - 0.5 = 0.3: dO^2 0.04, w 5.
  // Head 1: L^V 1.2 -> 1.1 (G 0.1), O 0.2 -> 0.3: dO^2 0.01, w 10.
  // Fused:  L^V 0.9 -> 0.95 (worse: G clamped to 0), w 1e-8.
  const auto start = measured({0.9, 1.0}, 0.7, {1.0, 1.2}, 0.9);
  const auto end = measured({0.5, 0.8}, 0.6, {0.8, 1.1}, 0.95);
  const std::vector<double> w = GradientBlendingPolicy::blend_weights(start, end);
  const double total = 5 + 10 + 1e-8;
  REQUIRE(w.size() == 3);
  CHECK(w[0] == Approx(5 / total).epsilon(1e-12));
  CHECK(w[1] == Approx(10 / total).epsilon(1e-12));
  CHECK(w[2] == Approx(1e-8 / total).epsilon(1e-9));

  // Heads that generalize and overfit alike get equal weights.
  const auto same = GradientBlendingPolicy::blend_weights(measured({1, 1}, 1, {2, 2}, 2),
                                                          measured({0.5, 0.5}, 0.5, {1.8, 1.8}, 1.8));
  CHECK(same[0] == Approx(1.0 / 3));
  CHECK(same[1] == Approx(1.0 / 3));
  CHECK(same[2] == Approx(1.0 / 3));
  // Nothing generalized: every weight at the floor, so uniform.
  const auto none = GradientBlendingPolicy::blend_weights(measured({1, 1}, 1, {1, 1}, 1),
                                                          measured({0.5, 0.4}, 0.3, {1.1, 1.2}, 1.3));
  CHECK(none[0] == Approx(1.0 / 3));
  CHECK(none[2] == Approx(1.0 / 3));
  // An unchanged overfitting gap: dO^2 floored at 1e-8, so that head dominates.
  const auto steady = GradientBlendingPolicy::blend_weights(measured({1, 1}, 1, {1.5, 1.5}, 1.5),
                                                            measured({0.9, 0.5}, 0.5, {1.4, 1.2}, 1.2));
  // head 0: G 0.1, dO 0 -> 1e7; head 1: G 0.3, dO 0.2 -> 7.5; fused: G 0.3, dO 0.2 -> 7.5
  CHECK(steady[0] == Approx(1e7 / (1e7 + 15)).epsilon(1e-12));
  CHECK(steady[1] == Approx(7.5 / (1e7 + 15)).epsilon(1e-9));
  // One modality perfect (head 1: L^T = L^V = 0 throughout): it gains nothing, so the
  // floor; head 0: G 0.2, dO 0.1 -> 20; fused: G 0.1, dO 0.1 -> 10.
  const auto perfect = GradientBlendingPolicy::blend_weights(measured({0.5, 0}, 0.4, {1.0, 0}, 0.6),
                                                             measured({0.2, 0}, 0.2, {0.8, 0}, 0.5));
  CHECK(perfect[0] == Approx(20 / (30 + 1e-8)).epsilon(1e-12));
  CHECK(perfect[1] == Approx(1e-8 / (30 + 1e-8)).epsilon(1e-9));
  CHECK(perfect[2] == Approx(10 / (30 + 1e-8)).epsilon(1e-12));
}

TEST_CASE("Gradient-Blending: uniform weights until two measurements, then the rule, every "
          "super_epoch epochs", "[gblend]") {
  auto policy = for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(3)), 2);
  const LossWeights initial = policy.loss_weights();
  CHECK(initial.heads == std::vector<double>{1.0 / 3, 1.0 / 3});
  CHECK(initial.fused == 1.0 / 3);
  for (std::int64_t e : {0, 3, 6, 9}) CHECK(policy.wants_epoch_losses(e));
  for (std::int64_t e : {1, 2, 4, 5, 7}) CHECK_FALSE(policy.wants_epoch_losses(e));

  const auto start = measured({0.9, 1.0}, 0.7, {1.0, 1.2}, 0.9, 0);
  const auto end = measured({0.5, 0.8}, 0.6, {0.8, 1.1}, 0.95, 3);
  policy.observe_epoch_losses(start);
  CHECK(policy.loss_weights().heads == initial.heads);  // one measurement: nothing to compare
  CHECK(policy.estimates() == 0);
  policy.observe_epoch_losses(end);
  CHECK(policy.estimates() == 1);
  const double total = 15 + 1e-8;
  CHECK(policy.loss_weights().heads[0] == Approx(5 / total));
  CHECK(policy.loss_weights().heads[1] == Approx(10 / total));
  CHECK(policy.loss_weights().fused == Approx(1e-8 / total).epsilon(1e-6));
}

TEST_CASE("Gradient-Blending refuses bad options and non-finite losses, changing nothing",
          "[gblend][bad-input]") {
  CHECK_THROWS_WITH(for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(0)), 2),
                    Catch::Contains("super_epoch must be >= 1 epoch, got 0"));
  CHECK_THROWS_WITH(for_branches(GradientBlendingPolicy(), 1), Catch::Contains("needs 2 to 4096 branches, got 1"));
  CHECK_THROWS_WITH(for_branches(GradientBlendingPolicy(), std::numeric_limits<std::size_t>::max()),
                    Catch::Contains("needs 2 to 4096 branches, got 18446744073709551615"));
  auto policy = for_branches(GradientBlendingPolicy(), 2);
  policy.observe_epoch_losses(measured({1, 1}, 1, {1.2, 1.3}, 1.1));
  const std::string before = saved_bytes(policy);
  CHECK_THROWS_WITH(policy.observe_epoch_losses(measured({0.5, NAN}, 0.5, {1, 1}, 1, 5)),
                    Catch::Contains("non-finite loss nan at the end of epoch 5 after warm-up (training sample)"));
  CHECK_THROWS_WITH(policy.observe_epoch_losses(measured({0.5, 0.5}, 0.5, {1, 1}, INFINITY)),
                    Catch::Contains("(held-out data)"));
  CHECK_THROWS_WITH(policy.observe_epoch_losses(measured({0.5, 0.5, 0.5}, 0.5, {1, 1, 1}, 1)),
                    Catch::Contains("losses of 3 heads for 2 branches"));
  CHECK(saved_bytes(policy) == before);
}

TEST_CASE("Gradient-Blending's loss through the Balancer is the weighted sum of the heads' "
          "and the fused CE", "[gblend][balancer]") {
  Net net = small_net(61);
  const auto b = small_batch(8, 7);
  // Warm-up: the unweighted loss, CE(y0) + CE(y1).
  {
    Balancer<GradientBlendingPolicy> warming(net, GradientBlendingPolicy(), BalancerOptions().warmup_epochs(1));
    const ModelOutput out = net->forward(b.x0, b.x1, warming.next_step());
    const at::Tensor loss = warming.loss(out, b.target);
    CHECK(loss.item<double>() == Approx((at::cross_entropy_loss(out.y0, b.target) +
                                         at::cross_entropy_loss(out.y1, b.target)).item<double>()));
    warming.abandon_step();
  }
  // A policy whose weights are known: head 0 G 0.2, dO 0.2 -> 5; head 1 G 0.1, dO 0.1 ->
  // 10; fused G 0.3, dO 0.3 -> 10 / 3.
  auto policy = for_branches(GradientBlendingPolicy(), 2);
  policy.observe_epoch_losses(measured({1.0, 1.0}, 1.0, {1.2, 1.2}, 1.2));
  policy.observe_epoch_losses(measured({0.6, 0.8}, 0.4, {1.0, 1.1}, 0.9));
  const double total = 5 + 10 + 10.0 / 3;
  Balancer<GradientBlendingPolicy> balancer(net, policy, BalancerOptions().warmup_epochs(0));
  const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
  const at::Tensor loss = balancer.loss(out, b.target);
  const double expected = 5 / total * at::cross_entropy_loss(out.y0, b.target).item<double>() +
                          10 / total * at::cross_entropy_loss(out.y1, b.target).item<double>() +
                          10.0 / 3 / total * at::cross_entropy_loss((out.y0 + out.y1) * 0.5, b.target).item<double>();
  CHECK(loss.item<double>() == Approx(expected).epsilon(1e-6));
  balancer.abandon_step();

  // Trained through measured boundaries, the weights move away from uniform.
  auto opt = make_sgd(net);
  Balancer<GradientBlendingPolicy> online(net, GradientBlendingPolicy(GradientBlendingOptions().super_epoch(1)));
  const auto train = small_batches(100, 2), held_out = small_batches(200, 2);
  for (int e = 0; e < 3; ++e) {
    for (std::uint64_t i = 0; i < 3; ++i) balanced_step(net, opt, online, small_batch(8, 10 + i));
    online.end_epoch(net, train, held_out);  // e = 0: the end of warm-up, the first measurement
  }
  CHECK(online.policy().estimates() == 2);
  const LossWeights w = online.policy().loss_weights();
  CHECK(w.heads[0] + w.heads[1] + w.fused == Approx(1.0));
  CHECK(std::abs(w.heads[0] - 1.0 / 3) + std::abs(w.heads[1] - 1.0 / 3) > 1e-6);
}

// Wiring: the balancer measures at the right boundaries and hands the policy what
// head_losses measures there (the rule itself is checked against hand tables above).
TEST_CASE("Gradient-Blending measures the losses it is given: the first estimate equals the rule "
          "applied to head_losses at the boundaries", "[gblend][balancer]") {
  Net net = small_net(62);
  auto opt = make_sgd(net);
  Balancer<GradientBlendingPolicy> balancer(net, GradientBlendingPolicy(GradientBlendingOptions().super_epoch(2)),
                                            BalancerOptions().warmup_epochs(1));
  const auto train = small_batches(300, 2), held_out = small_batches(400, 2);
  balanced_step(net, opt, balancer, small_batch(8, 1));
  const HeadLosses t0 = head_losses(net, train), v0 = head_losses(net, held_out);
  balancer.end_epoch(net, train, held_out);
  for (int e = 0; e < 2; ++e) {
    for (std::uint64_t i = 0; i < 3; ++i) balanced_step(net, opt, balancer, small_batch(8, 20 + i));
    if (e == 0) {
      // Not a super-epoch boundary: nothing measured, and a plain end_epoch() will do.
      balancer.end_epoch();
    } else {
      const HeadLosses t1 = head_losses(net, train), v1 = head_losses(net, held_out);
      balancer.end_epoch(net, train, held_out);
      const auto want = GradientBlendingPolicy::blend_weights({t0, v0, 0}, {t1, v1, 2});
      const LossWeights got = balancer.policy().loss_weights();
      CHECK(got.heads[0] == want[0]);
      CHECK(got.heads[1] == want[1]);
      CHECK(got.fused == want[2]);
    }
  }
}

TEST_CASE("Gradient-Blending: a boundary that needs losses refuses a plain end_epoch() and "
          "empty held-out data, changing nothing", "[gblend][balancer][bad-input]") {
  Net net = small_net(63);
  auto opt = make_sgd(net);
  Balancer<GradientBlendingPolicy> balancer(net, GradientBlendingPolicy(), BalancerOptions().warmup_epochs(1));
  balanced_step(net, opt, balancer, small_batch(8, 1));
  const std::string before = saved_bytes(balancer);
  CHECK_THROWS_WITH(balancer.end_epoch(),
                    Catch::Contains("GradientBlendingPolicy measures every head's loss at the end of "
                                    "this epoch: call end_epoch(net, train_sample, held_out)"));
  const std::vector<MultiModalBatch> empty;
  CHECK_THROWS_WITH(balancer.end_epoch(net, small_batches(1, 1), empty),
                    Catch::Contains("head_losses: the data is empty") &&
                        Catch::Contains("Balancer::end_epoch: measuring held_out"));
  CHECK_THROWS_WITH(balancer.end_epoch(net, empty, small_batches(1, 1)),
                    Catch::Contains("head_losses: the data is empty") &&
                        Catch::Contains("Balancer::end_epoch: measuring train_sample"));
  // A failure's own type survives (a caller may retry after freeing memory on this one).
  const auto out_of_memory = [](at::Tensor&) { TORCH_CHECK_WITH(OutOfMemoryError, false, "simulated: out of memory"); };
  CHECK_THROWS_AS(balancer.end_epoch(net, small_batches(1, 1), small_batches(1, 1), out_of_memory), c10::OutOfMemoryError);
  CHECK_THROWS_WITH(balancer.end_epoch(net, small_batches(1, 1), small_batches(1, 1), out_of_memory),
                    Catch::Contains("simulated: out of memory") &&
                        Catch::Contains("Balancer::end_epoch: measuring train_sample"));
  // Held-out data the network turns into non-finite losses: the policy's named refusal.
  std::vector<MultiModalBatch> poisoned = small_batches(3, 1);
  poisoned[0].x0.fill_(std::numeric_limits<float>::quiet_NaN());
  CHECK_THROWS_WITH(balancer.end_epoch(net, small_batches(1, 1), poisoned),
                    Catch::Contains("non-finite loss nan at the end of epoch 0 after warm-up (held-out data)"));
  CHECK(saved_bytes(balancer) == before);
  CHECK(balancer.epoch() == 0);
  CHECK(net->is_training());
  balancer.end_epoch(net, small_batches(1, 1), small_batches(2, 1));
  CHECK(balancer.epoch() == 1);
}

TEST_CASE("Gradient-Blending resumes bit for bit mid-run", "[gblend][checkpoint]") {
  const auto train = small_batches(500, 2), held_out = small_batches(600, 2);
  // Measured at the ends of epochs 0 (warm-up), 2 and 4; the run is cut after epoch 1,
  // inside a super-epoch, so the first measurement must come through the checkpoint.
  const auto options = GradientBlendingOptions().super_epoch(2);
  // Epoch e: steps 3e .. 3e+2.
  const auto run_epochs = [&](Net& net, torch::optim::SGD& opt, Balancer<GradientBlendingPolicy>& balancer,
                              int first, int last) {
    for (int e = first; e < last; ++e) {
      for (int i = 0; i < 3; ++i) balanced_step(net, opt, balancer, small_batch(8, static_cast<std::uint64_t>(3 * e + i)));
      balancer.end_epoch(net, train, held_out);  // measures where the policy asks
    }
  };
  Net whole = small_net(64);
  auto whole_opt = make_sgd(whole);
  Balancer<GradientBlendingPolicy> whole_balancer(whole, GradientBlendingPolicy(options));
  run_epochs(whole, whole_opt, whole_balancer, 0, 5);
  REQUIRE(whole_balancer.policy().estimates() == 2);

  Net first = small_net(64);
  auto first_opt = make_sgd(first);
  Balancer<GradientBlendingPolicy> first_balancer(first, GradientBlendingPolicy(options));
  run_epochs(first, first_opt, first_balancer, 0, 2);
  torch::serialize::OutputArchive out;
  first_balancer.save(out);
  std::stringstream bytes;
  out.save_to(bytes);

  Net second = small_net(999);
  copy_state(first, second);
  auto second_opt = make_sgd(second);
  {
    torch::serialize::OutputArchive o;
    first_opt.save(o);
    std::stringstream s;
    o.save_to(s);
    torch::serialize::InputArchive i;
    i.load_from(s);
    second_opt.load(i);
  }
  Balancer<GradientBlendingPolicy> second_balancer(second, GradientBlendingPolicy(options));
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  second_balancer.load(in);
  run_epochs(second, second_opt, second_balancer, 2, 5);
  CHECK(saved_bytes(second_balancer) == saved_bytes(whole_balancer));
  CHECK(second_balancer.policy().loss_weights().heads == whole_balancer.policy().loss_weights().heads);
  const auto a = whole->parameters(), b = second->parameters();
  for (std::size_t j = 0; j < a.size(); ++j) CHECK(torch::equal(a[j], b[j]));
}

TEST_CASE("Gradient-Blending state from other options, or damaged, is refused and changes nothing",
          "[gblend][checkpoint][bad-input]") {
  auto measured_once = for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(2)), 2);
  measured_once.observe_epoch_losses(measured({1, 1}, 1, {1.2, 1.3}, 1.1));
  const std::string record = saved_bytes(measured_once);

  auto other_super = for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(3)), 2);
  CHECK_THROWS_WITH(load_saved(other_super, record),
                    Catch::Contains("made with super_epoch 2, this policy has 3"));
  auto three = for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(2)), 3);
  CHECK_THROWS_WITH(load_saved(three, record), Catch::Contains("made for 2 branches, this policy has 3"));

  // Records written field by field.
  const auto record_with = [](const at::Tensor& weights, std::int64_t measurements, const at::Tensor& previous) {
    torch::serialize::OutputArchive out;
    out.write("branches", std::int64_t{2});
    out.write("super_epoch", std::int64_t{2});
    out.write("weights", weights);
    out.write("measurements", measurements);
    if (previous.defined()) {
      out.write("previous_epochs", std::int64_t{0});
      out.write("previous_train", previous);
      out.write("previous_held_out", previous);
    }
    std::stringstream bytes;
    out.save_to(bytes);
    return bytes.str();
  };
  const at::Tensor uniform = at::full({3}, 1.0 / 3, at::kDouble);
  auto policy = for_branches(GradientBlendingPolicy(GradientBlendingOptions().super_epoch(2)), 2);
  const std::string before = saved_bytes(policy);
  CHECK_THROWS_WITH(load_saved(policy, record_with(at::full({2}, 0.5, at::kDouble), 0, {})),
                    Catch::Contains("'weights' in the checkpoint must hold 3 doubles, got Double[2]"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(at::full({3}, 0.5, at::kDouble), 0, {})),
                    Catch::Contains("weights sum to 1.5, not 1"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(at::tensor({0.5, NAN, 0.5}, at::kDouble), 0, {})),
                    Catch::Contains("non-finite 'weights'"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(uniform.to(at::kFloat), 0, {})),
                    Catch::Contains("'weights' in the checkpoint must hold 3 doubles, got Float[3]"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(uniform, -1, {})), Catch::Contains("damaged state"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(uniform, 1, {})),
                    Catch::Contains("damaged state in checkpoint (the last measurement)"));
  CHECK_THROWS_WITH(load_saved(policy, record_with(uniform, 1, at::full({3}, INFINITY, at::kDouble))),
                    Catch::Contains("non-finite 'previous_train'"));
  CHECK(saved_bytes(policy) == before);
  CHECK_NOTHROW(load_saved(policy, record_with(uniform, 1, at::ones({3}, at::kDouble))));
  CHECK(policy.estimates() == 0);
}

TEST_CASE("head_losses: every head's and y's mean CE over the batches, as computed per batch",
          "[gblend][head-losses]") {
  Net net = small_net(65);
  const auto data = small_batches(700, 3);
  double sums[3] = {0, 0, 0};
  std::int64_t count = 0;
  {
    torch::NoGradGuard no_grad;
    net->eval();
    for (const auto& b : data) {
      const ModelOutput out = net->forward(b.x0, b.x1);
      const double n = static_cast<double>(b.target.size(0));
      sums[0] += at::cross_entropy_loss(out.y0, b.target).item<double>() * n;
      sums[1] += at::cross_entropy_loss(out.y1, b.target).item<double>() * n;
      sums[2] += at::cross_entropy_loss((out.y0 + out.y1) * 0.5, b.target).item<double>() * n;
      count += b.target.size(0);
    }
    net->train();
  }
  const HeadLosses got = head_losses(net, data);
  CHECK(got.samples == count);
  CHECK(got.heads[0] == Approx(sums[0] / static_cast<double>(count)).epsilon(1e-6));
  CHECK(got.heads[1] == Approx(sums[1] / static_cast<double>(count)).epsilon(1e-6));
  CHECK(got.fused == Approx(sums[2] / static_cast<double>(count)).epsilon(1e-6));
  CHECK(net->is_training());

  // N branches: the two-branch twin gives the same losses.
  TwoWay twin = small_two_way();
  copy_state(net, twin);
  std::vector<Batch> n_way;
  for (const auto& b : data) n_way.push_back({{b.x0, b.x1}, b.target});
  const HeadLosses twin_got = head_losses(twin, n_way);
  CHECK(twin_got.heads[0] == Approx(got.heads[0]).epsilon(1e-6));
  CHECK(twin_got.fused == Approx(got.fused).epsilon(1e-6));

  std::vector<MultiModalBatch> bad = {small_batch(8, 1)};
  bad[0].target = bad[0].target.narrow(0, 0, 3);
  CHECK_THROWS_WITH(head_losses(net, bad), Catch::Contains("batch 8, got [3]"));
  CHECK(net->is_training());
}

TEST_CASE("Gradient-Blending on three branches through the Balancer: four weights, the loss "
          "by hand, measurements from N-branch batches", "[gblend][balancer][n-way]") {
  ThreeWay net = small_three_way(66);
  // Known weights: heads G 0.2, 0.1, 0.3 with dO 0.2, 0.1, 0.3 -> 5, 10, 10/3; fused G 0.2,
  // dO 0.2 -> 5.
  auto policy = for_branches(GradientBlendingPolicy(), 3);
  policy.observe_epoch_losses(measured({1.0, 1.0, 1.0}, 1.0, {1.2, 1.2, 1.2}, 1.2));
  policy.observe_epoch_losses(measured({0.6, 0.8, 0.4}, 0.6, {1.0, 1.1, 0.9}, 1.0));
  const double total = 5 + 10 + 10.0 / 3 + 5;
  Balancer<GradientBlendingPolicy> balancer(net, policy, BalancerOptions().warmup_epochs(0));
  const Batch b = n_way_batch(3, 8, 5);
  const NetOutput out = net->forward(b.inputs, balancer.next_plan());
  const at::Tensor loss = balancer.loss(out, b.target);
  const at::Tensor mean_of_heads = (out.heads[0] + out.heads[1] + out.heads[2]) / 3;
  const double expected = (5 * at::cross_entropy_loss(out.heads[0], b.target).item<double>() +
                           10 * at::cross_entropy_loss(out.heads[1], b.target).item<double>() +
                           10.0 / 3 * at::cross_entropy_loss(out.heads[2], b.target).item<double>() +
                           5 * at::cross_entropy_loss(mean_of_heads, b.target).item<double>()) / total;
  CHECK(loss.item<double>() == Approx(expected).epsilon(1e-6));
  balancer.abandon_step();

  // Online, measured on N-branch batches: four weights that move.
  auto opt = make_sgd(net);
  Balancer<GradientBlendingPolicy> online(net, GradientBlendingPolicy(GradientBlendingOptions().super_epoch(1)));
  const std::vector<Batch> train = {n_way_batch(3, 8, 100), n_way_batch(3, 8, 101)};
  const std::vector<Batch> held_out = {n_way_batch(3, 8, 200)};
  for (int e = 0; e < 3; ++e) {
    for (std::uint64_t i = 0; i < 3; ++i) {
      const Batch s = n_way_batch(3, 8, 10 + i);
      const StepPlan plan = online.next_plan();
      const at::Tensor l = online.loss(net->forward(s.inputs, plan), s.target);
      opt.zero_grad();
      l.backward();
      online.observe(l);
      opt.step();
    }
    online.end_epoch(net, train, held_out);
  }
  CHECK(online.policy().estimates() == 2);
  const LossWeights w = online.policy().loss_weights();
  REQUIRE(w.heads.size() == 3);
  CHECK(w.heads[0] + w.heads[1] + w.heads[2] + w.fused == Approx(1.0));
  CHECK(std::abs(w.heads[0] - 0.25) + std::abs(w.heads[1] - 0.25) + std::abs(w.heads[2] - 0.25) > 1e-6);
}

TEST_CASE("Gradient-Blending trains a late-fusion network: the weights move, the loss is "
          "theirs", "[gblend][balancer][late-fusion]") {
  Net net = small_late_net(67);
  auto opt = make_sgd(net);
  Balancer<GradientBlendingPolicy> balancer(net, GradientBlendingPolicy(GradientBlendingOptions().super_epoch(1)));
  const auto train = small_batches(800, 2), held_out = small_batches(900, 2);
  for (int e = 0; e < 3; ++e) {
    for (std::uint64_t i = 0; i < 3; ++i) balanced_step(net, opt, balancer, small_batch(8, 30 + i));
    balancer.end_epoch(net, train, held_out);
  }
  CHECK(balancer.policy().estimates() == 2);
  const LossWeights w = balancer.policy().loss_weights();
  CHECK(w.heads[0] + w.heads[1] + w.fused == Approx(1.0));
  const auto b = small_batch(8, 9);
  const ModelOutput out = net->forward(b.x0, b.x1, balancer.next_step());
  const double expected = w.heads[0] * at::cross_entropy_loss(out.y0, b.target).item<double>() +
                          w.heads[1] * at::cross_entropy_loss(out.y1, b.target).item<double>() +
                          w.fused * at::cross_entropy_loss(out.y, b.target).item<double>();
  CHECK(balancer.loss(out, b.target).item<double>() == Approx(expected).epsilon(1e-6));
  balancer.abandon_step();
}

TEST_CASE("The three-argument end_epoch works with every policy: one that measures nothing "
          "ignores the data", "[gblend][balancer]") {
  Net net = small_net(68);
  auto opt = make_sgd(net);
  VanillaBalancer balancer(net);
  balanced_step(net, opt, balancer, small_batch(8, 1));
  const std::vector<MultiModalBatch> empty;
  balancer.end_epoch(net, empty, empty);  // nothing measured, so even no data will do
  CHECK(balancer.epoch() == 1);
}
