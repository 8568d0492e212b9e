#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <vector>

#include "reference/two_branch.h"
#include "support.h"

using namespace mmbalance;

namespace {

// Sets every parameter of the module to a fixed, distinct value.
void fill_deterministic(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  double v = 0.05;
  for (auto& p : m.parameters()) {
    auto flat = p.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      flat[i] = std::sin(v) * 0.7;
      v += 0.37;
    }
  }
}

// MMTM written out element by element from algorithm.md §2 (double precision). With
// `cut`, each side's gate reads the other side's squeeze from `avg_a` / `avg_b` instead
// (the probe's f0', f1', algorithm.md §7).
std::pair<at::Tensor, at::Tensor> hand_mmtm(MMTMImpl& m, const at::Tensor& a, const at::Tensor& b,
                                            double scale, bool cut = false,
                                            const std::vector<double>& avg_a = {},
                                            const std::vector<double>& avg_b = {}) {
  const int64_t n = a.size(0), ca = a.size(1), cb = b.size(1);
  auto W = m.joint->weight.accessor<double, 2>();
  auto bw = m.joint->bias.accessor<double, 1>();
  auto WA = m.excite[0]->weight.accessor<double, 2>();
  auto bA = m.excite[0]->bias.accessor<double, 1>();
  auto WB = m.excite[1]->weight.accessor<double, 2>();
  auto bB = m.excite[1]->bias.accessor<double, 1>();
  const int64_t hidden = m.joint->weight.size(0);
  auto joint = [&](const std::vector<double>& sa, const std::vector<double>& sb) {
    std::vector<double> sq = sa;
    sq.insert(sq.end(), sb.begin(), sb.end());
    std::vector<double> z(hidden);
    for (int64_t h = 0; h < hidden; ++h) {
      double acc = bw[h];
      for (size_t j = 0; j < sq.size(); ++j) acc += W[h][j] * sq[j];
      z[h] = std::max(acc, 0.0);
    }
    return z;
  };
  at::Tensor outA = a.clone(), outB = b.clone();
  for (int64_t s = 0; s < n; ++s) {
    std::vector<double> sa, sb;
    for (int64_t c = 0; c < ca; ++c) sa.push_back(a[s][c].mean().item<double>());
    for (int64_t c = 0; c < cb; ++c) sb.push_back(b[s][c].mean().item<double>());
    const std::vector<double> zA = cut ? joint(sa, avg_b) : joint(sa, sb);
    const std::vector<double> zB = cut ? joint(avg_a, sb) : joint(sa, sb);
    for (int64_t c = 0; c < ca; ++c) {
      double e = bA[c];
      for (int64_t h = 0; h < hidden; ++h) e += WA[c][h] * zA[h];
      outA[s][c] = a[s][c] * (scale / (1.0 + std::exp(-e)));
    }
    for (int64_t c = 0; c < cb; ++c) {
      double e = bB[c];
      for (int64_t h = 0; h < hidden; ++h) e += WB[c][h] * zB[h];
      outB[s][c] = b[s][c] * (scale / (1.0 + std::exp(-e)));
    }
  }
  return {outA, outB};
}

// A two-branch MMTM's outputs as a pair.
std::pair<at::Tensor, at::Tensor> fwd2(MMTM& m, const at::Tensor& a, const at::Tensor& b,
                                       const FusionContext& ctx = {}) {
  const std::vector<at::Tensor> out = m->forward({a, b}, ctx);
  return {out[0], out[1]};
}

}  // namespace

TEST_CASE("MMTM output matches a hand computation", "[mmtm]") {
  torch::manual_seed(0);
  for (double scale : {2.0, 1.0}) {
    MMTM mmtm(MMTMOptions(3, 2).ratio(2).gate_scale(scale));
    mmtm->to(at::kDouble);
    fill_deterministic(*mmtm);
    CHECK(mmtm->joint->weight.size(0) == 5);  // 2 * (3 + 2) / 2
    auto gen = at::detail::createCPUGenerator(1);
    auto a = at::randn({4, 3, 5, 5}, gen).to(at::kDouble);
    auto b = at::randn({4, 2, 7}, gen).to(at::kDouble);  // other spatial shape is fine
    auto [oa, ob] = fwd2(mmtm, a, b);
    auto [ha, hb] = hand_mmtm(*mmtm, a, b, scale);
    CHECK(torch::allclose(oa, ha, 1e-12, 1e-12));
    CHECK(torch::allclose(ob, hb, 1e-12, 1e-12));
  }
}

