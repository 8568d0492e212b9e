// ReLearning as an epoch-boundary policy: its measure (min-max scaling, k-means, purity)
// against values written out by hand and a naive Lloyd check, its schedule against the
// original's loop (code/ours.py), its strengths tanh(λ|gap|) from features written in the
// test, and through the Balancer: the features the network hands over, the move of the
// branches toward their initial parameters, resume and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <set>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// Rows of `points` (each a vector of coordinates) as a (rows, dimensions) tensor.
at::Tensor matrix(const std::vector<std::vector<double>>& points) {
  std::vector<at::Tensor> rows;
  for (const auto& p : points) rows.push_back(at::tensor(p, at::kDouble));
  return at::stack(rows);
}

at::Tensor labels(const std::vector<std::int64_t>& y) { return at::tensor(y, at::kLong); }

std::size_t distinct(const at::Tensor& t) {
  std::set<std::int64_t> values;
  for (std::int64_t i = 0; i < t.size(0); ++i) values.insert(t[i].item<std::int64_t>());
  return values.size();
}

// `per_blob` points around each centre, with noise far below the centres' distances.
at::Tensor blobs(const std::vector<std::vector<double>>& centres, std::int64_t per_blob, std::uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  std::vector<at::Tensor> parts;
  for (const auto& c : centres) {
    const auto d = static_cast<std::int64_t>(c.size());
    parts.push_back(at::tensor(c, at::kDouble).expand({per_blob, d}) + 0.1 * at::randn({per_blob, d}, gen).to(at::kDouble));
  }
  return at::cat(parts);
}

// The original's schedule (code/ours.py, main): after training epoch `epoch`,
// `if((epoch % args.reinit_epoch == 0)&(epoch>0)): flag_reinit+=1; if(flag_reinit<=args.reinit_num): reinit`.
std::set<std::int64_t> original_reinit_epochs(std::int64_t epochs, std::int64_t reinit_epoch, std::int64_t reinit_num) {
  std::set<std::int64_t> out;
  std::int64_t flag_reinit = 0;
  for (std::int64_t epoch = 0; epoch < epochs; ++epoch) {
    if (epoch % reinit_epoch == 0 && epoch > 0) {
      flag_reinit += 1;
      if (flag_reinit <= reinit_num) out.insert(epoch + 1);  // as epochs done: epoch is numbered from 0
    }
  }
  return out;
}

}  // namespace

TEST_CASE("min_max_scale and cluster_purity as written out by hand", "[relearning]") {
  // Columns: range 2 from 0; constant (scikit-learn divides a zero range by 1: -1); range 2 from 2.
  const at::Tensor s = min_max_scale(matrix({{0, 5, 2}, {2, 5, 4}, {1, 5, 3}}));
  CHECK(s.equal(matrix({{-1, -1, -1}, {1, -1, 1}, {0, -1, 0}})));
  // A float column whose range is below 10 float epsilons counts as constant: divided by 1.
  const at::Tensor nearly = min_max_scale(at::tensor({1.0F, 1.0F + 1e-6F}).unsqueeze(1));
  CHECK(nearly[1][0].item<double>() == Approx(-1 + 2 * (double(1.0F + 1e-6F) - 1)).epsilon(1e-12));
  CHECK(min_max_scale(at::tensor({1.0F, 1.0F + 1e-5F}).unsqueeze(1))[1][0].item<double>() == Approx(1.0));

  // Cluster 0 holds labels 0, 0, 1 (2 of the majority); cluster 1 holds 1, 2, 2, 2 (3).
  CHECK(cluster_purity(labels({0, 0, 1, 1, 2, 2, 2}), labels({0, 0, 0, 1, 1, 1, 1})) == Approx(5.0 / 7));
  // Cluster numbers need not be consecutive; a cluster per row is pure.
  CHECK(cluster_purity(labels({4, 4, 1}), labels({7, 3, 3})) == Approx(2.0 / 3));
  CHECK(cluster_purity(labels({0, 1, 2, 0}), labels({0, 1, 2, 3})) == 1.0);
  // One cluster: the share of the most common label.
  CHECK(cluster_purity(labels({0, 1, 1, 2, 1}), labels({0, 0, 0, 0, 0})) == Approx(3.0 / 5));

  CHECK_THROWS_WITH(cluster_purity(labels({0, 1}), labels({0})), Catch::Contains("must be the same (rows)"));
  CHECK_THROWS_WITH(cluster_purity(labels({0, -1}), labels({0, 0})), Catch::Contains(">= 0"));
  CHECK_THROWS_WITH(min_max_scale(at::zeros({3})), Catch::Contains("expected (rows, dimensions)"));
}

