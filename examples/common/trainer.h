#pragma once
// The training driver shared by the example programs: a plain LibTorch loop with a
// Balancer, JSON-lines logs, per-epoch checkpoints, selection of the best validation
// epoch, the utilization probe on it, the accuracies with each modality missing and a
// summary JSON, for a `MultiModalNet` of any number of branches. With a process group it
// trains data-parallel:
// each rank takes its share of every global batch and of the evaluation data, and rank 0
// alone writes files.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
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
  double ogm_alpha = 0.1;
  bool ogm_noise = true;
  std::int64_t ogm_modulation_ends = std::numeric_limits<std::int64_t>::max();
  double opm_q_base = 0.5;
  double opm_lambda = 0.5;
  double opm_p_exe = 0.7;
  double pmr_alpha = 1.0;
  double pmr_momentum = 0.2;
  std::int64_t pmr_modulation_ends = std::numeric_limits<std::int64_t>::max();
  double relearning_lambda = 3.0;
  std::int64_t relearning_every = 20;
  std::int64_t relearning_times = 3;
  std::int64_t gblend_super_epoch = 2;
  double held_out = 0;  // fraction of the training rows set aside (hold_out); gblend and relearning measure on them
  double mmpareto_gamma = 1.5;
  double agm_alpha = 0.1;
  double agm_max_gap = 10.0;
  double lr = 0.01;
  double momentum = 0.9;
  std::int64_t epochs = 10;
  std::int64_t batch_size = 128;
  std::int64_t warmup_epochs = 1;
  std::uint64_t seed = 0;
  /// Batch size of evaluation and the probe (memory, not results).
  std::int64_t eval_batch_size = 500;
  std::string device = "cpu";
  /// The CUDA device of this rank (torchrun's LOCAL_RANK; -1: the current one). Not a
  /// setting of the run: every rank of one run has its own.
  int device_index = -1;
  std::filesystem::path out;
  std::string resume;
};

/// prefix followed by k, e.g. "y2" (a function: GCC 12 warns falsely on "y" + to_string(k)).
inline std::string numbered(const char* prefix, std::size_t k) {
  std::string s(prefix);
  s += std::to_string(k);
  return s;
}

/// "97.10%"
inline std::string percent(double fraction) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f%%", 100 * fraction);
  return text;
}

/// Accuracies of y and of each head on a split.
struct Accuracy {
  double y = 0;
  std::vector<double> heads;
};

/// {"y": ..., "y0": ..., "y1": ..., ...}
inline nlohmann::json to_json(const Accuracy& a) {
  nlohmann::json j = {{"y", a.y}};
  for (std::size_t k = 0; k < a.heads.size(); ++k) j[numbered("y", k)] = a.heads[k];
  return j;
}

/// "y 97.10% y0 96.00% y1 95.20%"
inline std::string describe(const Accuracy& a) {
  std::string s = "y " + percent(a.y);
  for (std::size_t k = 0; k < a.heads.size(); ++k) s += numbered(" y", k) + " " + percent(a.heads[k]);
  return s;
}

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
           std::vector<at::Tensor> inputs;
           for (const at::Tensor& x : s.inputs(at::arange(i, i + len, at::kLong))) {
             inputs.push_back(model_input(x, device));
           }
           return Batch{std::move(inputs), s.y.narrow(0, i, len).to(device)};
         });
}

/// Accuracies over `s` (this rank's share of a split when `sum_across_ranks` adds the
/// counts of all ranks) of y and every head of `forward(net, inputs)`.
template <class Net, class Forward, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
Accuracy evaluate_with(Net& net, Forward&& forward, const Split& s, at::Device device,
                       std::int64_t batch_size, SumAcrossRanks sum_across_ranks = {}) {
  const mmbalance::EvalModeGuard<Net> eval_mode(net);
  at::NoGradGuard no_grad;
  // Correct predictions of y, then of each head, then the sample count; a rank whose
  // share is empty still adds its zeros.
  const auto heads = static_cast<std::int64_t>(net->num_branches());
  at::Tensor counts = at::zeros({heads + 2}, at::TensorOptions(at::kLong).device(device));
  for (const auto& b : as_batches(s, batch_size, device)) {
    const NetOutput out = forward(b.inputs);
    std::vector<at::Tensor> correct{out.y.argmax(1).eq(b.target).sum()};
    for (const at::Tensor& h : out.heads) {
      correct.push_back(h.defined() ? h.argmax(1).eq(b.target).sum() : at::zeros_like(correct[0]));
    }
    counts.narrow(0, 0, heads + 1).add_(at::stack(correct));
  }
  counts[-1].fill_(s.size());
  sum_across_ranks(counts);
  const at::Tensor c = counts.to(at::kCPU).to(at::kDouble);
  const double n = c[-1].item<double>();
  TORCH_CHECK(n > 0, "accuracy over an empty split");
  Accuracy a{c[0].item<double>() / n, {}};
  for (std::int64_t k = 1; k + 1 < c.size(0); ++k) a.heads.push_back(c[k].item<double>() / n);
  return a;
}