TEST_CASE("MMTM rejects wrong channels and batch sizes with the values", "[mmtm][bad-input]") {
  torch::manual_seed(1);
  MMTM mmtm(4, 6);
  CHECK_THROWS_WITH(fwd2(mmtm, at::randn({2, 5, 3, 3}), at::randn({2, 6, 3, 3})),
                    Catch::Contains("branch 0 has 5 channels") && Catch::Contains("dims[0]=4"));
  CHECK_THROWS_WITH(fwd2(mmtm, at::randn({2, 4, 3, 3}), at::randn({2, 7, 3, 3})),
                    Catch::Contains("branch 1 has 7 channels") && Catch::Contains("dims[1]=6"));
  CHECK_THROWS_WITH(fwd2(mmtm, at::randn({2, 4, 3, 3}), at::randn({3, 6, 3, 3})),
                    Catch::Contains("batch sizes differ") && Catch::Contains("3"));
  CHECK_THROWS_WITH(MMTM(MMTMOptions(1, 1).ratio(8)), Catch::Contains("lower the ratio"));
  CHECK_THROWS_WITH(mmtm->channels(2), Catch::Contains("side 2 is out of range"));
}

TEST_CASE("MMTM side parameters share the joint layer", "[mmtm]") {
  torch::manual_seed(2);
  MMTM mmtm(4, 6);
  auto p0 = mmtm->side_parameters(0), p1 = mmtm->side_parameters(1);
  REQUIRE(p0.size() == 4);
  REQUIRE(p1.size() == 4);
  CHECK(p0[0].is_same(mmtm->joint->weight));
  CHECK(p1[0].is_same(mmtm->joint->weight));
  CHECK(p0[2].is_same(mmtm->excite[0]->weight));
  CHECK(p1[2].is_same(mmtm->excite[1]->weight));
}

TEST_CASE("MMTM gate means: staged by regular steps only, counted once committed",
          "[mmtm]") {
  torch::manual_seed(3);
  MMTM mmtm(3, 2);
  auto gen = at::detail::createCPUGenerator(3);
  auto a1 = at::randn({2, 3, 4, 4}, gen), b1 = at::randn({2, 2, 4, 4}, gen);
  auto a2 = at::randn({6, 3, 4, 4}, gen), b2 = at::randn({6, 2, 4, 4}, gen);

  // Before any commit: the gate of a zero excitation, gate_scale / 2 = 1.
  CHECK(torch::allclose(mmtm->gate_average(0), torch::ones({3}, at::kDouble)));
  CHECK(torch::allclose(mmtm->gate_average(1), torch::ones({2}, at::kDouble)));

  // The gates themselves, as the forward pass applies them.
  auto gates = [&](const at::Tensor& a, const at::Tensor& b) {
    torch::NoGradGuard ng;
    auto [oa, ob] = fwd2(mmtm, a, b);
    return std::pair{(oa / a).mean({2, 3}), (ob / b).mean({2, 3})};
  };
  auto [g1a, g1b] = gates(a1, b1);
  auto [g2a, g2b] = gates(a2, b2);
  CHECK(torch::equal(mmtm->gate_mean->staged(), torch::zeros({6}, at::kDouble)));

  FusionContext regular;
  regular.stage_gates = true;
  fwd2(mmtm, a1, b1, regular);
  fwd2(mmtm, a2, b2, regular);
  CHECK(mmtm->gate_mean->staged()[5].item<double>() == 8.0);
  CHECK(torch::allclose(mmtm->gate_average(0), torch::ones({3}, at::kDouble)));  // not yet
  mmtm->gate_mean->commit();
  auto expect0 = at::cat({g1a, g2a}).mean(0);  // mean over 8 samples, not of 2 batch means
  auto expect1 = at::cat({g1b, g2b}).mean(0);
  CHECK(torch::allclose(mmtm->gate_average(0).to(at::kFloat), expect0, 1e-5, 1e-6));
  CHECK(torch::allclose(mmtm->gate_average(1).to(at::kFloat), expect1, 1e-5, 1e-6));
  CHECK(mmtm->gate_mean->samples.item<double>() == 8.0);

  // Re-balancing and live steps without the flag stage nothing.
  FusionContext held;
  held.sides = {SideMode::held_gate, SideMode::live};
  fwd2(mmtm, a1, b1, held);
  fwd2(mmtm, a1, b1);
  CHECK(torch::equal(mmtm->gate_mean->staged(), torch::zeros({6}, at::kDouble)));
  held.stage_gates = true;
  CHECK_THROWS_WITH(fwd2(mmtm, a1, b1, held), Catch::Contains("only staged in regular steps"));
}