TEST_CASE("k-means finds separated blobs and ends at a fixed point of Lloyd's iterations", "[relearning]") {
  const at::Tensor x = blobs({{0, 0}, {10, 0}, {0, 10}}, 20, 1);
  at::Tensor y = at::arange(3, at::kLong).repeat_interleave(20);
  const at::Tensor c = kmeans(x, KMeansOptions(3));
  CHECK(cluster_purity(y, c) == 1.0);
  CHECK(distinct(c) == 3);  // three clusters, one per blob
  CHECK(kmeans(x, KMeansOptions(3)).equal(c));      // seeded: the same every time

  // On structureless data: every row is nearest to the mean of its own cluster, and no
  // cluster is empty (a naive check of the result, not of the algorithm's steps).
  auto gen = at::detail::createCPUGenerator(5);
  const at::Tensor r = at::randn({60, 4}, gen).to(at::kDouble);
  const std::int64_t k = 5;
  const at::Tensor a = kmeans(r, KMeansOptions(k).runs(2).tolerance(0));
  std::vector<std::vector<double>> means(k, std::vector<double>(4, 0.0));
  std::vector<double> counts(k, 0.0);
  for (std::int64_t i = 0; i < 60; ++i) {
    const auto ci = static_cast<std::size_t>(a[i].item<std::int64_t>());
    counts[ci] += 1;
    for (std::int64_t j = 0; j < 4; ++j) means[ci][static_cast<std::size_t>(j)] += r[i][j].item<double>();
  }
  for (std::size_t ci = 0; ci < means.size(); ++ci) {
    REQUIRE(counts[ci] > 0);
    for (double& m : means[ci]) m /= counts[ci];
  }
  for (std::int64_t i = 0; i < 60; ++i) {
    std::vector<double> d(k, 0.0);
    for (std::size_t ci = 0; ci < means.size(); ++ci) {
      for (std::int64_t j = 0; j < 4; ++j) d[ci] += std::pow(r[i][j].item<double>() - means[ci][static_cast<std::size_t>(j)], 2);
    }
    const auto own = static_cast<std::size_t>(a[i].item<std::int64_t>());
    for (std::size_t ci = 0; ci < d.size(); ++ci) CHECK(d[own] <= d[ci]);
  }
  // As many clusters as rows: each row alone.
  CHECK(distinct(kmeans(r.narrow(0, 0, 6), KMeansOptions(6))) == 6);

  CHECK_THROWS_WITH(kmeans(r, KMeansOptions(61)), Catch::Contains("61 clusters for 60 rows"));
  CHECK_THROWS_WITH(kmeans(matrix({{0, 1}, {NAN, 1}}), KMeansOptions(1)), Catch::Contains("not finite"));
  CHECK_THROWS_WITH(kmeans(r, KMeansOptions(2).runs(0)), Catch::Contains("runs and max_iterations must be >= 1"));
}

// Summed squared distance of every row to the mean of its cluster, written out.
double inertia_of(const at::Tensor& x, const at::Tensor& clusters) {
  double total = 0;
  for (std::int64_t c = 0; c <= clusters.max().item<std::int64_t>(); ++c) {
    const at::Tensor rows = x.index_select(0, (clusters == c).nonzero().flatten());
    if (rows.size(0) > 0) total += (rows - rows.mean(0)).pow(2).sum().item<double>();
  }
  return total;
}

