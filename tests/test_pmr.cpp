// PMR as a loss-term policy: its prototypes (class means, then the momentum update) and
// its term against the original's main_Prototype_grad.py written out on plain numbers
// (EU_dist, the softmax score sums, `if ratio_a_p > 1: beta = 0, lam = alpha`), the loss
// it trains through the Balancer, resume, data-parallel ranks and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <sstream>
#include <vector>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

using Rows = std::vector<std::vector<double>>;

Rows rows_of(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  Rows r(static_cast<std::size_t>(d.size(0)));
  for (std::int64_t i = 0; i < d.size(0); ++i) {
    for (std::int64_t j = 0; j < d.size(1); ++j) r[static_cast<std::size_t>(i)].push_back(d[i][j].item<double>());
  }
  return r;
}

// The original's EU_dist(x1, x2): d[i][j] = sqrt((x1_i - x2_j) . (x1_i - x2_j)).
Rows eu_dist(const Rows& x1, const Rows& x2) {
  Rows d(x1.size(), std::vector<double>(x2.size()));
  REQUIRE(x1[0].size() == x2[0].size());
  for (std::size_t i = 0; i < x1.size(); ++i) {
    for (std::size_t j = 0; j < x2.size(); ++j) {
      double s = 0;
      for (std::size_t c = 0; c < x1[i].size(); ++c) s += (x1[i][c] - x2[j][c]) * (x1[i][c] - x2[j][c]);
      d[i][j] = std::sqrt(s);
    }
  }
  return d;
}

// softmax(-d)[i][c], written out.
double softmax_of(const Rows& d, std::size_t i, std::size_t c) {
  double z = 0;
  for (double v : d[i]) z += std::exp(-v);
  return std::exp(-d[i][c]) / z;
}

// score_p = sum([softmax(sim)[i][label[i]] ...]); criterion(sim, label) = mean -log softmax.
double score(const Rows& d, const std::vector<std::int64_t>& y) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += softmax_of(d, i, static_cast<std::size_t>(y[i]));
  return s;
}
double proto_ce(const Rows& d, const std::vector<std::int64_t>& y) {
  double l = 0;
  for (std::size_t i = 0; i < y.size(); ++i) l -= std::log(softmax_of(d, i, static_cast<std::size_t>(y[i])));
  return l / static_cast<double>(y.size());
}

// Class means of `f` over the rows of each class (the original's calculate_prototype).
Rows class_means(const Rows& f, const std::vector<std::int64_t>& y, std::size_t classes) {
  Rows m(classes, std::vector<double>(f[0].size(), 0.0));
  std::vector<double> n(classes, 0.0);
  for (std::size_t i = 0; i < f.size(); ++i) {
    const auto c = static_cast<std::size_t>(y[i]);
    n[c] += 1;
    for (std::size_t j = 0; j < f[i].size(); ++j) m[c][j] += f[i][j];
  }
  for (std::size_t c = 0; c < classes; ++c) {
    for (double& v : m[c]) v = n[c] > 0 ? v / n[c] : 0.0;
  }
  return m;
}

// Hands `policy` one step's features (its gradient hook), with `classes`-wide heads.
void show_features(PMRPolicy& policy, const std::vector<at::Tensor>& features, const at::Tensor& target,
                   std::int64_t classes = 3, std::int64_t epoch = 0) {
  const std::vector<at::Tensor> heads(features.size(), at::zeros({target.size(0), classes}));
  const std::vector<std::vector<at::Tensor>> no_parameters(features.size());
  const std::function<void(at::Tensor&)> one_process;
  policy.modulate_gradients(StepGradients{heads, target, no_parameters, one_process, epoch, {}, {}, features});
}

NetOutput output_of(const std::vector<at::Tensor>& features) {
  NetOutput out;
  out.features = features;
  for (const at::Tensor& f : features) out.heads.push_back(at::zeros({f.size(0), 3}));
  out.y = out.heads[0];
  return out;
}

PMRPolicy with_branches(const PMROptions& options, std::size_t n = 2) {
  PMRPolicy policy(options);
  policy.set_branches(n);
  return policy;
}