TEST_CASE("MMTM held gate applies the running average to one side only", "[mmtm]") {
  torch::manual_seed(4);
  MMTM mmtm(8, 6);
  auto gen = at::detail::createCPUGenerator(4);
  auto a = at::randn({5, 8, 4, 4}, gen), b = at::randn({5, 6, 4, 4}, gen);
  FusionContext regular;
  regular.stage_gates = true;
  fwd2(mmtm, a, b, regular);
  mmtm->gate_mean->commit();

  FusionContext held0;
  held0.sides = {SideMode::held_gate, SideMode::live};
  auto [oa, ob] = fwd2(mmtm, a, b, held0);
  CHECK(torch::allclose(oa, a * mmtm->gate_average(0).to(at::kFloat).view({1, 8, 1, 1})));
  auto [la, lb] = fwd2(mmtm, a, b);
  CHECK(torch::allclose(ob, lb));
  CHECK_FALSE(torch::allclose(oa, la));

  // Branch 0's output no longer depends on m1: perturbing b changes nothing on side 0.
  auto [oa2, ob2] = fwd2(mmtm, a, b + 1.0, held0);
  CHECK(torch::equal(oa, oa2));
}

TEST_CASE("MMTM averaged squeeze cuts the other modality out of a side's gate", "[mmtm]") {
  torch::manual_seed(5);
  MMTM mmtm(3, 2);
  auto gen = at::detail::createCPUGenerator(5);
  auto a = at::randn({4, 3, 4, 4}, gen), b = at::randn({4, 2, 4, 4}, gen);
  mmtm->eval();
  FusionContext record;
  record.record_squeeze = true;
  fwd2(mmtm, a.narrow(0, 0, 1), b.narrow(0, 0, 1), record);
  fwd2(mmtm, a.narrow(0, 1, 3), b.narrow(0, 1, 3), record);
  mmtm->squeeze_mean->commit();
  CHECK(mmtm->squeeze_mean->samples.item<double>() == 4.0);
  CHECK(torch::allclose(mmtm->squeeze_average(0).to(at::kFloat), a.mean({0, 2, 3}), 1e-5, 1e-6));
  CHECK(torch::allclose(mmtm->squeeze_average(1).to(at::kFloat), b.mean({0, 2, 3}), 1e-5, 1e-6));

  FusionContext cut;
  cut.sides = {SideMode::averaged_squeeze, SideMode::averaged_squeeze};
  auto [ca, cb] = fwd2(mmtm, a, b, cut);
  auto [ca2, cb2] = fwd2(mmtm, a, b * 3.0, cut);
  CHECK(torch::equal(ca, ca2));  // side 0 ignores m1
  auto [ca3, cb3] = fwd2(mmtm, a * 3.0, b, cut);
  CHECK(torch::equal(cb, cb3));  // side 1 ignores m0

  // live_rows: the leading rows run live.
  cut.live_rows = 2;
  auto [ma, mb] = fwd2(mmtm, a, b, cut);
  auto [la, lb] = fwd2(mmtm, a, b);
  CHECK(torch::allclose(ma.narrow(0, 0, 2), la.narrow(0, 0, 2)));
  CHECK(torch::allclose(ma.narrow(0, 2, 2), ca.narrow(0, 2, 2)));
  CHECK(torch::allclose(mb.narrow(0, 2, 2), cb.narrow(0, 2, 2)));

  mmtm->squeeze_mean->clear();
  CHECK(mmtm->squeeze_mean->samples.item<double>() == 0.0);
}

TEST_CASE("MMTM cut gates (f0', f1') match a hand computation from the weights", "[mmtm]") {
  torch::manual_seed(8);
  MMTM mmtm(MMTMOptions(3, 2).ratio(2));
  mmtm->to(at::kDouble);
  fill_deterministic(*mmtm);
  auto gen = at::detail::createCPUGenerator(8);
  auto a = at::randn({3, 3, 4, 4}, gen).to(at::kDouble);
  auto b = at::randn({3, 2, 5}, gen).to(at::kDouble);
  // Averages written by hand, not recorded: the cut gate must read exactly these.
  const std::vector<double> avg_a{0.3, -0.2, 0.5}, avg_b{-0.4, 0.25};
  {
    torch::NoGradGuard ng;
    mmtm->squeeze_mean->mean.copy_(torch::tensor({0.3, -0.2, 0.5, -0.4, 0.25}, at::kDouble));
    mmtm->squeeze_mean->samples.fill_(10.0);
  }
  FusionContext cut;
  cut.sides = {SideMode::averaged_squeeze, SideMode::averaged_squeeze};
  auto [oa, ob] = fwd2(mmtm, a, b, cut);
  auto [ha, hb] = hand_mmtm(*mmtm, a, b, 2.0, /*cut=*/true, avg_a, avg_b);
  CHECK(torch::allclose(oa, ha, 1e-12, 1e-12));
  CHECK(torch::allclose(ob, hb, 1e-12, 1e-12));
  // And they differ from the live gates.
  auto [la, lb] = fwd2(mmtm, a, b);
  CHECK_FALSE(torch::allclose(oa, la, 1e-6, 1e-6));
}