TEST_CASE("k-means follows scikit-learn's Lloyd iterations: the stop, empty clusters, the best start, "
          "a tolerance relative to the data", "[relearning]") {
  const auto column = [](std::vector<double> v) { return at::tensor(v, at::kDouble).unsqueeze(1); };
  // Rows 0, 1, 10, 11 from centres 0 and 1: the first update gives 0 and 22/3 (shift
  // (22/3 - 1)^2); a tolerance above it stops there (inertia 0 + 1 + (8/3)^2 + (11/3)^2),
  // none goes on to 0.5 and 10.5 (inertia 4 * 0.25).
  const at::Tensor x = column({0, 1, 10, 11});
  const auto stopped = mmbalance::detail::lloyd(x, column({0, 1}), 300, 41);
  CHECK(stopped.assignment.equal(labels({0, 0, 1, 1})));
  CHECK(stopped.inertia == Approx(1 + 64.0 / 9 + 121.0 / 9));
  const auto converged = mmbalance::detail::lloyd(x, column({0, 1}), 300, 0);
  CHECK(converged.inertia == Approx(1.0));
  CHECK(mmbalance::detail::lloyd(x, column({0, 1}), 1, 0).inertia == Approx(1 + 64.0 / 9 + 121.0 / 9));

  // Empty clusters 1 and 2 (every row nearest centre 0) take the farthest rows, 10 then 2,
  // which leave cluster 0: its mean is that of 0 and 1.
  const at::Tensor y = column({0, 1, 2, 10});
  const at::Tensor all_in_0 = labels({0, 0, 0, 0});
  const at::Tensor to_0 = column({0, 1, 4, 100}).squeeze(1);
  CHECK(mmbalance::detail::updated_centers(y, column({0, 100, 200}), all_in_0, to_0).equal(column({0.5, 10, 2})));
  // Every row on its centre: nothing moves, the empty cluster keeps its centre.
  CHECK(mmbalance::detail::updated_centers(column({5, 5}), column({5, 7}), labels({0, 0}), column({0, 0}).squeeze(1))
            .equal(column({5, 7})));

  // The best of 10 starts is no worse than the first alone (the same first start); the
  // tolerance scales with the data's variance, so scaled data clusters alike.
  auto gen = at::detail::createCPUGenerator(11);
  const at::Tensor r = at::randn({200, 2}, gen).to(at::kDouble);
  const at::Tensor one = kmeans(r, KMeansOptions(6).runs(1)), ten = kmeans(r, KMeansOptions(6).runs(10));
  CHECK(inertia_of(r, ten) <= inertia_of(r, one));
  CHECK(kmeans(r * 1e-4, KMeansOptions(6).runs(1)).equal(one));
  CHECK(kmeans(r * 1e4, KMeansOptions(6).runs(1)).equal(one));
}

TEST_CASE("ReLearning re-initializes on the original's schedule", "[relearning]") {
  for (const auto& [every, times] : std::vector<std::pair<std::int64_t, std::int64_t>>{{20, 3}, {1, 2}, {3, 0}, {5, 100}}) {
    const ReLearningPolicy p(ReLearningOptions().every(every).times(times));
    const std::set<std::int64_t> want = original_reinit_epochs(120, every, times);
    for (std::int64_t e = 0; e <= 120; ++e) CHECK(p.wants_epoch_features(e) == (want.count(e) == 1));
  }
  CHECK(original_reinit_epochs(90, 20, 3) == std::set<std::int64_t>{21, 41, 61});  // code/script/ours.sh
}

