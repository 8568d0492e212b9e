#include <catch2/catch.hpp>

#include <sstream>

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
  auto W = m.squeeze->weight.accessor<double, 2>();
  auto bw = m.squeeze->bias.accessor<double, 1>();
  auto WA = m.excite0->weight.accessor<double, 2>();
  auto bA = m.excite0->bias.accessor<double, 1>();
  auto WB = m.excite1->weight.accessor<double, 2>();
  auto bB = m.excite1->bias.accessor<double, 1>();
  const int64_t hidden = m.squeeze->weight.size(0);
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

}  // namespace

TEST_CASE("MMTM output matches a hand computation", "[mmtm]") {
  torch::manual_seed(0);
  for (double scale : {2.0, 1.0}) {
    MMTM mmtm(MMTMOptions(3, 2).ratio(2).gate_scale(scale));
    mmtm->to(at::kDouble);
    fill_deterministic(*mmtm);
    CHECK(mmtm->squeeze->weight.size(0) == 5);  // 2 * (3 + 2) / 2
    auto gen = at::detail::createCPUGenerator(1);
    auto a = at::randn({4, 3, 5, 5}, gen).to(at::kDouble);
    auto b = at::randn({4, 2, 7}, gen).to(at::kDouble);  // other spatial shape is fine
    auto [oa, ob] = mmtm->forward(a, b);
    auto [ha, hb] = hand_mmtm(*mmtm, a, b, scale);
    CHECK(torch::allclose(oa, ha, 1e-12, 1e-12));
    CHECK(torch::allclose(ob, hb, 1e-12, 1e-12));
  }
}

TEST_CASE("MMTM rejects wrong channels and batch sizes with the values", "[mmtm][bad-input]") {
  torch::manual_seed(1);
  MMTM mmtm(4, 6);
  CHECK_THROWS_WITH(mmtm->forward(at::randn({2, 5, 3, 3}), at::randn({2, 6, 3, 3})),
                    Catch::Contains("branch 0 has 5 channels") && Catch::Contains("dim0=4"));
  CHECK_THROWS_WITH(mmtm->forward(at::randn({2, 4, 3, 3}), at::randn({2, 7, 3, 3})),
                    Catch::Contains("branch 1 has 7 channels") && Catch::Contains("dim1=6"));
  CHECK_THROWS_WITH(mmtm->forward(at::randn({2, 4, 3, 3}), at::randn({3, 6, 3, 3})),
                    Catch::Contains("batch sizes differ") && Catch::Contains("3"));
  CHECK_THROWS_WITH(MMTM(MMTMOptions(1, 1).ratio(8)), Catch::Contains("lower the ratio"));
  CHECK_THROWS_WITH(mmtm->channels(2), Catch::Contains("side must be 0 or 1"));
}

TEST_CASE("MMTM side parameters share the joint layer", "[mmtm]") {
  torch::manual_seed(2);
  MMTM mmtm(4, 6);
  auto p0 = mmtm->side_parameters(0), p1 = mmtm->side_parameters(1);
  REQUIRE(p0.size() == 4);
  REQUIRE(p1.size() == 4);
  CHECK(p0[0].is_same(mmtm->squeeze->weight));
  CHECK(p1[0].is_same(mmtm->squeeze->weight));
  CHECK(p0[2].is_same(mmtm->excite0->weight));
  CHECK(p1[2].is_same(mmtm->excite1->weight));
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
    auto [oa, ob] = mmtm->forward(a, b);
    return std::pair{(oa / a).mean({2, 3}), (ob / b).mean({2, 3})};
  };
  auto [g1a, g1b] = gates(a1, b1);
  auto [g2a, g2b] = gates(a2, b2);
  CHECK(torch::equal(mmtm->gate_mean->staged(), torch::zeros({6}, at::kDouble)));

  FusionContext regular;
  regular.stage_gates = true;
  mmtm->forward(a1, b1, regular);
  mmtm->forward(a2, b2, regular);
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
  held.side0 = SideMode::held_gate;
  mmtm->forward(a1, b1, held);
  mmtm->forward(a1, b1);
  CHECK(torch::equal(mmtm->gate_mean->staged(), torch::zeros({6}, at::kDouble)));
  held.stage_gates = true;
  CHECK_THROWS_WITH(mmtm->forward(a1, b1, held), Catch::Contains("only staged in regular steps"));
}