TEST_CASE("MMTM running means survive save/load, clone and dtype moves", "[mmtm]") {
  torch::manual_seed(6);
  MMTM mmtm(3, 2);
  FusionContext regular;
  regular.stage_gates = true;
  fwd2(mmtm, at::randn({4, 3, 2, 2}), at::randn({4, 2, 2, 2}), regular);
  mmtm->gate_mean->commit();

  std::stringstream buffer;
  torch::save(mmtm, buffer);
  MMTM loaded(3, 2);
  torch::load(loaded, buffer);
  CHECK(torch::equal(loaded->gate_mean->mean, mmtm->gate_mean->mean));
  CHECK(loaded->gate_mean->samples.item<double>() == 4.0);

  auto copy = std::dynamic_pointer_cast<MMTMImpl>(mmtm->clone());
  CHECK(torch::equal(copy->gate_mean->mean, mmtm->gate_mean->mean));
  CHECK_FALSE(copy->gate_mean->mean.is_same(mmtm->gate_mean->mean));

  // A bfloat16 model: weights follow, the running means stay exact doubles.
  mmtm->to(at::kBFloat16);
  CHECK(mmtm->joint->weight.scalar_type() == at::kBFloat16);
  CHECK(mmtm->gate_mean->mean.scalar_type() == at::kDouble);
  for (int i = 0; i < 3; ++i) {
    fwd2(mmtm, at::randn({300, 3, 2, 2}).to(at::kBFloat16),
                  at::randn({300, 2, 2, 2}).to(at::kBFloat16), regular);
    mmtm->gate_mean->commit();
  }
  CHECK(mmtm->gate_mean->samples.item<double>() == 904.0);  // 256 + 1 == 256 in bfloat16
  FusionContext held;
  held.sides = {SideMode::live, SideMode::held_gate};
  auto [oa, ob] = fwd2(mmtm, at::randn({2, 3, 2, 2}).to(at::kBFloat16),
                                at::randn({2, 2, 2, 2}).to(at::kBFloat16), held);
  CHECK(ob.scalar_type() == at::kBFloat16);

  // Half: the running means take half rows and stay double (a CPU half Linear may not
  // exist, so the rows are staged directly).
  mmtm->to(at::kHalf);
  mmtm->gate_mean->stage(torch::ones({5, 5}, at::kHalf));
  mmtm->gate_mean->commit();
  CHECK(mmtm->gate_mean->samples.item<double>() == 909.0);
}

using mmbalance::testing::as_doubles;

namespace {

// Every parameter of the module set to a fixed, distinct value.
void fill_n_way_deterministic(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  double v = 0.11;
  for (auto& p : m.parameters()) {
    auto flat = p.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      flat[i] = std::cos(v) * 0.6;
      v += 0.29;
    }
  }
}

using Rows = std::vector<std::vector<double>>;  // [sample][channel]

// The squeeze vectors of a (batch, channels, ...) double tensor, sample by sample.
Rows squeeze_rows(const at::Tensor& x) {
  Rows out(static_cast<size_t>(x.size(0)));
  for (int64_t s = 0; s < x.size(0); ++s) {
    for (int64_t c = 0; c < x.size(1); ++c) out[s].push_back(x[s][c].mean().item<double>());
  }
  return out;
}