void check_rows(const at::Tensor& got, const Rows& want) {
  REQUIRE(got.size(0) == static_cast<std::int64_t>(want.size()));
  for (std::size_t i = 0; i < want.size(); ++i) {
    for (std::size_t j = 0; j < want[i].size(); ++j) {
      CHECK(got[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(j)].item<double>() ==
            Approx(want[i][j]).margin(1e-6));
    }
  }
}

const std::vector<std::int64_t> kLabels{0, 1, 2, 0, 1, 2};

at::Tensor labels() { return at::tensor(kLabels); }

}  // namespace

TEST_CASE("PMR's prototypes are class means, then (1 - m) mean + m old; a class not seen keeps its own",
          "[pmr]") {
  PMRPolicy policy = with_branches(PMROptions().momentum(0.2));
  const at::Tensor f0 = at::randn({6, 4}, at::TensorOptions().dtype(at::kFloat)), f1 = at::randn({6, 2});
  const at::Tensor g0 = at::randn({6, 4}), g1 = at::randn({6, 2});
  show_features(policy, {f0, f1}, labels());
  show_features(policy, {g0, g1}, labels());
  CHECK(policy.prototypes().empty());
  policy.start_epoch(1);
  REQUIRE(policy.prototypes().size() == 2);
  // Two steps of the same epoch: the means over their 12 rows.
  const std::vector<std::int64_t> twice{0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2};
  const Rows first0 = class_means(rows_of(at::cat({f0, g0})), twice, 3);
  check_rows(policy.prototypes()[0], first0);
  check_rows(policy.prototypes()[1], class_means(rows_of(at::cat({f1, g1})), twice, 3));
  CHECK(policy.coefficients().sum().item<double>() == 0);  // no step scored yet

  // An epoch that sees classes 0 and 1 only: class 2 keeps its prototype.
  const at::Tensor h0 = at::randn({4, 4}), h1 = at::randn({4, 2});
  const std::vector<std::int64_t> y{0, 1, 1, 0};
  show_features(policy, {h0, h1}, at::tensor(y));
  policy.start_epoch(2);
  const Rows mean = class_means(rows_of(h0), y, 3);
  Rows want = first0;
  for (std::size_t c = 0; c < 2; ++c) {
    for (std::size_t j = 0; j < 4; ++j) want[c][j] = 0.8 * mean[c][j] + 0.2 * first0[c][j];
  }
  check_rows(policy.prototypes()[0], want);

  // A class not seen before the first update has zeros; seen later, it takes its mean
  // (nothing to keep), while the others move with the momentum.
  PMRPolicy late = with_branches(PMROptions().momentum(0.2));
  const at::Tensor a0 = at::randn({4, 3}), b0 = at::randn({4, 3});
  const std::vector<std::int64_t> no_two{0, 1, 0, 1}, with_two{2, 2, 0, 1};
  show_features(late, {a0, at::randn({4, 2})}, at::tensor(no_two));
  late.start_epoch(1);
  const Rows first = class_means(rows_of(a0), no_two, 3);
  check_rows(late.prototypes()[0], first);  // row 2: zeros
  show_features(late, {b0, at::randn({4, 2})}, at::tensor(with_two));
  late.start_epoch(2);
  const Rows second = class_means(rows_of(b0), with_two, 3);
  Rows moved = second;
  for (std::size_t c = 0; c < 2; ++c) {
    for (std::size_t j = 0; j < 3; ++j) moved[c][j] = 0.8 * second[c][j] + 0.2 * first[c][j];
  }
  check_rows(late.prototypes()[0], moved);
}