TEST_CASE("ReLearning's strengths are tanh(lambda |purity gap|), from features written in the test",
          "[relearning]") {
  // Branch 0: training rows in two separated blobs by class (purity 1); held-out rows in
  // two blobs each holding its class 3 times and the other once (purity 6/8). Branch 1:
  // separated by class in both sets (no gap).
  const at::Tensor train_y = labels({0, 0, 0, 0, 1, 1, 1, 1});
  const at::Tensor held_y = labels({0, 0, 0, 1, 1, 1, 1, 0});
  const at::Tensor two_blobs = blobs({{0, 0, 0}, {5, 5, 5}}, 4, 3).to(at::kFloat);
  EpochFeatures f;
  f.train = {two_blobs, two_blobs};
  f.held_out = {blobs({{0, 0}, {0, 5}}, 4, 4).to(at::kFloat), two_blobs.index_select(0, labels({0, 1, 2, 4, 5, 6, 7, 3}))};
  f.train_target = train_y;
  f.held_out_target = held_y;
  f.classes = 2;
  f.epochs = 2;

  ReLearningPolicy p(ReLearningOptions().lambda(3).every(1).times(2));  // boundaries 2 and 3
  p.set_branches(2);
  CHECK(p.last_diagnosis().epochs == -1);
  p.observe_epoch_features(f);
  const ReLearningDiagnosis& d = p.last_diagnosis();
  CHECK(d.epochs == 2);
  CHECK(d.train_purity == std::vector<double>{1.0, 1.0});
  CHECK(d.held_out_purity[0] == Approx(0.75));
  CHECK(d.held_out_purity[1] == 1.0);
  const double w0 = std::tanh(3 * 0.25);
  CHECK(d.strengths[0] == Approx(w0).epsilon(1e-12));
  CHECK(d.strengths[1] == 0.0);
  CHECK(p.reinitialization(2) == d.strengths);
  CHECK(p.reinitialization(4) == std::vector<double>{0.0, 0.0});  // not a re-initialization boundary
  CHECK_THROWS_WITH(p.reinitialization(3), Catch::Contains("no diagnosis at the end of epoch 3"));

  // Data-parallel: the ranks' average; a second rank that found (0.5, 0.1) halves the sum.
  f.sum_across_ranks = [](at::Tensor& t) { t.add_(at::tensor({0.5, 0.1, 1.0}, at::kDouble)); };
  p.observe_epoch_features(f);
  CHECK(p.last_diagnosis().strengths[0] == Approx((w0 + 0.5) / 2).epsilon(1e-12));
  CHECK(p.last_diagnosis().strengths[1] == Approx(0.05).epsilon(1e-12));

  // lambda 0: never moves.
  ReLearningPolicy still(ReLearningOptions().lambda(0).every(1).times(1));
  still.set_branches(2);
  f.sum_across_ranks = nullptr;
  still.observe_epoch_features(f);
  CHECK(still.reinitialization(2) == std::vector<double>{0.0, 0.0});
}