// N-way MMTM for one sample written out from Joze et al. (algorithm.md §2): the gate of
// side k from the squeeze vectors `sq` (one per side, already cut as the mode asks).
std::vector<double> hand_gate(MMTMImpl& m, const std::vector<std::vector<double>>& sq,
                              size_t k, double scale) {
  std::vector<double> joint;
  for (const auto& v : sq) joint.insert(joint.end(), v.begin(), v.end());
  auto W = m.joint->weight.accessor<double, 2>();
  auto bw = m.joint->bias.accessor<double, 1>();
  const int64_t hidden = m.joint->weight.size(0);
  std::vector<double> z(static_cast<size_t>(hidden));
  for (int64_t h = 0; h < hidden; ++h) {
    double acc = bw[h];
    for (size_t j = 0; j < joint.size(); ++j) acc += W[h][j] * joint[j];
    z[h] = std::max(acc, 0.0);
  }
  auto We = m.excite[k]->weight.accessor<double, 2>();
  auto be = m.excite[k]->bias.accessor<double, 1>();
  std::vector<double> gate;
  for (int64_t c = 0; c < m.excite[k]->weight.size(0); ++c) {
    double e = be[c];
    for (int64_t h = 0; h < hidden; ++h) e += We[c][h] * z[h];
    gate.push_back(scale / (1.0 + std::exp(-e)));
  }
  return gate;
}

// x scaled channel-wise by per-sample gates.
at::Tensor apply_gates(const at::Tensor& x, const Rows& gates) {
  at::Tensor out = x.clone();
  for (int64_t s = 0; s < x.size(0); ++s) {
    for (int64_t c = 0; c < x.size(1); ++c) out[s][c] = x[s][c] * gates[s][c];
  }
  return out;
}

// Three inputs of different channel counts and spatial shapes, double precision.
std::vector<at::Tensor> three_mixed_inputs(int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::randn({n, 3, 4, 4}, gen).to(at::kDouble), at::randn({n, 2, 5}, gen).to(at::kDouble),
          at::randn({n, 4, 2, 3}, gen).to(at::kDouble)};
}

MMTM three_way(double scale) {
  MMTM m(MMTMOptions({3, 2, 4}).ratio(3).gate_scale(scale));
  m->to(at::kDouble);
  fill_n_way_deterministic(*m);
  return m;
}

}  // namespace

TEST_CASE("MMTM with three inputs matches a hand computation, live", "[n-way-mmtm]") {
  for (double scale : {2.0, 1.0}) {
    MMTM m = three_way(scale);
    CHECK(m->joint->weight.size(0) == 6);  // 2 * (3 + 2 + 4) / 3
    CHECK(m->joint->weight.size(1) == 9);
    const auto x = three_mixed_inputs(3, 7);
    const auto out = m->forward(x);
    REQUIRE(out.size() == 3);
    const Rows s0 = squeeze_rows(x[0]), s1 = squeeze_rows(x[1]), s2 = squeeze_rows(x[2]);
    for (size_t k = 0; k < 3; ++k) {
      Rows gates;
      for (size_t s = 0; s < 3; ++s) gates.push_back(hand_gate(*m, {s0[s], s1[s], s2[s]}, k, scale));
      CHECK(torch::allclose(out[k], apply_gates(x[k], gates), 1e-12, 1e-12));
    }
  }
}

TEST_CASE("MMTM: averaged squeeze replaces every other side, held gate uses the mean",
          "[n-way-mmtm]") {
  MMTM m = three_way(2.0);
  const auto x = three_mixed_inputs(4, 8);
  const Rows s0 = squeeze_rows(x[0]), s1 = squeeze_rows(x[1]), s2 = squeeze_rows(x[2]);

  // Squeeze averages over two recorded batches: the mean over their 4 + 2 samples.
  const auto extra = three_mixed_inputs(2, 9);
  FusionContext record;
  record.record_squeeze = true;
  m->forward(x, record);
  m->forward(extra, record);
  m->squeeze_mean->commit();
  std::vector<std::vector<double>> avg(3);
  for (size_t k = 0; k < 3; ++k) {
    const Rows all_rows = squeeze_rows(at::cat({x[k], extra[k]}));
    for (size_t c = 0; c < all_rows[0].size(); ++c) {
      double sum = 0;
      for (const auto& row : all_rows) sum += row[c];
      avg[k].push_back(sum / 6.0);
    }
    CHECK_THAT(as_doubles(m->squeeze_average(k)), Catch::Approx(avg[k]).epsilon(1e-12));
  }

  // Side 1 cut: its gate reads its own squeeze and the averages of sides 0 and 2; the
  // others stay live.
  FusionContext cut1;
  cut1.sides = {SideMode::live, SideMode::averaged_squeeze, SideMode::live};
  const auto out = m->forward(x, cut1);
  Rows g0, g1, g2;
  for (size_t s = 0; s < 4; ++s) {
    g0.push_back(hand_gate(*m, {s0[s], s1[s], s2[s]}, 0, 2.0));
    g1.push_back(hand_gate(*m, {avg[0], s1[s], avg[2]}, 1, 2.0));
    g2.push_back(hand_gate(*m, {s0[s], s1[s], s2[s]}, 2, 2.0));
  }
  CHECK(torch::allclose(out[0], apply_gates(x[0], g0), 1e-12, 1e-12));
  CHECK(torch::allclose(out[1], apply_gates(x[1], g1), 1e-12, 1e-12));
  CHECK(torch::allclose(out[2], apply_gates(x[2], g2), 1e-12, 1e-12));

  // Gates staged by a regular pass and committed; then side 2 held: its gate is the mean
  // of the staged gates, the others live.
  FusionContext regular;
  regular.stage_gates = true;
  m->forward(x, regular);
  m->gate_mean->commit();
  std::vector<double> mean2(4, 0.0);
  for (const auto& row : g2) {
    for (size_t c = 0; c < 4; ++c) mean2[c] += row[c] / 4.0;
  }
  CHECK_THAT(as_doubles(m->gate_average(2)), Catch::Approx(mean2).epsilon(1e-12));
  FusionContext held2;
  held2.sides = {SideMode::live, SideMode::live, SideMode::held_gate};
  const auto held = m->forward(x, held2);
  CHECK(torch::allclose(held[0], apply_gates(x[0], g0), 1e-12, 1e-12));
  CHECK(torch::allclose(held[2], apply_gates(x[2], Rows(4, mean2)), 1e-12, 1e-12));
  // Branch 2 no longer hears the others: perturbing them leaves its output alone.
  const auto moved = m->forward({x[0] + 1.0, x[1] - 2.0, x[2]}, held2);
  CHECK(torch::equal(moved[2], held[2]));
}