TEST_CASE("MMTM held gate applies the running average to one side only", "[mmtm]") {
  torch::manual_seed(4);
  MMTM mmtm(8, 6);
  auto gen = at::detail::createCPUGenerator(4);
  auto a = at::randn({5, 8, 4, 4}, gen), b = at::randn({5, 6, 4, 4}, gen);
  FusionContext regular;
  regular.stage_gates = true;
  mmtm->forward(a, b, regular);
  mmtm->gate_mean->commit();

  FusionContext held0;
  held0.side0 = SideMode::held_gate;
  auto [oa, ob] = mmtm->forward(a, b, held0);
  CHECK(torch::allclose(oa, a * mmtm->gate_average(0).to(at::kFloat).view({1, 8, 1, 1})));
  auto [la, lb] = mmtm->forward(a, b);
  CHECK(torch::allclose(ob, lb));
  CHECK_FALSE(torch::allclose(oa, la));

  // Branch 0's output no longer depends on m1: perturbing b changes nothing on side 0.
  auto [oa2, ob2] = mmtm->forward(a, b + 1.0, held0);
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
  mmtm->forward(a.narrow(0, 0, 1), b.narrow(0, 0, 1), record);
  mmtm->forward(a.narrow(0, 1, 3), b.narrow(0, 1, 3), record);
  mmtm->squeeze_mean->commit();
  CHECK(mmtm->squeeze_mean->samples.item<double>() == 4.0);
  CHECK(torch::allclose(mmtm->squeeze_average(0).to(at::kFloat), a.mean({0, 2, 3}), 1e-5, 1e-6));
  CHECK(torch::allclose(mmtm->squeeze_average(1).to(at::kFloat), b.mean({0, 2, 3}), 1e-5, 1e-6));

  FusionContext cut;
  cut.side0 = cut.side1 = SideMode::averaged_squeeze;
  auto [ca, cb] = mmtm->forward(a, b, cut);
  auto [ca2, cb2] = mmtm->forward(a, b * 3.0, cut);
  CHECK(torch::equal(ca, ca2));  // side 0 ignores m1
  auto [ca3, cb3] = mmtm->forward(a * 3.0, b, cut);
  CHECK(torch::equal(cb, cb3));  // side 1 ignores m0

  // live_rows: the leading rows run live.
  cut.live_rows = 2;
  auto [ma, mb] = mmtm->forward(a, b, cut);
  auto [la, lb] = mmtm->forward(a, b);
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
  cut.side0 = cut.side1 = SideMode::averaged_squeeze;
  auto [oa, ob] = mmtm->forward(a, b, cut);
  auto [ha, hb] = hand_mmtm(*mmtm, a, b, 2.0, /*cut=*/true, avg_a, avg_b);
  CHECK(torch::allclose(oa, ha, 1e-12, 1e-12));
  CHECK(torch::allclose(ob, hb, 1e-12, 1e-12));
  // And they differ from the live gates.
  auto [la, lb] = mmtm->forward(a, b);
  CHECK_FALSE(torch::allclose(oa, la, 1e-6, 1e-6));
}

TEST_CASE("MMTM running means survive save/load, clone and dtype moves", "[mmtm]") {
  torch::manual_seed(6);
  MMTM mmtm(3, 2);
  FusionContext regular;
  regular.stage_gates = true;
  mmtm->forward(at::randn({4, 3, 2, 2}), at::randn({4, 2, 2, 2}), regular);
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
  CHECK(mmtm->squeeze->weight.scalar_type() == at::kBFloat16);
  CHECK(mmtm->gate_mean->mean.scalar_type() == at::kDouble);
  for (int i = 0; i < 3; ++i) {
    mmtm->forward(at::randn({300, 3, 2, 2}).to(at::kBFloat16),
                  at::randn({300, 2, 2, 2}).to(at::kBFloat16), regular);
    mmtm->gate_mean->commit();
  }
  CHECK(mmtm->gate_mean->samples.item<double>() == 904.0);  // 256 + 1 == 256 in bfloat16
  FusionContext held;
  held.side1 = SideMode::held_gate;
  auto [oa, ob] = mmtm->forward(at::randn({2, 3, 2, 2}).to(at::kBFloat16),
                                at::randn({2, 2, 2, 2}).to(at::kBFloat16), held);
  CHECK(ob.scalar_type() == at::kBFloat16);

  // Half: the running means take half rows and stay double (a CPU half Linear may not
  // exist, so the rows are staged directly).
  mmtm->to(at::kHalf);
  mmtm->gate_mean->stage(torch::ones({5, 5}, at::kHalf));
  mmtm->gate_mean->commit();
  CHECK(mmtm->gate_mean->samples.item<double>() == 909.0);
}