TEST_CASE("PMR's term is the original's: alpha times the prototype CE of the branch whose score is lower",
          "[pmr]") {
  PMRPolicy policy = with_branches(PMROptions().alpha(1.5));
  // Branch 0's features sit near its class means, branch 1's do not.
  const at::Tensor centres = at::tensor({3.0f, 0.0f, 0.0f, 3.0f, -3.0f, -3.0f}).view({3, 2});
  const at::Tensor f0 = centres.index_select(0, labels()) + 0.1 * at::randn({6, 2});
  const at::Tensor f1 = at::randn({6, 3});
  show_features(policy, {f0, f1}, labels());
  policy.start_epoch(1);
  const Rows p0 = rows_of(policy.prototypes()[0]), p1 = rows_of(policy.prototypes()[1]);

  // A step: the original's ratio_a_p from its score sums decides the coefficients.
  const at::Tensor x0 = centres.index_select(0, labels()) + 0.5 * at::randn({6, 2}), x1 = at::randn({6, 3});
  show_features(policy, {x0, x1}, labels());
  const double ratio = score(eu_dist(rows_of(x0), p0), kLabels) / score(eu_dist(rows_of(x1), p1), kLabels);
  REQUIRE(ratio > 1);
  const double beta = ratio > 1 ? 0 : 1.5, lam = ratio > 1 ? 1.5 : 0;  // audio = branch 0, visual = branch 1
  CHECK(policy.coefficients()[0].item<double>() == beta);
  CHECK(policy.coefficients()[1].item<double>() == lam);

  // The next step's term: beta * CE(sim_0) + lam * CE(sim_1) on that step's features.
  const at::Tensor z0 = at::randn({6, 2}).requires_grad_(), z1 = at::randn({6, 3}).requires_grad_();
  const at::Tensor term = policy.auxiliary_loss(output_of({z0, z1}), labels());
  const double want = beta * proto_ce(eu_dist(rows_of(z0.detach()), p0), kLabels) +
                      lam * proto_ce(eu_dist(rows_of(z1.detach()), p1), kLabels);
  CHECK(term.item<double>() == Approx(want).epsilon(1e-5));
  // It pushes only the branch behind: branch 0's features get no gradient from it.
  term.backward();
  CHECK(z0.grad().abs().sum().item<double>() == 0);
  CHECK(z1.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("PMR's distances are differences, as the original's EU_dist, at any batch size", "[pmr]") {
  // Prototypes far from the origin and close to each other, 40 rows (cdist's threshold for
  // ‖x‖² + ‖p‖² − 2x·p is 25): in float that form loses the distances between them.
  std::vector<std::int64_t> y;
  for (std::int64_t i = 0; i < 40; ++i) y.push_back(i % 3);
  const at::Tensor t = at::tensor(y);
  const at::Tensor centres = 100 + 0.01 * at::arange(3, at::kFloat).unsqueeze(1).expand({3, 4});
  const at::Tensor on = centres.index_select(0, t);
  PMRPolicy policy = with_branches(PMROptions().alpha(1.0));
  show_features(policy, {on, on}, t);
  policy.start_epoch(1);
  show_features(policy, {on, on + 0.02 * at::randn({40, 4})}, t);  // branch 1 behind
  REQUIRE(as_doubles(policy.coefficients()) == std::vector<double>{0.0, 1.0});
  const at::Tensor near = on + 1e-3 * at::randn({40, 4});
  const double want = proto_ce(eu_dist(rows_of(near), rows_of(centres)), y);
  CHECK(policy.auxiliary_loss(output_of({on, near}), t).item<double>() == Approx(want).epsilon(1e-3));
}

TEST_CASE("PMR with three branches pushes every branch behind the leader, none on a tie", "[pmr]") {
  PMRPolicy policy = with_branches(PMROptions().alpha(2.0), 3);
  const at::Tensor centres = at::tensor({3.0f, 0.0f, 0.0f, 3.0f, -3.0f, -3.0f}).view({3, 2});
  const at::Tensor near = centres.index_select(0, labels());
  show_features(policy, {near, near, at::randn({6, 2})}, labels());
  policy.start_epoch(1);
  // Branch 1 nearest its prototypes: branches 0 and 2 are behind.
  show_features(policy, {near + 0.5 * at::randn({6, 2}), near, at::randn({6, 2})}, labels());
  CHECK(as_doubles(policy.coefficients()) == std::vector<double>{2.0, 0.0, 2.0});
  // Branches 0 and 1 tied at the top: only branch 2 is behind.
  show_features(policy, {near, near, at::randn({6, 2})}, labels());
  CHECK(as_doubles(policy.coefficients()) == std::vector<double>{0.0, 0.0, 2.0});
  // All tied: no term (the original's else branch, beta = lam = 0).
  PMRPolicy tied = with_branches(PMROptions().alpha(2.0), 3);
  show_features(tied, {near, near, near}, labels());
  tied.start_epoch(1);
  show_features(tied, {near, near, near}, labels());
  CHECK(as_doubles(tied.coefficients()) == std::vector<double>{0.0, 0.0, 0.0});
}

TEST_CASE("PMR through the Balancer trains CE(y), adds the term from the second epoch, until modulation_ends",
          "[pmr]") {
  // Predicted from the features the network hands over, pooled over space as the conv
  // branch's head reads them: prototypes as class means of epoch 0's rows, each step's
  // coefficients from the previous step's scores against them, the term as the original's.
  Net net = small_late_net(4);
  auto opt = make_sgd(net);
  const double alpha = 1.5;
  Balancer<PMRPolicy> balancer(net, PMRPolicy(PMROptions().alpha(alpha).modulation_ends(1)),
                               BalancerOptions().warmup_epochs(0));
  std::vector<Rows> epoch0(2);
  std::vector<std::int64_t> epoch0_labels;
  std::vector<Rows> prototypes;
  std::vector<double> coefficients{0.0, 0.0};
  const auto step = [&](std::uint64_t seed, bool term) {
    const auto b = small_batch(8, seed);
    const std::vector<std::int64_t> y(b.target.data_ptr<std::int64_t>(), b.target.data_ptr<std::int64_t>() + 8);
    balancer.next_plan();
    const NetOutput out = net->forward(b.x0, b.x1);
    const at::Tensor loss = balancer.loss(out, b.target);
    const double ce_y = torch::nn::functional::cross_entropy(out.y.detach().to(at::kDouble), b.target).item<double>();
    std::vector<Rows> pooled;
    for (std::size_t k = 0; k < 2; ++k) pooled.push_back(rows_of(out.features[k].detach().mean({2, 3})));
    double want = ce_y;
    if (term) {
      for (std::size_t k = 0; k < 2; ++k) want += coefficients[k] * proto_ce(eu_dist(pooled[k], prototypes[k]), y);
    }
    CHECK(loss.item<double>() == Approx(want).epsilon(1e-5));
    if (term && seed > 3) CHECK(loss.item<double>() - ce_y > 1e-4);  // a branch is behind
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
    if (prototypes.empty()) {
      for (std::size_t k = 0; k < 2; ++k) epoch0[k].insert(epoch0[k].end(), pooled[k].begin(), pooled[k].end());
      epoch0_labels.insert(epoch0_labels.end(), y.begin(), y.end());
    } else {  // the next step's coefficients: alpha on the branch whose score is lower
      const double s0 = score(eu_dist(pooled[0], prototypes[0]), y), s1 = score(eu_dist(pooled[1], prototypes[1]), y);
      coefficients = {s0 < s1 ? alpha : 0.0, s1 < s0 ? alpha : 0.0};
    }
  };
  for (std::uint64_t i = 0; i < 3; ++i) step(i, false);  // epoch 0: the first prototypes are gathered
  balancer.end_epoch();
  for (std::size_t k = 0; k < 2; ++k) {
    prototypes.push_back(class_means(epoch0[k], epoch0_labels, 3));
    check_rows(balancer.policy().prototypes()[k], prototypes[k]);
  }
  for (std::uint64_t i = 3; i < 6; ++i) step(i, true);  // epoch 1: the term (zero on its first step)
  balancer.end_epoch();
  for (std::uint64_t i = 6; i < 8; ++i) step(i, false);  // epoch 2 > modulation_ends: CE(y) alone
}

TEST_CASE("PMR resumes mid-run exactly", "[pmr]") {
  const auto make = [] {
    Net net = small_late_net(2);
    auto opt = std::make_shared<torch::optim::SGD>(make_sgd(net));
    auto bal = std::make_shared<Balancer<PMRPolicy>>(net, PMRPolicy(PMROptions().alpha(1.0).momentum(0.2)),
                                                     BalancerOptions().warmup_epochs(0));
    return std::tuple{net, opt, bal};
  };
  const auto loss_of = [](Net& net, Balancer<PMRPolicy>& bal, int i) {
    const auto b = small_batch(8, static_cast<std::uint64_t>(i));
    return bal.loss(net->forward(b.x0, b.x1), b.target);
  };
  const auto [a, b] = runs_resumed_mid_run("pmr", make, loss_of, [](const Balancer<PMRPolicy>& bal) {
    REQUIRE(bal.policy().prototypes().size() == 2);  // saved with prototypes and an epoch's sums under way
  });
  CHECK(same_state(*std::get<0>(a), *std::get<0>(b)));
  const PMRPolicy &pa = std::get<2>(a)->policy(), &pb = std::get<2>(b)->policy();
  CHECK(all_equal(pa.prototypes(), pb.prototypes()));
  CHECK(pa.coefficients().equal(pb.coefficients()));
}

TEST_CASE("PMR refuses bad options, features and checkpoints by name", "[pmr]") {
  CHECK_THROWS_WITH(PMRPolicy(PMROptions().alpha(-1)), Catch::Contains("alpha must be a finite number >= 0, got -1"));
  CHECK_THROWS_WITH(PMRPolicy(PMROptions().momentum(1)), Catch::Contains("momentum must be in [0, 1), got 1"));
  CHECK_THROWS_WITH(PMRPolicy(PMROptions().modulation_ends(-2)), Catch::Contains("modulation_ends must be an epoch"));
  PMRPolicy policy = with_branches(PMROptions());
  CHECK_THROWS_WITH(show_features(policy, {at::zeros({6, 2})}, labels()), Catch::Contains("1 features for 2 branches"));
  CHECK_THROWS_WITH(show_features(policy, {at::zeros({6, 2}), at::zeros({5, 2})}, labels()),
                    Catch::Contains("branch 1's features must be (batch, width) or (batch, channels, ...) for the 6 targets"));
  show_features(policy, {at::zeros({6, 2}), at::ones({6, 2})}, labels());
  CHECK_THROWS_WITH(show_features(policy, {at::zeros({6, 2}), at::ones({6, 3})}, labels()),
                    Catch::Contains("branch 1's features are 3 wide, earlier steps' 2"));
  policy.start_epoch(1);
  CHECK_THROWS_WITH(policy.auxiliary_loss(output_of({at::zeros({6, 5}), at::zeros({6, 2})}), labels()),
                    Catch::Contains("branch 0's features are 5 wide, its prototypes 2"));

  const std::string bytes = saved_bytes(policy);
  PMRPolicy other = with_branches(PMROptions().alpha(0.5));
  CHECK_THROWS_WITH(load_saved(other, bytes), Catch::Contains("made with alpha 1, this policy has 0.5"));
  CHECK(other.prototypes().empty());  // nothing changed
  PMRPolicy three = with_branches(PMROptions(), 3);
  CHECK_THROWS_WITH(load_saved(three, bytes), Catch::Contains("made for 2 branches, this policy balances 3"));
  PMRPolicy same = with_branches(PMROptions());
  load_saved(same, bytes);
  CHECK(all_equal(same.prototypes(), policy.prototypes()));
  // Prototypes announced but missing, or of another class count than the rest.
  const auto damaged = [](const at::Tensor& prototype_1, const at::Tensor& coefficients = at::zeros({2})) {
    torch::serialize::OutputArchive a;
    a.write("branches", std::int64_t{2});
    a.write("alpha", 1.0);
    a.write("momentum", 0.2);
    a.write("modulation_ends", std::numeric_limits<std::int64_t>::max());
    a.write("epoch", std::int64_t{0});
    a.write("has_prototypes", true);
    a.write("has_sums", false);
    a.write("prototype_0", at::zeros({3, 2}));
    if (prototype_1.defined()) a.write("prototype_1", prototype_1);
    a.write("seen", at::ones({3}, at::kBool));
    a.write("coefficients", coefficients);
    std::ostringstream s;
    a.save_to(s);
    return s.str();
  };
  CHECK_THROWS_WITH(load_saved(same, damaged({})), Catch::Contains("damaged state in checkpoint (prototype_1)"));
  CHECK_THROWS_WITH(load_saved(same, damaged(at::zeros({4, 2}))),
                    Catch::Contains("damaged state in checkpoint (prototypes, sums and counts of different shapes)"));
  CHECK_THROWS_WITH(load_saved(same, damaged(at::zeros({3, 2}), at::tensor({0.0f, 0.5f}))),
                    Catch::Contains("damaged state in checkpoint (coefficients other than 0 and alpha 1)"));
  CHECK(all_equal(same.prototypes(), policy.prototypes()));  // nothing changed
  load_saved(same, damaged(at::zeros({3, 2})));
  CHECK(same.prototypes()[1].equal(at::zeros({3, 2})));
}