TEST_CASE("ReLearning through the Balancer: CE(y) trained, the network's features diagnosed, the "
          "branches moved toward their initial parameters, resumed exactly",
          "[relearning]") {
  const auto train_data = [] {
    std::vector<MultiModalBatch> d;
    for (std::uint64_t i = 0; i < 3; ++i) d.push_back(small_batch(8, i));
    return d;
  };
  const std::vector<MultiModalBatch> held{small_batch(6, 40), small_batch(6, 41)};
  const auto make = [](std::uint64_t seed) {
    Net net = small_late_net(seed);
    auto opt = std::make_shared<torch::optim::SGD>(make_sgd(net));
    auto bal = std::make_shared<Balancer<ReLearningPolicy>>(
        net, ReLearningPolicy(ReLearningOptions().every(1).times(1).kmeans_runs(3)), BalancerOptions().warmup_epochs(0));
    return std::tuple{net, opt, bal};
  };
  auto [net, opt, balancer] = make(7);
  const std::vector<at::Tensor> initial = clones(net->parameters());
  const auto epoch = [&](Net& n, torch::optim::SGD& o, Balancer<ReLearningPolicy>& bal) {
    for (const auto& b : train_data()) {
      bal.next_plan();
      const NetOutput out = n->forward(b.x0, b.x1);
      const at::Tensor loss = bal.loss(out, b.target);
      CHECK(loss.item<double>() == Approx(torch::nn::functional::cross_entropy(out.y, b.target).item<double>()));
      o.zero_grad();
      loss.backward();
      bal.observe(loss);
      o.step();
    }
  };
  epoch(net, *opt, *balancer);
  balancer->end_epoch(net, train_data(), held, *opt);  // 1 epoch done: not a boundary
  CHECK(balancer->policy().last_diagnosis().epochs == -1);

  // Saved here, resumed in a network that starts elsewhere.
  const auto dir = fresh_test_dir("relearning", "resume");
  const std::string path = (dir / "run.ckpt").string();
  save_checkpoint(path, net, *opt, *balancer);

  epoch(net, *opt, *balancer);
  CHECK_THROWS_WITH(balancer->end_epoch(*opt), Catch::Contains("call end_epoch(net, train_sample, held_out, optimizer)"));
  CHECK(balancer->epoch() == 1);
  // Predicted: each branch's pooled features in eval mode, k-means purity on each set.
  const auto features_of = [&](const std::vector<MultiModalBatch>& data, std::size_t k) {
    torch::NoGradGuard no_grad;
    net->eval();
    std::vector<at::Tensor> f;
    for (const auto& b : data) f.push_back(net->forward(b.x0, b.x1).features[k].mean({2, 3}));
    net->train();
    return at::cat(f);
  };
  const auto targets_of = [](const std::vector<MultiModalBatch>& data) {
    std::vector<at::Tensor> t;
    for (const auto& b : data) t.push_back(b.target);
    return at::cat(t);
  };
  std::vector<double> w;
  for (std::size_t k = 0; k < 2; ++k) {
    const auto purity = [&](const std::vector<MultiModalBatch>& data) {
      return cluster_purity(targets_of(data), kmeans(min_max_scale(features_of(data, k)), KMeansOptions(3).runs(3)));
    };
    w.push_back(std::tanh(3.0 * std::abs(purity(train_data()) - purity(held))));
  }
  REQUIRE((w[0] > 0 || w[1] > 0));
  const auto groups = net->parameter_groups().branch;
  std::vector<std::vector<at::Tensor>> before;
  for (const auto& g : groups) before.push_back(clones(g));
  balancer->end_epoch(net, train_data(), held, *opt);
  CHECK(net->is_training());
  const std::vector<double> strengths = balancer->policy().last_diagnosis().strengths;
  REQUIRE(strengths.size() == 2);
  for (std::size_t k = 0; k < 2; ++k) CHECK(strengths[k] == Approx(w[k]).epsilon(1e-12));
  std::size_t moved = 0;
  for (std::size_t k = 0; k < 2; ++k) {
    const std::vector<at::Tensor> now = clones(groups[k]);
    std::vector<at::Tensor> init;  // the branch's initial values, in net->parameters() order
    for (std::size_t i = 0; i < groups[k].size(); ++i) {
      for (std::size_t j = 0; j < initial.size(); ++j) {
        if (net->parameters()[j].unsafeGetTensorImpl() == groups[k][i].unsafeGetTensorImpl()) init.push_back(initial[j]);
      }
    }
    REQUIRE(init.size() == now.size());
    for (std::size_t i = 0; i < now.size(); ++i) {
      CHECK(torch::allclose(now[i], w[k] * init[i] + (1 - w[k]) * before[k][i], 1e-5, 1e-6));
    }
    if (w[k] > 0) moved += groups[k].size();
  }
  CHECK(opt->state().size() == net->parameters().size() - moved);  // the moved parameters' momentum dropped
  epoch(net, *opt, *balancer);
  balancer->end_epoch(net, train_data(), held, *opt);

  // Started elsewhere (other initial parameters): the checkpoint's initial values are used.
  auto [resumed, resumed_opt, resumed_balancer] = make(8);
  load_checkpoint(path, resumed, *resumed_opt, *resumed_balancer);
  for (int e = 0; e < 2; ++e) {
    epoch(resumed, *resumed_opt, *resumed_balancer);
    resumed_balancer->end_epoch(resumed, train_data(), held, *resumed_opt);
  }
  CHECK(same_state(*net, *resumed));
  std::filesystem::remove_all(dir);
}