TEST_CASE("MMTM absent side: the others read its training-set average, it has no output",
          "[n-way-mmtm]") {
  MMTM m = three_way(2.0);
  const auto x = three_mixed_inputs(4, 12);
  const auto recorded = three_mixed_inputs(5, 13);
  FusionContext record;
  record.record_squeeze = true;
  m->forward(recorded, record);
  m->squeeze_mean->commit();
  std::vector<double> avg1;
  const Rows r1 = squeeze_rows(recorded[1]);
  for (size_t c = 0; c < r1[0].size(); ++c) {
    double sum = 0;
    for (const auto& row : r1) sum += row[c];
    avg1.push_back(sum / 5.0);
  }
  FusionContext missing1;
  missing1.sides = {SideMode::live, SideMode::absent, SideMode::live};
  const auto out = m->forward({x[0], at::Tensor(), x[2]}, missing1);
  CHECK_FALSE(out[1].defined());
  const Rows s0 = squeeze_rows(x[0]), s2 = squeeze_rows(x[2]);
  Rows g0, g2;
  for (size_t s = 0; s < 4; ++s) {
    g0.push_back(hand_gate(*m, {s0[s], avg1, s2[s]}, 0, 2.0));
    g2.push_back(hand_gate(*m, {s0[s], avg1, s2[s]}, 2, 2.0));
  }
  CHECK(torch::allclose(out[0], apply_gates(x[0], g0), 1e-12, 1e-12));
  CHECK(torch::allclose(out[2], apply_gates(x[2], g2), 1e-12, 1e-12));
  // Whatever is passed for the absent side is ignored.
  const auto ignored = m->forward({x[0], x[1] * 100.0, x[2]}, missing1);
  CHECK(torch::equal(ignored[0], out[0]));
  CHECK(torch::equal(ignored[2], out[2]));

  FusionContext none;
  none.sides.assign(3, SideMode::absent);
  CHECK_THROWS_WITH(m->forward(x, none), Catch::Contains("every side is absent"));
  FusionContext absent_recording = missing1;
  absent_recording.record_squeeze = true;
  CHECK_THROWS_WITH(m->forward(x, absent_recording), Catch::Contains("absent side neither records"));
  FusionContext absent_staging = missing1;
  absent_staging.stage_gates = true;
  CHECK_THROWS_WITH(m->forward(x, absent_staging), Catch::Contains("side 1 is not"));
}

