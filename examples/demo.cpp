// The main demo: trains the same MultiModalNet with the vanilla, random and guided
// policies on a synthetic colour-vs-shape task and prints, per policy, test accuracy,
// d_speed and the conditional utilization rates.
//
// Data: m1 is a gray image of a class-specific random shape under heavy noise; m0 is the
// same image drawn in a colour. In training the colour is one palette colour per class
// (a shortcut that is learned much faster than the shape); in test it is random, so a
// network that leans on m0's colour generalizes badly.
//
// Usage: mmbalance_demo [epochs=8] [train_samples=4000] [seed=0]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/optim/sgd.h>

#include <mmbalance/mmbalance.h>

using namespace mmbalance;

namespace {

constexpr std::int64_t kClasses = 10;
constexpr std::int64_t kSide = 16;

struct Dataset {
  at::Tensor x0, x1, target;
};

Dataset make_data(std::int64_t n, bool colour_follows_label, std::uint64_t seed) {
  auto shapes_gen = at::detail::createCPUGenerator(12345);  // same shapes in every split
  const at::Tensor shapes = at::upsample_bilinear2d(at::randn({kClasses, 1, 4, 4}, shapes_gen),
                                                    {kSide, kSide}, false);
  const at::Tensor palette = at::tensor({0.9, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.2, 0.95, 0.95, 0.9,
                                         0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9, 1.0, 0.55, 0.0, 0.5,
                                         0.1, 0.7, 0.6, 0.35, 0.15, 0.75, 0.75, 0.75},
                                        at::kFloat)
                                 .view({kClasses, 3});
  auto gen = at::detail::createCPUGenerator(seed);
  const at::Tensor target = at::randint(kClasses, {n}, gen);
  const at::Tensor gray = at::relu(shapes.index_select(0, target) + 1.6 * at::randn({n, 1, kSide, kSide}, gen));
  const at::Tensor colour_index = colour_follows_label ? target : at::randint(kClasses, {n}, gen);
  const at::Tensor colour =
      (palette.index_select(0, colour_index) + 0.2 * at::randn({n, 3}, gen)).clamp(0, 1);
  return {gray * colour.view({n, 3, 1, 1}), gray, target};
}

std::vector<MultiModalBatch> batches(const Dataset& d, std::int64_t batch_size) {
  std::vector<MultiModalBatch> out;
  for (std::int64_t i = 0; i < d.target.size(0); i += batch_size) {
    const std::int64_t len = std::min(batch_size, d.target.size(0) - i);
    out.push_back({d.x0.narrow(0, i, len), d.x1.narrow(0, i, len), d.target.narrow(0, i, len)});
  }
  return out;
}

ConvMMTMNet make_net(std::uint64_t seed) {
  at::manual_seed(seed);
  auto branch = [](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, kClasses).channels({16, 32, 64}).strides({1, 2, 2}));
  };
  return ConvMMTMNet(branch(3), branch(1), {{1, MMTM(32, 32)}, {2, MMTM(64, 64)}});
}

struct Row {
  std::string policy;
  UtilizationReport util;
  SpeedSummary speed;
  StepCounts counts{};
  double seconds = 0;
};

template <class Policy>
Row train(const std::string& name, Policy policy, const std::vector<MultiModalBatch>& train_data,
          const std::vector<MultiModalBatch>& test_data, int epochs, std::uint64_t seed) {
  const auto start = std::chrono::steady_clock::now();
  auto net = make_net(seed);
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  Balancer<Policy> balancer(net, std::move(policy));
  for (int epoch = 0; epoch < epochs; ++epoch) {
    for (const auto& b : train_data) {
      const StepKind kind = balancer.next_step();
      auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
      optimizer.zero_grad();
      loss.backward();
      balancer.observe(loss);
      optimizer.step();
    }
    const auto& c = balancer.epoch_step_counts();
    std::printf("  %-8s epoch %d  d_speed %+.4f  steps: %lld regular, %lld re-balance m0, %lld re-balance m1\n",
                name.c_str(), epoch + 1, balancer.last_d_speed(), static_cast<long long>(c[0]),
                static_cast<long long>(c[1]), static_cast<long long>(c[2]));
    std::fflush(stdout);
    balancer.end_epoch();
  }
  Row row{name, probe_utilization(net, train_data, test_data), balancer.speed(),
          balancer.total_step_counts()};
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return row;
}

}  // namespace

int run(int argc, char** argv) {
  const int epochs = argc > 1 ? std::atoi(argv[1]) : 8;
  const std::int64_t n_train = argc > 2 ? std::atoll(argv[2]) : 4000;
  const std::uint64_t seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 0;
  if (epochs < 2 || n_train < 64) {
    std::fprintf(stderr, "usage: %s [epochs>=2] [train_samples>=64] [seed]\n", argv[0]);
    return 2;
  }
  at::set_num_threads(2);
  const auto train_data = batches(make_data(n_train, true, seed + 1), 64);
  const auto test_data = batches(make_data(2000, false, seed + 2), 256);
  std::printf("mmbalance demo: %lld training samples (colour follows label), 2000 test samples "
              "(random colour), %d epochs, balancing from epoch 2\n",
              static_cast<long long>(n_train), epochs);

  std::vector<Row> rows;
  rows.push_back(train("vanilla", VanillaPolicy(), train_data, test_data, epochs, seed));
  rows.push_back(train("random", RandomPolicy(RandomOptions().seed(seed)), train_data, test_data,
                       epochs, seed));
  rows.push_back(train("guided", GuidedPolicy(GuidedOptions().alpha(0.1).Q(5)), train_data,
                       test_data, epochs, seed));

  std::printf("\n%-8s %8s %8s %8s %9s %9s %9s %8s %s\n", "policy", "test y", "test y0",
              "test y1", "d_speed", "u(m1|m0)", "u(m0|m1)", "d_util", "time");
  for (const auto& r : rows) {
    std::printf("%-8s %7.1f%% %7.1f%% %7.1f%% %+9.4f %+9.3f %+9.3f %+8.3f %.0fs\n",
                r.policy.c_str(), 100 * r.util.accuracy, 100 * r.util.accuracy0,
                100 * r.util.accuracy1, r.speed.d_speed, r.util.u_m1_given_m0,
                r.util.u_m0_given_m1, r.util.d_util, r.seconds);
  }
  std::printf("\ny = (y0 + y1) / 2; y0 reads the colour image (m0), y1 the gray image (m1).\n"
              "u(m1|m0): accuracy branch 0 loses when m1 is cut off (algorithm.md §7).\n");
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "mmbalance_demo: %s\n", e.what_without_backtrace());
    return 1;
  }
}