/// Accuracies of y and every head over `s` (see `evaluate_with`).
template <class Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
Accuracy evaluate(Net& net, const Split& s, at::Device device, std::int64_t batch_size,
                  SumAcrossRanks sum_across_ranks = {}) {
  return evaluate_with(net, [&](const std::vector<at::Tensor>& x) {
    return net->forward(x, StepPlan::regular());
  }, s, device, batch_size, sum_across_ranks);
}

/// The accuracy of y over `s` when the modalities `absent` are missing
/// (`forward_missing`, with recorded squeeze averages).
template <class Net, std::invocable<at::Tensor&> SumAcrossRanks = SingleProcess>
double accuracy_without(Net& net, const std::vector<std::size_t>& absent, const Split& s,
                        at::Device device, std::int64_t batch_size, SumAcrossRanks sum_across_ranks = {}) {
  return evaluate_with(net, [&](const std::vector<at::Tensor>& x) {
    return net->forward_missing(x, absent);
  }, s, device, batch_size, sum_across_ranks).y;
}

/// Sample-level valuation's rows for an epoch: every training sample's contributions
/// (`sample_contributions`, each rank valuing its share, the shares summed so that every
/// rank builds the same rows), their copies and the resampled rows; `record` gets the mean
/// contribution and the copies of each modality (the original prints the means).
template <class Net, class DP>
ResampledRows resampled_training_rows(Net& net, const Split& train, std::size_t branches, const TrainConfig& cfg,
                                      at::Device device, int rank, int world, std::optional<DP>& dp,
                                      nlohmann::json& record) {
  const std::int64_t n = train.size();
  at::Tensor phi = at::zeros({n, static_cast<std::int64_t>(branches)}, at::TensorOptions(device).dtype(at::kFloat));
  std::int64_t row = n * rank / world;
  for (const Batch& b : as_batches(shard(train, rank, world), cfg.eval_batch_size, device)) {
    phi.narrow(0, row, b.target.size(0)).copy_(sample_contributions(net, b.inputs, b.target));
    row += b.target.size(0);
  }
  if (dp) dp->all_reduce_sum(phi);
  const at::Tensor copies = SampleValuationPolicy::copies(phi);
  ResampledRows rows = SampleValuationPolicy::resampled_rows(copies);
  const at::Tensor mean = phi.mean(0).to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor copied = copies.sum(0).to(at::kCPU).contiguous();
  record = {{"contributions", std::vector<double>(mean.data_ptr<double>(), mean.data_ptr<double>() + mean.numel())},
            {"copies", std::vector<std::int64_t>(copied.data_ptr<std::int64_t>(), copied.data_ptr<std::int64_t>() + copied.numel())},
            {"rows", rows.samples.size(0)}};
  return rows;
}

/// The logs' speed column: for two branches the signed "d_speed", for more the
/// "speed_spread" max_k s_k - min_k s_k (N >= 3 have no signed value).
inline const char* speed_column_name(std::size_t branches) { return branches == 2 ? "d_speed" : "speed_spread"; }
inline double speed_column(const SpeedSummary& s) { return s.speeds.size() == 2 ? s.d_speed : s.spread; }