TEST_CASE("MMTM live_rows: the leading rows run live, the rest as the modes say",
          "[n-way-mmtm]") {
  MMTM m = three_way(2.0);
  const auto x = three_mixed_inputs(3, 10);
  FusionContext record;
  record.record_squeeze = true;
  m->forward(x, record);
  m->squeeze_mean->commit();
  FusionContext cut;
  cut.sides.assign(3, SideMode::averaged_squeeze);
  std::vector<at::Tensor> stacked;
  for (const auto& t : x) stacked.push_back(at::cat({t, t}));
  FusionContext stacked_cut = cut;
  stacked_cut.live_rows = 3;
  const auto both = m->forward(stacked, stacked_cut);
  const auto live = m->forward(x);
  const auto cut_only = m->forward(x, cut);
  for (size_t k = 0; k < 3; ++k) {
    CHECK(torch::allclose(both[k].narrow(0, 0, 3), live[k], 1e-12, 1e-12));
    CHECK(torch::allclose(both[k].narrow(0, 3, 3), cut_only[k], 1e-12, 1e-12));
    CHECK_FALSE(torch::allclose(live[k], cut_only[k]));
  }
}

TEST_CASE("MMTM with two inputs is the two-branch MMTM of before, bit for bit",
          "[n-way-mmtm]") {
  using testing::reference::TwoBranchContext;
  torch::manual_seed(21);
  testing::reference::TwoBranchMMTM two(5, 3, /*ratio=*/2);
  MMTM n_way(MMTMOptions(5, 3).ratio(2));
  // Same entries, shapes and order, the joint layer now registered as "joint" where the
  // two-branch module said "squeeze": its saved state loads.
  const auto pa = two->named_parameters(), pb = n_way->named_parameters();
  std::vector<std::string> renamed;
  for (const auto& key : pa.keys()) renamed.push_back(key.rfind("squeeze.", 0) == 0 ? "joint." + key.substr(8) : key);
  REQUIRE(renamed == pb.keys());
  REQUIRE(two->named_buffers().keys() == n_way->named_buffers().keys());
  testing::copy_state(two, n_way);
  CHECK(testing::same_values_in_order(*two, *n_way));

  auto gen = at::detail::createCPUGenerator(22);
  const at::Tensor a = at::randn({6, 5, 3, 3}, gen), b = at::randn({6, 3, 4, 4}, gen);
  auto same = [&](const TwoBranchContext& pair_ctx, const FusionContext& n_ctx,
                  const at::Tensor& xa, const at::Tensor& xb) {
    auto [oa, ob] = two->forward(xa, xb, pair_ctx);
    const auto out = n_way->forward({xa, xb}, n_ctx);
    return torch::equal(oa, out[0]) && torch::equal(ob, out[1]);
  };
  TwoBranchContext regular;
  regular.stage_gates = true;
  FusionContext n_regular;
  n_regular.stage_gates = true;
  CHECK(same(regular, n_regular, a, b));
  two->gate_mean->commit();
  n_way->gate_mean->commit();
  TwoBranchContext record;
  record.record_squeeze = true;
  FusionContext n_record;
  n_record.record_squeeze = true;
  CHECK(same(record, n_record, a, b));
  two->squeeze_mean->commit();
  n_way->squeeze_mean->commit();
  CHECK(testing::same_values_in_order(*two, *n_way));  // the running means too

  const std::vector<std::pair<SideMode, SideMode>> modes = {
      {SideMode::live, SideMode::live},
      {SideMode::held_gate, SideMode::live},
      {SideMode::live, SideMode::held_gate},
      {SideMode::averaged_squeeze, SideMode::averaged_squeeze},
      {SideMode::averaged_squeeze, SideMode::live},
      {SideMode::live, SideMode::averaged_squeeze},
      {SideMode::held_gate, SideMode::held_gate},
      {SideMode::held_gate, SideMode::averaged_squeeze},
      {SideMode::averaged_squeeze, SideMode::held_gate}};
  for (const auto& [m0, m1] : modes) {
    TwoBranchContext pair_ctx;
    pair_ctx.side0 = m0;
    pair_ctx.side1 = m1;
    FusionContext n_ctx;
    n_ctx.sides = {m0, m1};
    CAPTURE(static_cast<int>(m0), static_cast<int>(m1));
    CHECK(same(pair_ctx, n_ctx, a, b));
    pair_ctx.live_rows = n_ctx.live_rows = 2;
    CHECK(same(pair_ctx, n_ctx, a, b));
  }
  CHECK(two->side_parameters(1).size() == n_way->side_parameters(1).size());
  for (size_t i = 0; i < n_way->side_parameters(1).size(); ++i) {
    CHECK(torch::equal(two->side_parameters(1)[i], n_way->side_parameters(1)[i]));
  }
}

