#pragma once
// The training driver shared by the example programs: a plain LibTorch loop with a
// Balancer, JSON-lines logs, per-epoch checkpoints, selection of the best validation
// epoch, the utilization probe on it and a summary JSON. With a process group it trains
// data-parallel: each rank takes its share of every global batch and of the evaluation
// data, and rank 0 alone writes files.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <ranges>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/optim/sgd.h>

#include <mmbalance/distributed.h>
#include <mmbalance/io/json.h>

#include "splits.h"
#include "progress.h"

namespace mmbalance::examples {

struct TrainConfig {
  std::string policy = "guided";
  double alpha = 0.1;
  std::int64_t Q = 5;
  double lr = 0.01;
  double momentum = 0.9;
  std::int64_t epochs = 10;
  std::int64_t batch_size = 128;
  std::int64_t warmup_epochs = 1;
  std::uint64_t seed = 0;
  /// Batch size of evaluation and the probe (memory, not results).
  std::int64_t eval_batch_size = 500;
  std::string device = "cpu";
  std::filesystem::path out;
  std::string resume;
};

/// Accuracies of y, y0, y1 on a split.
struct Accuracy {
  double y = 0, y0 = 0, y1 = 0;
};

inline nlohmann::json to_json(const Accuracy& a) { return {{"y", a.y}, {"y0", a.y0}, {"y1", a.y1}}; }

/// Rows [n * rank / world, n * (rank + 1) / world) of a split: one rank's share.
inline Split shard(const Split& s, int rank, int world) {
  const std::int64_t begin = s.size() * rank / world, end = s.size() * (rank + 1) / world;
  return s.slice(begin, end - begin);
}

/// The split in consecutive batches of float inputs on `device`, made one at a time as
/// the range is walked (uint8 splits are not copied as floats all at once).
inline auto as_batches(Split s, std::int64_t batch_size, at::Device device = at::kCPU) {
  const std::int64_t count = (s.size() + batch_size - 1) / batch_size;
  return std::views::iota(std::int64_t{0}, count) |
         std::views::transform([s = std::move(s), batch_size, device](std::int64_t b) {
           const std::int64_t i = b * batch_size, len = std::min(batch_size, s.size() - i);
           const auto [x0, x1] = s.inputs(at::arange(i, i + len, at::kLong));
           return MultiModalBatch{model_input(x0, device), model_input(x1, device),
                                  s.y.narrow(0, i, len).to(device)};
         });
}

/// Accuracies over `s` (this rank's share of a split when `sum_across_ranks` adds the
/// counts of all ranks).
template <class Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
Accuracy evaluate(Net& net, const Split& s, at::Device device, std::int64_t batch_size,
                  SumAcrossRanks sum_across_ranks = {}) {
  const mmbalance::EvalModeGuard<Net> eval_mode(net);
  // correct predictions of y, y0, y1, then the sample count
  at::Tensor counts = at::zeros({4}, at::TensorOptions(at::kLong).device(device));
  for (const auto& b : as_batches(s, batch_size, device)) {
    const auto out = net->forward(b.x0, b.x1);
    const at::Tensor& y = b.target;
    counts.narrow(0, 0, 3).add_(at::stack({out.y.argmax(1).eq(y).sum(),
                                           out.y0.argmax(1).eq(y).sum(),
                                           out.y1.argmax(1).eq(y).sum()}));
  }
  counts[3].fill_(s.size());
  sum_across_ranks(counts);
  const at::Tensor c = counts.to(at::kCPU).to(at::kDouble);
  const double n = c[3].item<double>();
  return {c[0].item<double>() / n, c[1].item<double>() / n, c[2].item<double>() / n};
}

namespace detail {
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
}  // namespace detail

/// Trains `net` on `data.train` with the policy of `cfg`, logs to `cfg.out`/log.jsonl,
/// checkpoints every epoch (`checkpoint-last.pt`, `checkpoint-best.pt` by validation
/// accuracy of y), then probes the best checkpoint and writes `summary.json`. Returns the
/// summary. `args` is recorded in the summary as given.
///
/// With a process group `pg`, every rank calls this with the same data and config: the
/// global batch of `cfg.batch_size` rows is split among the ranks (a last batch with
/// fewer rows than ranks is dropped), gradients and gate averages are combined by
/// `DataParallel`, evaluation and the probe count over all ranks' shares, and only rank 0
/// writes to `cfg.out`. A resumed run reads `cfg.resume` on every rank.
template <class Net, class Policy>
nlohmann::json train_and_evaluate(Net net, Policy policy, const Splits& data,
                                  const TrainConfig& cfg, const nlohmann::json& args,
                                  const c10::intrusive_ptr<CollectiveBackend>& pg = {}) {
  namespace fs = std::filesystem;
  const at::Device device(cfg.device);
  TORCH_CHECK(device.is_cpu() || torch::cuda::is_available(),
              "--device cuda: no CUDA device is available");
  const int rank = pg ? pg->getRank() : 0;
  const int world = pg ? pg->getSize() : 1;
  const bool writer = rank == 0;
  TORCH_CHECK(cfg.batch_size >= world, "--batch-size ", cfg.batch_size,
              " is the global batch; it needs at least one row per rank (", world, " ranks)");
  const fs::path summary_path = cfg.out / "summary.json";
  if (writer) {
    fs::create_directories(cfg.out);
    fs::remove(summary_path);  // never leave a summary of an earlier run that claims success
  }
  const fs::path last_path = cfg.out / "checkpoint-last.pt";
  const fs::path best_path = cfg.out / "checkpoint-best.pt";
  const fs::path best_info_path = cfg.out / "best.json";

  net->to(device);
  torch::optim::SGD optimizer(net->parameters(),
                              torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum));
  Balancer<Policy> balancer(net, std::move(policy),
                            BalancerOptions().warmup_epochs(cfg.warmup_epochs));