/// The learning speeds now: two branches {"d_speed", "s_m1_given_m0", "s_m0_given_m1"};
/// N branches {"speed_spread", "speeds": [s_0, ...], "fastest"}.
template <class BalancerT>
nlohmann::json speeds_json(const BalancerT& balancer) {
  const SpeedSummary s = balancer.speed();
  const nlohmann::json all = s;
  if (s.speeds.size() == 2) {
    return {{"d_speed", all["d_speed"]}, {"s_m1_given_m0", all["s_m1_given_m0"]}, {"s_m0_given_m1", all["s_m0_given_m1"]}};
  }
  return {{"speed_spread", all["spread"]}, {"speeds", all["speeds"]}, {"fastest", all["fastest"]}};
}

/// MMPareto: the steps so far in which each branch's multimodal and uni-modal gradients
/// conflicted (one host read).
template <class Policy>
nlohmann::json conflict_steps_json(const Policy& policy) {
  const at::Tensor counts = policy.conflict_steps().to(at::kCPU).contiguous();
  return std::vector<std::int64_t>(counts.data_ptr<std::int64_t>(), counts.data_ptr<std::int64_t>() + counts.numel());
}

/// The JSON object in `path` (one this program wrote: best.json, run.json). A file that is
/// missing, unreadable, larger than 1 MiB or not a JSON object is an error naming it.
inline nlohmann::json read_json_object(const std::filesystem::path& path) {
  std::error_code error;
  const auto bytes = std::filesystem::file_size(path, error);
  TORCH_CHECK(!error, path.string(), ": cannot read it (", error.message(), ")");
  TORCH_CHECK(bytes <= (1u << 20), path.string(), " has ", bytes, " bytes; this program writes a few hundred");
  std::ifstream in(path);
  TORCH_CHECK(in, path.string(), ": cannot read it");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK(!j.is_discarded() && j.is_object(), path.string(), " is not a valid JSON object");
  return j;
}

/// The settings a resumed run may change: they do not change what is computed beyond the
/// order of floating-point sums (device, threads, ranks), where the data is read from, or
/// how long the run goes on.
// Settings added after runs were recorded without them, with the value those runs had.
inline nlohmann::json recorded_default(const std::string& setting) {
  if (setting == "width") return 32;  // --width (colored_mnist, spoken_digits) came later
  if (setting == "opm_q_base" || setting == "opm_lambda") return 0.5;  // --opm-* came later
  if (setting == "opm_p_exe") return 0.7;
  if (setting == "pmr_alpha") return 1.0;  // --pmr-* came later
  if (setting == "pmr_momentum") return 0.2;
  if (setting == "pmr_modulation_ends") return nullptr;
  if (setting == "relearning_lambda") return 3.0;  // --relearning-* came later
  if (setting == "relearning_every") return 20;
  if (setting == "relearning_times") return 3;
  return "(not recorded)";
}

inline bool may_change_on_resume(const std::string& setting) {
  for (const char* s : {"epochs", "device", "threads", "world_size", "data_dir"}) {
    if (setting == s) return true;
  }
  return false;
}

/// A resumed run continues the run its checkpoint came from: `args` must equal the
/// settings recorded beside the checkpoint (run.json) in all but `may_change_on_resume`.
inline void check_resume_settings(const std::filesystem::path& checkpoint, const nlohmann::json& args) {
  const std::filesystem::path recorded = checkpoint.parent_path() / "run.json";
  TORCH_CHECK(std::filesystem::exists(recorded), "--resume ", checkpoint.string(), ": ", recorded.string(),
              " is missing; it records the settings the checkpoint was made with, which a resumed run keeps");
  nlohmann::json saved = read_json_object(recorded);
  if (saved.contains("gblend_held_out") && !saved.contains("held_out")) {
    // Before --held-out: only gblend held rows out (--gblend-held-out, recorded for every policy).
    const bool gblend = saved.contains("policy") && saved["policy"] == "gblend";
    saved["held_out"] = gblend ? saved["gblend_held_out"] : nlohmann::json(0.0);
    saved.erase("gblend_held_out");
  }
  nlohmann::json keys = nlohmann::json::object();
  for (const auto& [key, value] : saved.items()) keys[key] = true;
  for (const auto& [key, value] : args.items()) keys[key] = true;
  for (const auto& [key, unused] : keys.items()) {
    if (may_change_on_resume(key)) continue;
    const nlohmann::json then = saved.contains(key) ? saved[key] : recorded_default(key);
    const nlohmann::json now = args.contains(key) ? args[key] : nlohmann::json("(not set)");
    TORCH_CHECK(then == now, "--resume ", checkpoint.string(), ": the run was made with ", key, " = ",
                then.dump(), ", this one has ", now.dump(), " (", recorded.string(), "); a resumed run "
                "keeps the settings of the run it continues (it may change epochs, device, threads, "
                "ranks and the data's folder)");
  }
}