TEST_CASE("MMTM side parameters: the joint layer and that side's excitation",
          "[n-way-mmtm]") {
  MMTM m(MMTMOptions({4, 6, 2, 3}));
  CHECK(m->num_inputs() == 4);
  for (size_t k = 0; k < 4; ++k) {
    const auto p = m->side_parameters(k);
    REQUIRE(p.size() == 4);
    CHECK(p[0].is_same(m->joint->weight));
    CHECK(p[1].is_same(m->joint->bias));
    CHECK(p[2].is_same(m->excite[k]->weight));
    CHECK(p[3].is_same(m->excite[k]->bias));
  }
  // Registered under MMTM's naming, one excitation per side.
  const auto names = m->named_parameters().keys();
  CHECK(std::count(names.begin(), names.end(), "excite3.weight") == 1);

  // A held side gets no gradient through its excitation; the others do.
  auto gen = at::detail::createCPUGenerator(30);
  std::vector<at::Tensor> x = {at::randn({3, 4, 2, 2}, gen), at::randn({3, 6, 2, 2}, gen),
                               at::randn({3, 2, 2, 2}, gen), at::randn({3, 3, 2, 2}, gen)};
  FusionContext held1;
  held1.sides = {SideMode::live, SideMode::held_gate, SideMode::live, SideMode::live};
  at::Tensor loss = at::zeros({});
  for (const auto& o : m->forward(x, held1)) loss = loss + o.square().sum();
  loss.backward();
  CHECK_FALSE(m->excite[1]->weight.grad().defined());
  CHECK(m->excite[0]->weight.grad().abs().sum().item<double>() > 0);
  CHECK(m->excite[3]->weight.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("MMTM clones deeply and keeps every side", "[n-way-mmtm]") {
  MMTM m = three_way(2.0);
  auto copy = std::dynamic_pointer_cast<MMTMImpl>(m->clone());
  REQUIRE(copy != nullptr);
  REQUIRE(copy->excite.size() == 3);
  CHECK(testing::same_state(*m, *copy));
  CHECK_FALSE(copy->excite[2]->weight.is_same(m->excite[2]->weight));
  const auto x = three_mixed_inputs(2, 11);
  const auto a = m->forward(x), b = copy->forward(x);
  for (size_t k = 0; k < 3; ++k) CHECK(torch::equal(a[k], b[k]));
}

TEST_CASE("MMTM rejects bad shapes, sides and options with the values",
          "[n-way-mmtm][bad-input]") {
  MMTM m(MMTMOptions({4, 6, 2}));
  auto gen = at::detail::createCPUGenerator(40);
  const at::Tensor a = at::randn({2, 4, 3, 3}, gen), b = at::randn({2, 6, 3, 3}, gen),
                   c = at::randn({2, 2, 3, 3}, gen);
  CHECK_THROWS_WITH(m->forward({a, b}), Catch::Contains("got 2 inputs") &&
                                            Catch::Contains("joins 3 branches"));
  CHECK_THROWS_WITH(m->forward({a, b, at::randn({2, 5, 3, 3})}),
                    Catch::Contains("branch 2 has 5 channels") && Catch::Contains("dims[2]=2"));
  CHECK_THROWS_WITH(m->forward({a, at::randn({3, 6, 3, 3}), c}),
                    Catch::Contains("batch sizes differ") && Catch::Contains("branch 1 has 3"));
  CHECK_THROWS_WITH(m->forward({a, b, at::randn({2})}), Catch::Contains("input 2 must be"));
  FusionContext two_sides;
  two_sides.sides = {SideMode::live, SideMode::live};
  CHECK_THROWS_WITH(m->forward({a, b, c}, two_sides),
                    Catch::Contains("2 side modes for 3 branches"));
  FusionContext staged_held;
  staged_held.sides = {SideMode::live, SideMode::live, SideMode::held_gate};
  staged_held.stage_gates = true;
  CHECK_THROWS_WITH(m->forward({a, b, c}, staged_held), Catch::Contains("side 2 is not"));
  FusionContext too_many_live;
  too_many_live.live_rows = 3;
  CHECK_THROWS_WITH(m->forward({a, b, c}, too_many_live), Catch::Contains("live_rows=3"));
  CHECK_THROWS_WITH(m->channels(3), Catch::Contains("side 3 is out of range") &&
                                        Catch::Contains("joins 3 branches"));
  CHECK_THROWS_WITH(MMTM(MMTMOptions({4})), Catch::Contains("at least 2 branches, got 1"));
  CHECK_THROWS_WITH(MMTM(MMTMOptions({4, 0, 2})), Catch::Contains("dims[1]=0"));
  CHECK_THROWS_WITH(MMTM(MMTMOptions({1, 1, 1}).ratio(8)),
                    Catch::Contains("lower the ratio"));
}
