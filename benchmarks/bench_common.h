#pragma once
// The models, data and reference implementations shared by the benchmarks.

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <mmbalance/mmbalance.h>

namespace mmbalance::bench {

/// The colored-MNIST network of the paper's setup: conv blocks of 32w, 64w, 128w, 128w
/// channels (w = width multiplier), strides 1, 2, 2, 2, BatchNorm, three MMTMs (ratio 4)
/// after blocks 2, 3, 4; ~633k parameters in 54 tensors at w = 1.
inline ConvMMTMNet colored_mnist_net(std::int64_t width = 1, std::uint64_t seed = 0) {
  torch::manual_seed(seed);
  const std::vector<std::int64_t> ch{32 * width, 64 * width, 128 * width, 128 * width};
  auto branch = [&](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, 10).channels(ch).strides({1, 2, 2, 2}));
  };
  return ConvMMTMNet(branch(3), branch(1),
                     {{1, MMTM(ch[1], ch[1])}, {2, MMTM(ch[2], ch[2])}, {3, MMTM(ch[3], ch[3])}});
}

template <std::size_t>
using ConvBranchFor = ConvBranch;

/// The colored-MNIST network with N branches: branch 0 takes the colour image, the others
/// a gray one, all of the shape above, with an MMTM of N sides (ratio 4) after blocks 2,
/// 3, 4. For N = 2 the parameters of `colored_mnist_net`.
template <std::size_t N>
auto colored_mnist_n_way_net(std::uint64_t seed = 0) {
  return [seed]<std::size_t... K>(std::index_sequence<K...>) {
    torch::manual_seed(seed);
    const std::vector<std::int64_t> ch{32, 64, 128, 128};
    auto branch = [&](std::int64_t in) {
      return ConvBranch(ConvBranchOptions(in, 10).channels(ch).strides({1, 2, 2, 2}));
    };
    using Net = MultiModalNet<ConvBranchFor<K>..., MMTM>;
    auto tap = [&](std::size_t stage) {
      return FusionTap<MMTM>{stage, MMTM(MMTMOptions(std::vector<std::int64_t>(N, ch[stage])))};
    };
    return Net(std::tuple{branch(K == 0 ? 3 : 1)...}, {tap(1), tap(2), tap(3)});
  }(std::make_index_sequence<N>{});
}

/// A random colored-MNIST-shaped batch.
inline MultiModalBatch batch(std::int64_t n, std::uint64_t seed = 0,
                             at::Device device = at::kCPU) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::rand({n, 3, 28, 28}, gen).to(device), at::rand({n, 1, 28, 28}, gen).to(device),
          at::randint(10, {n}, gen).to(device)};
}

/// `count` such batches of `size` rows, of seeds seed, seed + 1, ...: an evaluation set.
inline std::vector<MultiModalBatch> batches(std::int64_t count, std::int64_t size, std::uint64_t seed) {
  std::vector<MultiModalBatch> out;
  for (std::int64_t i = 0; i < count; ++i) out.push_back(batch(size, seed + static_cast<std::uint64_t>(i)));
  return out;
}

inline std::int64_t numel(const std::vector<at::Tensor>& ts) {
  std::int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

/// Parameter and gradient tensors shaped like two ResNet18 branches (40 classes) with
/// MMTMs (ratio 4) after the last three residual stages: ~23M parameters. For the meter
/// alone; no forward pass.
inline ParameterGroups resnet18_pair_groups(at::Device device = at::kCPU) {
  auto make = [&](std::vector<std::vector<std::int64_t>> shapes) {
    std::vector<at::Tensor> out;
    for (const auto& s : shapes) {
      auto p = at::randn(s, device).requires_grad_(true);
      p.mutable_grad() = at::randn(s, device);
      out.push_back(p);
    }
    return out;
  };
  auto resnet18 = [&]() {
    std::vector<std::vector<std::int64_t>> s{{64, 3, 7, 7}, {64}, {64}};
    std::int64_t in = 64;
    for (std::int64_t c : {64, 128, 256, 512}) {
      for (int block = 0; block < 2; ++block) {
        const std::int64_t block_in = block == 0 ? in : c;
        s.insert(s.end(), {{c, block_in, 3, 3}, {c}, {c}, {c, c, 3, 3}, {c}, {c}});
        if (block == 0 && block_in != c) s.insert(s.end(), {{c, block_in, 1, 1}, {c}, {c}});
      }
      in = c;
    }
    s.insert(s.end(), {{40, 512}, {40}});
    return make(s);
  };
  ParameterGroups g{{resnet18(), resnet18()}, {{}, {}}};
  for (std::int64_t c : {128, 256, 512}) {
    // MMTM(c, c): joint Linear(2c -> c), excitations Linear(c -> c)
    auto joint = make({{c, 2 * c}, {c}});
    auto e0 = make({{c, c}, {c}});
    auto e1 = make({{c, c}, {c}});
    g.fusion[0].insert(g.fusion[0].end(), joint.begin(), joint.end());
    g.fusion[0].insert(g.fusion[0].end(), e0.begin(), e0.end());
    g.fusion[1].insert(g.fusion[1].end(), joint.begin(), joint.end());
    g.fusion[1].insert(g.fusion[1].end(), e1.begin(), e1.end());
  }
  return g;
}

/// Every distinct tensor of the four groups.
inline std::vector<at::Tensor> distinct(const ParameterGroups& g) {
  std::vector<at::Tensor> out;
  for (const auto* list : {&g.branch[0], &g.branch[1], &g.fusion[0], &g.fusion[1]}) {
    for (const auto& p : *list) {
      bool seen = false;
      for (const auto& q : out) seen = seen || q.is_same(p);
      if (!seen) out.push_back(p);
    }
  }
  return out;
}

/// The official Python code's way: for each parameter, two squared-norm reductions, each
/// read to the host; the sums are done on the host.
inline std::array<double, 4> naive_speeds(const ParameterGroups& g) {
  std::array<double, 4> mu{};
  int i = 0;
  for (const auto* list : {&g.branch[0], &g.branch[1], &g.fusion[0], &g.fusion[1]}) {
    double gs = 0, ps = 0;
    for (const auto& p : *list) {
      gs += p.grad().pow(2).sum().item<double>();
      ps += p.detach().pow(2).sum().item<double>();
    }
    mu[i++] = gs / ps;
  }
  return mu;
}

/// Runs the steps in turns within each iteration, in rotating order, each timed alone
/// (whatever the machine does meanwhile hits all of them alike); returns each step's summed
/// seconds. `drain` runs before each step's clock starts and before it stops (on a GPU:
/// synchronize, so each time covers finished work).
template <std::size_t N>
std::array<double, N> time_in_turns(benchmark::State& state, const std::array<std::function<void()>, N>& steps,
                                    const std::function<void()>& drain = [] {}) {
  std::array<double, N> seconds{};
  std::size_t turn = 0;
  for (auto _ : state) {
    for (std::size_t k = 0; k < N; ++k) {
      const std::size_t which = (k + turn) % N;
      drain();
      const auto start = std::chrono::steady_clock::now();
      steps[which]();
      drain();
      seconds[which] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    ++turn;
  }
  return seconds;
}

}  // namespace mmbalance::bench