/// Keeps the records of `log` (log.jsonl) before epoch `epoch`, where a resumed run goes on:
/// a run stopped mid-epoch (killed) logged steps that its last checkpoint does not hold and
/// that the resumed run logs again. A line cut off by the kill (or one that is not a record
/// of this program, or longer than any it writes) ends what is kept; what is dropped is said.
inline void keep_log_before(const std::filesystem::path& log, std::int64_t epoch) {
  if (!std::filesystem::exists(log)) return;
  constexpr std::size_t kMaxLine = 1 << 20;  // a step or epoch record has a few hundred bytes
  std::uintmax_t kept = 0;
  {
    std::ifstream in(log, std::ios::binary);
    TORCH_CHECK(in, log.string(), ": cannot read it");
    std::string line;
    for (;;) {
      line.clear();
      bool ended = false;
      for (char c; line.size() <= kMaxLine && in.get(c);) {
        if (c == '\n') {
          ended = true;
          break;
        }
        line.push_back(c);
      }
      if (!ended) break;
      const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded() || !record.is_object() || !record.contains("epoch") ||
          !record["epoch"].is_number_integer() || record["epoch"].get<std::int64_t>() >= epoch) {
        break;
      }
      kept += line.size() + 1;
    }
  }
  const std::uintmax_t size = std::filesystem::file_size(log);
  if (kept == size) return;
  std::fprintf(stderr, "%s: dropped its last %ju bytes (records of epoch %lld on, which the checkpoint "
               "does not hold, or a damaged line)\n", log.string().c_str(), size - kept,
               static_cast<long long>(epoch));
  std::filesystem::resize_file(log, kept);
}

/// Whether `j` is an accuracy record as `to_json(Accuracy)` writes it: y and each head's.
inline bool is_accuracy(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("y")) return false;
  for (const auto& [name, value] : j.items()) {
    if (!value.is_number()) return false;
  }
  return true;
}