  nlohmann::json best = {{"epoch", -1}, {"validation", nullptr}};
  if (!cfg.resume.empty()) {
    load_checkpoint(cfg.resume, net, optimizer, balancer);
    if (writer && fs::exists(best_info_path)) {
      best = nlohmann::json::parse(detail::read_text(best_info_path));
    }
    std::fprintf(stderr, "resumed from %s at epoch %lld\n", cfg.resume.c_str(),
                 static_cast<long long>(balancer.epoch()));
  }
  std::optional<DataParallel<Net>> dp;
  if (pg) dp.emplace(net, pg);
  // Runs f with what adds counts up over the ranks.
  const auto with_rank_sum = [&](auto&& f) {
    return dp ? f(dp->sum_across_ranks()) : f(SingleProcess{});
  };
  std::ofstream log;
  if (writer) {
    log.open(cfg.out / "log.jsonl", cfg.resume.empty() ? std::ios::trunc : std::ios::app);
    TORCH_CHECK(log, "cannot write ", (cfg.out / "log.jsonl").string());
  }

  const std::int64_t n = data.train.size();
  // A last batch with fewer rows than ranks would leave a rank without data: dropped.
  const std::int64_t steps_per_epoch = n / cfg.batch_size + (n % cfg.batch_size >= world ? 1 : 0);
  const auto run_start = std::chrono::steady_clock::now();
  for (std::int64_t epoch = balancer.epoch(); epoch < cfg.epochs; ++epoch) {
    // The order of an epoch depends only on (seed, epoch): a resumed run sees the same.
    auto gen = at::detail::createCPUGenerator(cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch));
    const at::Tensor perm = at::randperm(n, gen, at::kLong);
    ProgressBar bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(cfg.epochs),
                    steps_per_epoch);
    double loss_sum = 0;
    // This rank's rows of step s's global batch.
    const auto step_rows = [&](std::int64_t s) {
      const std::int64_t rows = std::min(cfg.batch_size, n - s * cfg.batch_size);
      const std::int64_t begin = rows * rank / world, end = rows * (rank + 1) / world;
      return std::tuple{perm.narrow(0, s * cfg.batch_size + begin, end - begin), rows};
    };
    // Inputs of step s, augmented (lazy sources) from (seed, epoch, step): resumable. The
    // next step's inputs load on another thread while this step trains.
    const auto load_step = [&](std::int64_t s) {
      return data.train.inputs(std::get<0>(step_rows(s)),
                               cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch) * 100003ULL +
                                   static_cast<std::uint64_t>(s));
    };
    std::future<std::pair<at::Tensor, at::Tensor>> next_inputs;
    if (steps_per_epoch > 0) next_inputs = std::async(std::launch::async, load_step, 0);
    for (std::int64_t s = 0; s < steps_per_epoch; ++s) {
      const auto [idx, rows] = step_rows(s);
      const auto [cpu_x0, cpu_x1] = next_inputs.get();
      if (s + 1 < steps_per_epoch) next_inputs = std::async(std::launch::async, load_step, s + 1);
      const at::Tensor x0 = model_input(cpu_x0, device);
      const at::Tensor x1 = model_input(cpu_x1, device);
      const at::Tensor y = data.train.y.index_select(0, idx).to(device);
      const StepKind kind = balancer.next_step();
      const ModelOutput out = net->forward(x0, x1, kind);
      // Each rank's mean loss weighted by its share of the rows, so that the average over
      // ranks is the mean over the global batch even when shares differ by one.
      const double share = static_cast<double>(idx.size(0) * world) / static_cast<double>(rows);
      const ModalityLosses heads = modality_losses(out, y);
      const at::Tensor loss0 = heads.loss0 * share, loss1 = heads.loss1 * share;
      const at::Tensor loss = loss0 + loss1;
      optimizer.zero_grad();
      loss.backward();
      balancer.observe(dp ? dp->synchronize(loss) : loss);
      optimizer.step();
      at::Tensor losses = at::stack({loss0.detach(), loss1.detach()});
      if (dp) {
        dp->all_reduce_sum(losses);
        losses.div_(world);
      }
      losses = losses.to(at::kCPU);
      const double l0 = losses[0].item<double>(), l1 = losses[1].item<double>();
      loss_sum += l0 + l1;
      if (writer) log << nlohmann::json{{"type", "step"},
                            {"epoch", epoch},
                            {"step", balancer.step() - 1},
                            {"kind", std::string(to_string(kind))},
                            {"d_speed", mmbalance::number_or_null(balancer.last_d_speed())},
                            {"loss", l0 + l1},
                            {"loss0", l0},
                            {"loss1", l1}}
                 .dump()
          << '\n';
      const auto& c = balancer.epoch_step_counts();
      char status[160];
      std::snprintf(status, sizeof status, "loss %.3f d_speed %+.4f steps r/m0/m1 %lld/%lld/%lld",
                    loss_sum / static_cast<double>(s + 1), balancer.last_d_speed(),
                    static_cast<long long>(c[0]), static_cast<long long>(c[1]),
                    static_cast<long long>(c[2]));
      bar.update(s + 1, status);
    }
    const StepCounts counts = balancer.epoch_step_counts();
    balancer.end_epoch();
    if (dp) dp->synchronize_buffers();
    const auto accuracy_on = [&](const Split& split) {
      return with_rank_sum([&](auto sum) { return evaluate(net, shard(split, rank, world), device, cfg.eval_batch_size, sum); });
    };
    const Accuracy val = accuracy_on(data.validation);
    const Accuracy test = accuracy_on(data.test);
    const auto speed = balancer.speed();
    nlohmann::json record = speed;  // d_speed, s_m1_given_m0, s_m0_given_m1 (io/json.h)
    record.update({{"type", "epoch"},
                   {"epoch", epoch},
                   {"validation", to_json(val)},
                   {"test", to_json(test)},
                   {"steps", mmbalance::step_counts_json(counts)},
                   {"seconds", bar.elapsed()}});
    if (writer) log << record.dump() << std::endl;
    std::fprintf(stderr, "  validation y %.2f%% y0 %.2f%% y1 %.2f%% | test y %.2f%% y0 %.2f%% y1 %.2f%%\n",
                 100 * val.y, 100 * val.y0, 100 * val.y1, 100 * test.y, 100 * test.y0, 100 * test.y1);
    if (!writer) continue;
    save_checkpoint(last_path.string(), net, optimizer, balancer);
    if (best["validation"].is_null() || val.y > best["validation"]["y"].get<double>()) {
      save_checkpoint(best_path.string(), net, optimizer, balancer);
      best = {{"epoch", epoch}, {"validation", to_json(val)}, {"test", to_json(test)}};
      std::ofstream(best_info_path) << best.dump(1) << '\n';
    }
  }
  if (writer) {
    TORCH_CHECK(fs::exists(best_path), "no checkpoint to evaluate in ", cfg.out.string(),
                " (did training run any epoch?)");
    // The best validation epoch: its test accuracies and utilization rates.
    load_checkpoint(best_path.string(), net, optimizer, balancer);
  }
  if (dp) dp->broadcast_from_rank0();  // rank 0's best model on every rank
  const UtilizationReport util = with_rank_sum([&](auto sum) {
    return probe_utilization(net, as_batches(shard(data.train, rank, world), cfg.eval_batch_size, device),
                             as_batches(shard(data.test, rank, world), cfg.eval_batch_size, device), sum);
  });
  if (!writer) return {};
  nlohmann::json summary = {
      {"args", args},
      {"best_epoch", best["epoch"]},
      {"validation", best["validation"]},
      {"test", best["test"]},
      {"utilization_test", util},
      {"d_speed_at_best", mmbalance::number_or_null(balancer.speed().d_speed)},
      {"steps_total", mmbalance::step_counts_json(balancer.total_step_counts())},
      {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count()}};
  std::ofstream(summary_path) << summary.dump(1) << '\n';
  return summary;
}

}  // namespace mmbalance::examples