TEST_CASE("ReLearning refuses bad options and features by name", "[relearning]") {
  CHECK_THROWS_WITH(ReLearningPolicy(ReLearningOptions().lambda(-1)), Catch::Contains("lambda must be a finite number >= 0"));
  CHECK_THROWS_WITH(ReLearningPolicy(ReLearningOptions().every(0)), Catch::Contains("every must be >= 1 epoch, got 0"));
  CHECK_THROWS_WITH(ReLearningPolicy(ReLearningOptions().times(-1)), Catch::Contains("times must be >= 0"));
  CHECK_THROWS_WITH(ReLearningPolicy(ReLearningOptions().kmeans_runs(0)), Catch::Contains("kmeans_runs must be >= 1"));

  ReLearningPolicy p(ReLearningOptions().every(1).times(1));
  EpochFeatures f;
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("set_branches was not called"));
  p.set_branches(2);
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("features of 0 and 0 branches for 2"));
  const at::Tensor rows = at::randn({4, 3});
  f.train = {rows, rows};
  f.held_out = {rows, rows};
  f.train_target = labels({0, 1, 0, 1});
  f.held_out_target = labels({0, 1, 0, 1});
  f.classes = 5;
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("4 training rows for 5 clusters"));
  f.classes = 2;
  f.held_out_target = labels({0, 1, 0, 2});
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("held-out targets outside the heads' 2 classes"));
  f.held_out_target = labels({0, 1, 0, 1});
  f.train[1] = rows.clone().index_fill_(0, labels({2}), NAN);
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("branch 1's training features are not finite"));
  f.train[1] = at::randn({3, 3});
  CHECK_THROWS_WITH(p.observe_epoch_features(f), Catch::Contains("branch 1's training features must be (rows, width)"));
  CHECK(p.last_diagnosis().epochs == -1);  // nothing taken

  // The Balancer refuses empty data by the data's name and keeps the epoch.
  Net net = small_late_net(1);
  auto opt = make_sgd(net);
  Balancer<ReLearningPolicy> balancer(net, ReLearningPolicy(ReLearningOptions().every(1).times(1)),
                                      BalancerOptions().warmup_epochs(1));
  balancer.end_epoch(opt);  // the warm-up's end (0 epochs after it done): no boundary
  balancer.end_epoch(opt);  // 1
  CHECK_THROWS_WITH(balancer.end_epoch(net, std::vector<MultiModalBatch>{}, std::vector<MultiModalBatch>{small_batch(4, 0)}, opt),
                    Catch::Contains("taking features of train_sample"));
  CHECK(balancer.epoch() == 2);

  // A checkpoint made with other options is refused by name, changing nothing.
  const auto dir = fresh_test_dir("relearning", "options");
  const std::string path = (dir / "run.ckpt").string();
  save_checkpoint(path, net, opt, balancer);
  for (const auto& [other, message] : std::vector<std::pair<ReLearningOptions, std::string>>{
           {ReLearningOptions().every(2).times(1), "made with every 1, this policy has 2"},
           {ReLearningOptions().every(1).times(1).lambda(2), "made with lambda 3, this policy has 2"},
           {ReLearningOptions().every(1).times(1).kmeans_runs(3), "made with kmeans_runs 10, this policy has 3"}}) {
    Balancer<ReLearningPolicy> elsewhere(net, ReLearningPolicy(other), BalancerOptions().warmup_epochs(1));
    CHECK_THROWS_WITH(load_checkpoint(path, net, opt, elsewhere), Catch::Contains(message));
    CHECK(elsewhere.epoch() == 0);
  }
  std::filesystem::remove_all(dir);
}