/// Writes `j` to `path` by way of a temporary file, so a reader never sees half of it.
inline void write_json_atomically(const std::filesystem::path& path, const nlohmann::json& j) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(1) << '\n';
    TORCH_CHECK(out.good(), "cannot write ", tmp.string());
  }
  std::filesystem::rename(tmp, path);
}

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
  at::Device device(cfg.device);
  if (device.is_cuda() && !device.has_index() && cfg.device_index >= 0) {  // one GPU per rank
    const auto visible = static_cast<int>(torch::cuda::device_count());
    // A launcher that binds one GPU to each task (Slurm's --gpus-per-task) leaves it device 0.
    const int index = visible == 1 ? 0 : cfg.device_index;
    TORCH_CHECK(index < visible, "LOCAL_RANK ", cfg.device_index, " has no GPU: ", visible, " are visible");
    device.set_index(static_cast<c10::DeviceIndex>(index));
  }
  TORCH_CHECK(device.is_cpu() || torch::cuda::is_available(),
              "--device cuda: no CUDA device is available");
  if constexpr (ObservesEpochLosses<Policy>) {
    TORCH_CHECK(data.held_out && data.held_out->size() > 0,
                "the policy measures generalization: the data needs held-out rows (hold_out)");
  }
  if (!cfg.resume.empty()) check_resume_settings(cfg.resume, args);  // before anything is written
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
  if (writer && cfg.resume.empty()) {
    // A new run: an earlier run's checkpoints must not be resumed as this one's.
    for (const fs::path& p : {last_path, best_path, best_info_path}) fs::remove(p);
  }

  net->to(device);
  torch::optim::SGD optimizer(net->parameters(),
                              torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum));
  Balancer<Policy> balancer(net, std::move(policy),
                            BalancerOptions().warmup_epochs(cfg.warmup_epochs));

  nlohmann::json best = {{"epoch", -1}, {"validation", nullptr}};
  if (!cfg.resume.empty()) {
    load_checkpoint(cfg.resume, net, optimizer, balancer);
    if (writer && fs::exists(best_info_path)) {
      best = read_json_object(best_info_path);
      TORCH_CHECK(best.contains("epoch") && best["epoch"].is_number_integer() && best["epoch"].get<std::int64_t>() >= 0 &&
                      best.contains("validation") && is_accuracy(best["validation"]) && best.contains("test") &&
                      is_accuracy(best["test"]),
                  best_info_path.string(), " does not hold the best epoch and its validation and test accuracies");
    }
    std::fprintf(stderr, "resumed from %s at epoch %lld\n", cfg.resume.c_str(),
                 static_cast<long long>(balancer.epoch()));
  }
  if (writer) write_json_atomically(cfg.out / "run.json", args);  // what a resume of this run must keep
  std::optional<DataParallel<Net>> dp;
  if (pg) dp.emplace(net, pg);
  // Runs f with what adds counts up over the ranks.
  const auto with_rank_sum = [&](auto&& f) {
    return dp ? f(dp->sum_across_ranks()) : f(SingleProcess{});
  };
  std::ofstream log;
  if (writer) {
    if (!cfg.resume.empty()) keep_log_before(cfg.out / "log.jsonl", balancer.epoch());
    log.open(cfg.out / "log.jsonl", cfg.resume.empty() ? std::ios::trunc : std::ios::app);
    TORCH_CHECK(log, "cannot write ", (cfg.out / "log.jsonl").string());
  }

  const std::int64_t n = data.train.size();
  const auto run_start = std::chrono::steady_clock::now();
  for (std::int64_t epoch = balancer.epoch(); epoch < cfg.epochs; ++epoch) {
    const auto train_start = std::chrono::steady_clock::now();
    // The epoch's rows: every training sample once, all its modalities present, or (sample-
    // level valuation after warm-up) resampled from the network as it is now.
    ResampledRows epoch_rows{at::arange(n, at::kLong), at::Tensor()};
    nlohmann::json valuation;  // for the log
    if constexpr (std::same_as<Policy, SampleValuationPolicy>) {
      if (!balancer.in_warmup()) {
        epoch_rows = resampled_training_rows(net, data.train, balancer.branches(), cfg, device, rank, world, dp, valuation);
      }
    }
    const std::int64_t epoch_size = epoch_rows.samples.size(0);
    // A last batch with fewer rows than ranks would leave a rank without data: dropped.
    const std::int64_t steps_per_epoch =
        epoch_size / cfg.batch_size + (epoch_size % cfg.batch_size >= world ? 1 : 0);
    // The order of an epoch depends only on (seed, epoch) and its rows: a resumed run sees the same.
    auto gen = at::detail::createCPUGenerator(cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch));
    const at::Tensor order = at::randperm(epoch_size, gen, at::kLong);
    const at::Tensor perm = epoch_rows.samples.index_select(0, order);
    // On the device once an epoch: each step narrows it there.
    const at::Tensor perm_presence =
        epoch_rows.presence.defined() ? epoch_rows.presence.index_select(0, order).to(device) : at::Tensor();
    // LibTorch's default generator too, per rank: a forward-side policy's per-sample draws
    // (OPM's drops) come from it, and a resumed run must draw what an uninterrupted one does.
    at::manual_seed((cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch)) * 7919ULL +
                    static_cast<std::uint64_t>(rank) + 1);
    ProgressBar bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(cfg.epochs),
                    steps_per_epoch);
    double loss_sum = 0, fused_loss_sum = 0;  // Σ_k CE_k and CE(y), for the progress line
    // This rank's rows of step s's global batch: which samples, the global batch's size,
    // and where they start in the epoch's order.
    const auto step_rows = [&](std::int64_t s) {
      const std::int64_t rows = std::min(cfg.batch_size, epoch_size - s * cfg.batch_size);
      const std::int64_t begin = rows * rank / world, end = rows * (rank + 1) / world;
      const std::int64_t first = s * cfg.batch_size + begin;
      return std::tuple{perm.narrow(0, first, end - begin), rows, first};
    };
    // Inputs of step s, augmented (lazy sources) from (seed, epoch, step): resumable. The
    // next step's inputs load on another thread while this step trains.
    const auto load_step = [&](std::int64_t s) {
      return data.train.inputs(std::get<0>(step_rows(s)),
                               cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch) * 100003ULL +
                                   static_cast<std::uint64_t>(s));
    };
    std::future<std::vector<at::Tensor>> next_inputs;
    if (steps_per_epoch > 0) next_inputs = std::async(std::launch::async, load_step, 0);
    for (std::int64_t s = 0; s < steps_per_epoch; ++s) {
      const auto [idx, rows, first] = step_rows(s);
      std::vector<at::Tensor> x = next_inputs.get();
      if (s + 1 < steps_per_epoch) next_inputs = std::async(std::launch::async, load_step, s + 1);
      for (at::Tensor& m : x) m = model_input(m, device);
      const at::Tensor y = data.train.y.index_select(0, idx).to(device);
      const StepPlan plan = balancer.next_plan();
      const NetOutput out = perm_presence.defined()
                                ? net->forward(x, plan, perm_presence.narrow(0, first, idx.size(0)))
                                : net->forward(x, plan);
      // The balancer forms the loss (a gradient-modulating policy takes the step's heads
      // from it, AGM the inputs for its masked passes). Each rank's mean loss weighted by
      // its share of the rows, so that the average over ranks is the mean over the global
      // batch even when shares differ by one; the balancer scales what it computes alike.
      const double share = static_cast<double>(idx.size(0) * world) / static_cast<double>(rows);
      const at::Tensor loss = balancer.loss(out, y, x, share);
      optimizer.zero_grad();
      loss.backward();
      // The loss the step trained (the ranks' average), for the log.
      const at::Tensor trained = dp ? dp->synchronize(loss) : loss;
      if (dp) {
        balancer.observe(trained, dp->sum_across_ranks());
      } else {
        balancer.observe(trained);
      }
      optimizer.step();
      at::Tensor head_losses;  // for the log: CE of each head, then of y, then the trained loss
      {
        torch::NoGradGuard no_grad;
        std::vector<at::Tensor> losses = modality_losses(out, y);
        losses.push_back(fused_loss(out, y));
        head_losses = at::stack(losses) * share;
      }
      if (dp) {
        dp->all_reduce_sum(head_losses);
        head_losses.div_(world);
      }
      // The trained loss (already the ranks' average) joins them: one copy to the host.
      head_losses = at::cat({head_losses, trained.detach().reshape({1}).to(head_losses.scalar_type())});
      head_losses = head_losses.to(at::kCPU).to(at::kDouble);
      const double trained_step_loss = head_losses[-1].item<double>();
      const double fused_step_loss = head_losses[-2].item<double>();
      head_losses = head_losses.narrow(0, 0, head_losses.size(0) - 2);
      const double step_loss = head_losses.sum().item<double>();
      loss_sum += step_loss;
      fused_loss_sum += fused_step_loss;
      if (writer) {
        nlohmann::json record{{"type", "step"},
                              {"epoch", epoch},
                              {"step", balancer.step() - 1},
                              {"kind", to_string(plan)},
                              {speed_column_name(balancer.branches()),
                               mmbalance::number_or_null(speed_column(balancer.last_speeds()))},
                              {"loss", step_loss},
                              {"loss_y", fused_step_loss},
                              {"loss_trained", trained_step_loss}};
        for (std::int64_t k = 0; k < head_losses.size(0); ++k) {
          record[numbered("loss", static_cast<std::size_t>(k))] = head_losses[k].item<double>();
        }
        // A policy's number per branch for this step, as name0, name1, ... (none in warm-up).
        const auto per_branch = [&](const char* name, const at::Tensor& values) {
          if (!values.defined() || balancer.in_warmup()) return;
          const at::Tensor host = values.to(at::kCPU, at::kDouble);
          for (std::int64_t j = 0; j < host.size(0); ++j) {
            record[numbered(name, static_cast<std::size_t>(j))] = host[j].item<double>();
          }
        };
        if constexpr (requires { balancer.policy().last_coefficients(); }) {
          per_branch("coefficient", balancer.policy().last_coefficients());  // OGM-GE, AGM: k_k
        }
        if constexpr (requires { balancer.policy().last_fused_weights(); }) {
          // MMPareto: the weight on the multimodal gradient (0.5: no conflict).
          per_branch("fused_weight", balancer.policy().last_fused_weights());
        }
        log << record.dump() << '\n';
      }
      char numbers[128];
      std::snprintf(numbers, sizeof numbers, "loss Σ %.3f y %.3f %s %+.4f steps r", loss_sum / static_cast<double>(s + 1),
                    fused_loss_sum / static_cast<double>(s + 1),
                    speed_column_name(balancer.branches()), speed_column(balancer.last_speeds()));
      std::string status = numbers;
      for (std::size_t k = 0; k < balancer.branches(); ++k) status += numbered("/m", k);
      for (std::size_t i = 0; i < balancer.epoch_plan_counts().size(); ++i) {
        status += i == 0 ? " " : "/";
        status += std::to_string(balancer.epoch_plan_counts()[i]);
      }
      bar.update(s + 1, status);
    }
    const std::vector<std::int64_t> counts = balancer.epoch_plan_counts();
    // The ranks' BatchNorm statistics averaged first: the losses below, the evaluation and
    // the checkpoint all see the one model.
    if (dp) dp->synchronize_buffers();
    std::int64_t diagnosed = -1;  // ReLearning: the boundary of its latest diagnosis
    if constexpr (requires { balancer.policy().last_diagnosis(); }) diagnosed = balancer.policy().last_diagnosis().epochs;
    static_assert(!(ObservesEpochLosses<Policy> && ObservesEpochFeatures<Policy>),
                  "the examples measure losses on each rank's shard and features on all rows: a policy "
                  "measuring both needs a loop of its own");
    if constexpr (ObservesEpochLosses<Policy> || ObservesEpochFeatures<Policy>) {
      // Measured on the held-out rows and as many training rows: every head's losses on
      // this rank's shares (the sums cover all ranks), or every branch's features on all
      // of them on every rank (a clustering needs them together).
      const Split& held = *data.held_out;
      const Split train_sample = data.train.slice(0, std::min(held.size(), n));
      const auto model_batches = [&](const Split& s) {
        return as_batches(ObservesEpochLosses<Policy> ? shard(s, rank, world) : s, cfg.eval_batch_size, device);
      };
      with_rank_sum([&](auto sum) {
        if constexpr (ReinitializesBranches<Policy>) {
          balancer.end_epoch(net, model_batches(train_sample), model_batches(held), optimizer, sum);
        } else {
          balancer.end_epoch(net, model_batches(train_sample), model_batches(held), sum);
        }
        return 0;
      });
    } else if constexpr (ReinitializesBranches<Policy>) {
      balancer.end_epoch(optimizer);
    } else {
      balancer.end_epoch();
    }
    const auto accuracy_on = [&](const Split& split) {
      return with_rank_sum([&](auto sum) { return evaluate(net, shard(split, rank, world), device, cfg.eval_batch_size, sum); });
    };
    // The epoch's training: sample-level valuation's rows, its steps and the policy's
    // epoch-end measurement, not the evaluation below (what a method costs, for comparisons).
    const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - train_start).count();
    const Accuracy val = accuracy_on(data.validation);
    const Accuracy test = accuracy_on(data.test);
    nlohmann::json record = speeds_json(balancer);
    record.update({{"type", "epoch"},
                   {"epoch", epoch},
                   {"validation", to_json(val)},
                   {"test", to_json(test)},
                   {"steps", mmbalance::plan_counts_json(counts)},
                   {"train_seconds", train_seconds},
                   {"seconds", bar.elapsed()}});
    if constexpr (WeighsLosses<Policy>) {
      // The loss weights of the next epoch, each head's then the fused output's (null while
      // it is a warm-up epoch, whose loss is unweighted).
      const LossWeights w = balancer.policy().loss_weights();
      nlohmann::json weights = w.heads;
      weights.push_back(w.fused);
      record["loss_weights"] = balancer.in_warmup() ? nlohmann::json(nullptr) : weights;
    }
    if constexpr (requires { balancer.policy().conflict_steps(); }) {
      record["conflict_steps"] = conflict_steps_json(balancer.policy());
    }
    if constexpr (requires { balancer.policy().last_diagnosis(); }) {
      // ReLearning, at a boundary where it diagnosed: each branch's purities and the
      // strength of its move toward its initial parameters.
      const ReLearningDiagnosis& d = balancer.policy().last_diagnosis();
      if (d.epochs != diagnosed) {
        record["relearning"] = {{"train_purity", d.train_purity}, {"held_out_purity", d.held_out_purity},
                                {"strengths", d.strengths}};
      }
    }
    if (!valuation.is_null()) record["sample_valuation"] = valuation;
    if constexpr (requires { balancer.policy().running_scores(); }) {
      // AGM: the running means of each branch's mono-modal score (what r̄ is made of).
      const at::Tensor scores = balancer.policy().running_scores().to(at::kCPU).contiguous();
      record["running_scores"] = std::vector<double>(scores.data_ptr<double>(), scores.data_ptr<double>() + scores.numel());
    }
    if (writer) log << record.dump() << std::endl;
    std::fprintf(stderr, "  validation %s | test %s\n", describe(val).c_str(), describe(test).c_str());
    if (!writer) continue;
    save_checkpoint(last_path.string(), net, optimizer, balancer);
    if (best["validation"].is_null() || val.y > best["validation"]["y"].get<double>()) {
      save_checkpoint(best_path.string(), net, optimizer, balancer);
      best = {{"epoch", epoch}, {"validation", to_json(val)}, {"test", to_json(test)}};
      write_json_atomically(best_info_path, best);
    }
  }
  if (writer) {
    TORCH_CHECK(fs::exists(best_path), "no checkpoint to evaluate in ", cfg.out.string(),
                " (did training run any epoch?)");
    // The best validation epoch: its test accuracies and utilization rates.
    load_checkpoint(best_path.string(), net, optimizer, balancer);
  }
  if (dp) dp->broadcast_from_rank0();  // rank 0's best model on every rank
  auto train_batches = as_batches(shard(data.train, rank, world), cfg.eval_batch_size, device);
  auto test_batches = as_batches(shard(data.test, rank, world), cfg.eval_batch_size, device);
  nlohmann::json measured;
  measured["utilization_test"] = with_rank_sum([&](auto sum) {
    return probe_utilization(net, train_batches, test_batches, sum);
  });
  // The probe recorded the training-set squeeze averages that stand in for a missing
  // modality: y's test accuracy without each modality, and with only each one.
  nlohmann::json missing = nlohmann::json::object();
  const std::size_t n_branches = balancer.branches();
  for (std::size_t k = 0; k < n_branches; ++k) {
    std::vector<std::size_t> others;
    for (std::size_t j = 0; j < n_branches; ++j) {
      if (j != k) others.push_back(j);
    }
    const auto accuracy = [&](const std::vector<std::size_t>& absent) {
      return with_rank_sum([&](auto sum) {
        return accuracy_without(net, absent, shard(data.test, rank, world), device, cfg.eval_batch_size, sum);
      });
    };
    missing[numbered("without_m", k)] = accuracy({k});
    if (n_branches > 2) missing[numbered("only_m", k)] = accuracy(others);
  }
  measured["missing_modality_test"] = missing;
  if (!writer) return {};
  nlohmann::json summary = {
      {"args", args},
      {"best_epoch", best["epoch"]},
      {"validation", best["validation"]},
      {"test", best["test"]},
      {std::string(speed_column_name(balancer.branches())) + "_at_best",
       speeds_json(balancer)[speed_column_name(balancer.branches())]},
      {"steps_total", mmbalance::plan_counts_json(balancer.total_plan_counts())},
      {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count()}};
  summary.update(measured);
  if (data.held_out) {  // trained on the rest (args record the sizes before holding out)
    summary["rows"] = {{"train", data.train.size()}, {"held_out", data.held_out->size()}};
  }
  if constexpr (requires { balancer.policy().conflict_steps(); }) {
    summary["conflict_steps_total"] = conflict_steps_json(balancer.policy());
  }
  if (balancer.branches() > 2) summary["speeds_at_best"] = nlohmann::json(balancer.speed())["speeds"];
  write_json_atomically(summary_path, summary);  // its presence means the run finished
  return summary;
}

}  // namespace mmbalance::examples
