#pragma once
// Command-line flags shared by the example programs (training, output, data-parallel
// ranks), the policy dispatch and the final report.

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>

#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <mmbalance/distributed.h>

#include "splits.h"
#include "trainer.h"

namespace mmbalance::examples {

/// Flags every example takes. Set `cfg`'s per-dataset defaults before `add_to`.
struct CommonFlags {
  TrainConfig cfg;
  std::string out;
  int threads = 2;
  int world_size = 1, rank = 0;
  std::string store, dist_host = "127.0.0.1";
  bool store_served_by_launcher = false;
  std::string dist_interface;  // GLOO_SOCKET_IFNAME under a launcher
  double dist_timeout = 60;
  std::optional<double> held_out;  // unset: TrainConfig::held_out's default for the policy

  void add_to(CLI::App& app) {
    app.add_option("--policy", cfg.policy,
                   "balancing policy (vanilla: the sum of the heads' losses; joint: the fused output's loss alone)")
        ->check(CLI::IsMember({"vanilla", "joint", "random", "guided", "ogm-ge", "opm", "pmr", "relearning", "smv", "gblend", "mmpareto", "agm"}))
        ->capture_default_str();
    app.add_option("--alpha", cfg.alpha, "guided: tolerance on |d_speed| (three or more branches: on the spread max s_k - min s_k)")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
    app.add_option("--Q", cfg.Q, "guided: re-balancing steps per window")
        ->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--ogm-alpha", cfg.ogm_alpha, "ogm-ge: modulation strength (the original: 0.1 to 0.8)")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
    app.add_flag("--ogm-noise,!--no-ogm-noise", cfg.ogm_noise,
                 "ogm-ge: add the generalization-enhancement noise (--no-ogm-noise: OGM)")
        ->capture_default_str();
    app.add_option("--ogm-modulation-ends", cfg.ogm_modulation_ends,
                   "ogm-ge: last epoch that modulates, counting from 0 (default: all)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--opm-q-base", cfg.opm_q_base, "opm: drop probability of a branch just ahead (the original: 0.5)")
        ->check(CLI::Range(0.0, 1.0))->capture_default_str();
    app.add_option("--opm-lambda", cfg.opm_lambda, "opm: how much further its lead raises it (the original: 0.5)")
        ->check(CLI::Range(0.0, 1e6))->capture_default_str();
    app.add_option("--opm-p-exe", cfg.opm_p_exe, "opm: probability that a step drops at all (the original: 0.7)")
        ->check(CLI::Range(0.0, 1.0))->capture_default_str();
    app.add_option("--pmr-alpha", cfg.pmr_alpha, "pmr: weight of a slow branch's prototype loss (the original: 1.0)")
        ->check(CLI::Range(0.0, 1e6))->capture_default_str();
    app.add_option("--pmr-momentum", cfg.pmr_momentum,
                   "pmr: share of the old prototypes kept at each epoch's update (the original: 0.2)")
        ->check(CLI::Range(0.0, 0.999999))->capture_default_str();
    app.add_option("--pmr-modulation-ends", cfg.pmr_modulation_ends,
                   "pmr: last epoch with the prototype loss, counting from 0 (default: all)")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--relearning-lambda", cfg.relearning_lambda,
                   "relearning: w = tanh(lambda |purity gap|), each branch's move toward its initial parameters (the original: 3)")
        ->check(CLI::Range(0.0, 1e6))->capture_default_str();
    app.add_option("--relearning-every", cfg.relearning_every,
                   "relearning: re-initialize after the epochs numbered every, 2 every, ... from 0 after warm-up (the original: 20)")
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{1000000}))->capture_default_str();
    app.add_option("--relearning-times", cfg.relearning_times, "relearning: at most this many times (the original: 3)")
        ->check(CLI::Range(std::int64_t{0}, std::int64_t{1000000}))->capture_default_str();
    app.add_option("--gblend-super-epoch", cfg.gblend_super_epoch,
                   "gblend: epochs between re-estimates of the loss weights")
        ->check(CLI::Range(std::int64_t{1}, std::int64_t{1000000}))->capture_default_str();
    app.add_option("--held-out", held_out,
                   "fraction of the training rows no policy trains on: gblend and relearning measure on "
                   "them (default 0.1 with those, else 0; give every policy the same to compare them on "
                   "the same rows)")
        ->check(CLI::Range(0.0, 1.0));
    app.add_option("--mmpareto-gamma", cfg.mmpareto_gamma,
                   "mmpareto: the magnitude rule's factor on every combined gradient (the original: 1.5)")
        ->check(CLI::Range(1e-6, 1e6))->capture_default_str();
    app.add_option("--agm-alpha", cfg.agm_alpha, "agm: modulation strength (the public collection: 0.1; the authors' code: 1.0)")
        ->check(CLI::Range(0.0, 1e3))->capture_default_str();
    app.add_option("--agm-max-gap", cfg.agm_max_gap,
                   "agm: cap on the running-mean ratio minus the step's ratio in the coefficient (the original: 10)")
        ->check(CLI::Range(1e-6, 1e6))->capture_default_str();
    app.add_option("--lr", cfg.lr, "SGD learning rate")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--momentum", cfg.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0))->capture_default_str();
    app.add_option("--epochs", cfg.epochs, "epochs in all (including warm-up)")
        ->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--warmup-epochs", cfg.warmup_epochs, "regular epochs before balancing")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
    app.add_option("--batch-size", cfg.batch_size, "global batch size")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--seed", cfg.seed, "initialisation, data order and random policy")->capture_default_str();
    app.add_option("--device", cfg.device)->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
    app.add_option("--threads", threads, "LibTorch CPU threads")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--out", out, "output folder (logs, checkpoints, summary)")->required();
    app.add_option("--resume", cfg.resume, "continue from this checkpoint")->check(CLI::ExistingFile);
    app.add_option("--world-size", world_size, "data-parallel processes (see docs/distributed.md)")
        ->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--rank", rank, "this process's rank, 0 .. world-size - 1")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
    app.add_option("--store", store,
                   "where the ranks meet: file:///fresh/path or tcp://HOST:PORT (rank 0 serves); without "
                   "it and --world-size, as torchrun or Slurm say (env://, docs/distributed.md)");
    app.add_option("--dist-host", dist_host, "address this rank's connections bind to")->capture_default_str();
    app.add_option("--dist-timeout", dist_timeout, "seconds to wait for the other ranks")
        ->check(CLI::PositiveNumber)->capture_default_str();
  }

  /// After parsing: checks the rank flags, sets the thread count, joins the process group
  /// (null for one process) and takes rank 0's seeds (`data_seed` too) on every rank.
  c10::intrusive_ptr<CollectiveBackend> finish(std::uint64_t& data_seed) {
    if (store.empty() && world_size == 1 && ProcessGroupOptions::environment_describes_run()) {
      // Launched by torchrun or under Slurm: the run as the launcher describes it (env://).
      const ProcessGroupOptions launched = ProcessGroupOptions::from_environment();
      world_size = launched.world_size();
      rank = launched.rank();
      store = launched.store();
      if (dist_host == "127.0.0.1") dist_host = launched.hostname();  // unless --dist-host says
      dist_interface = launched.network_interface();
      store_served_by_launcher = launched.store_served_by_launcher();
      cfg.device_index = launched.local_rank();
    }
    if (world_size > 1 && store.empty()) {
      throw CLI::ValidationError("--store", "is required with --world-size > 1");
    }
    if (rank >= world_size) {
      throw CLI::ValidationError("--rank", "must be below --world-size " + std::to_string(world_size));
    }
    // The range checks let NaN through (every comparison with it is false), and a run's
    // settings must be finite to be recorded in run.json and matched on resume.
    for (const auto& [flag, value] :
         {std::pair{"--alpha", cfg.alpha}, {"--ogm-alpha", cfg.ogm_alpha}, {"--held-out", held_out.value_or(0.0)},
          {"--opm-q-base", cfg.opm_q_base}, {"--opm-lambda", cfg.opm_lambda}, {"--opm-p-exe", cfg.opm_p_exe},
          {"--pmr-alpha", cfg.pmr_alpha}, {"--pmr-momentum", cfg.pmr_momentum}, {"--relearning-lambda", cfg.relearning_lambda},
          {"--mmpareto-gamma", cfg.mmpareto_gamma}, {"--agm-alpha", cfg.agm_alpha},
          {"--agm-max-gap", cfg.agm_max_gap}, {"--lr", cfg.lr}, {"--momentum", cfg.momentum},
          {"--dist-timeout", dist_timeout}}) {
      if (!std::isfinite(value)) {
        throw CLI::ValidationError(flag, "must be a finite number, got " + std::to_string(value));
      }
    }
    if (cfg.policy == "ogm-ge" && cfg.ogm_modulation_ends < cfg.warmup_epochs) {
      // The window would close inside the warm-up, where nothing is modulated.
      throw CLI::ValidationError("--ogm-modulation-ends", "is " + std::to_string(cfg.ogm_modulation_ends) +
                                 ", before the first epoch after warm-up (--warmup-epochs " +
                                 std::to_string(cfg.warmup_epochs) + "): no step would be modulated");
    }
    if (cfg.policy == "pmr" && cfg.pmr_modulation_ends < cfg.warmup_epochs + 1) {
      // Its first prototypes come from the first epoch after warm-up: the term starts an
      // epoch later.
      throw CLI::ValidationError("--pmr-modulation-ends", "is " + std::to_string(cfg.pmr_modulation_ends) +
                                 ": the prototype loss starts in the second epoch after warm-up (epoch " +
                                 std::to_string(cfg.warmup_epochs + 1) + "), so no step would have it");
    }
    if (cfg.policy == "agm" && cfg.agm_alpha * cfg.agm_max_gap > AGMPolicy::kMaxExponent) {
      // The largest coefficient exp(alpha * max_gap) must stay finite.
      throw CLI::ValidationError("--agm-alpha", "times --agm-max-gap must be at most " +
                                 std::to_string(static_cast<int>(AGMPolicy::kMaxExponent)) + ", got " +
                                 nlohmann::json(cfg.agm_alpha).dump() + " * " + nlohmann::json(cfg.agm_max_gap).dump());
    }
    const bool measures_held_out = cfg.policy == "gblend" || cfg.policy == "relearning";
    cfg.held_out = held_out.value_or(measures_held_out ? 0.1 : 0.0);
    if (!(cfg.held_out < 1) || (measures_held_out && !(cfg.held_out > 0))) {
      throw CLI::ValidationError("--held-out", std::string("must be a fraction ") +
                                 (measures_held_out ? "strictly between 0 and 1 with " + cfg.policy : "below 1") +
                                 ", got " + nlohmann::json(cfg.held_out).dump());
    }
    if (cfg.policy == "relearning" && rank == 0) {
      // The first re-initialization ends epoch warm-up + every (from 0): said, not refused
      // (it may be the first part of a run resumed with more epochs).
      if (cfg.relearning_times == 0) {
        std::fprintf(stderr, "warning: --relearning-times 0: the run never re-initializes (it trains CE(y) alone)\n");
      } else if (static_cast<double>(cfg.warmup_epochs) + static_cast<double>(cfg.relearning_every) + 1 >
                 static_cast<double>(cfg.epochs)) {
        std::fprintf(stderr, "warning: --relearning-every %lld: the first re-initialization ends epoch %lld; none "
                     "happens in these %lld epochs\n", static_cast<long long>(cfg.relearning_every),
                     static_cast<long long>(cfg.warmup_epochs + cfg.relearning_every), static_cast<long long>(cfg.epochs));
      }
    }
    if (cfg.policy == "smv" && cfg.warmup_epochs >= cfg.epochs && rank == 0) {
      std::fprintf(stderr, "warning: --warmup-epochs %lld: no epoch of these %lld is resampled (the run trains CE(y) alone)\n",
                   static_cast<long long>(cfg.warmup_epochs), static_cast<long long>(cfg.epochs));
    }
    if (cfg.policy == "gblend") {
      // The first estimate ends epoch warm-up + S - 1 (with no warm-up: 2S - 1). A run that
      // stops before a later epoch trains with uniform weights throughout: said, not refused
      // (it may be the first part of a run resumed with more epochs).
      // (In doubles: no overflow for absurd --warmup-epochs.)
      const double super_epoch = static_cast<double>(cfg.gblend_super_epoch);
      const double first = cfg.warmup_epochs > 0 ? static_cast<double>(cfg.warmup_epochs) + super_epoch - 1
                                                 : 2 * super_epoch - 1;
      if (first + 1 >= static_cast<double>(cfg.epochs) && rank == 0) {
        std::fprintf(stderr, "warning: --gblend-super-epoch %lld: the first estimate of the loss weights "
                     "ends epoch %.0f; no epoch of these %lld uses it\n",
                     static_cast<long long>(cfg.gblend_super_epoch), first,
                     static_cast<long long>(cfg.epochs));
      }
    }
    cfg.out = out;
    at::set_num_threads(threads);
    if (world_size == 1) return {};
    // A rank that dies closes its sockets; Gloo's next write to it must fail with EPIPE
    // (a named error naming the rank) rather than kill this rank with SIGPIPE.
    std::signal(SIGPIPE, SIG_IGN);
    auto pg = make_process_group(
        ProcessGroupOptions(store, rank, world_size)
            .hostname(dist_host)
            .store_served_by_launcher(store_served_by_launcher)
            .network_interface(dist_interface)
            .timeout(std::chrono::milliseconds(static_cast<std::int64_t>(dist_timeout * 1000))));
    cfg.seed = agree_on_seed(pg, cfg.seed);
    data_seed = agree_on_seed(pg, data_seed);
    return pg;
  }

  /// The last modulated epoch, or null where the modulation never ends.
  static nlohmann::json epoch_or_never(std::int64_t epoch) {
    if (epoch == std::numeric_limits<std::int64_t>::max()) return nullptr;
    return epoch;
  }

  /// The arguments every summary records.
  nlohmann::json json() const {
    return {{"policy", cfg.policy},   {"alpha", cfg.alpha},
            {"Q", cfg.Q},             {"ogm_alpha", cfg.ogm_alpha},
            {"ogm_noise", cfg.ogm_noise}, {"ogm_modulation_ends", epoch_or_never(cfg.ogm_modulation_ends)},
            {"opm_q_base", cfg.opm_q_base}, {"opm_lambda", cfg.opm_lambda}, {"opm_p_exe", cfg.opm_p_exe},
            {"pmr_alpha", cfg.pmr_alpha}, {"pmr_momentum", cfg.pmr_momentum},
            {"pmr_modulation_ends", epoch_or_never(cfg.pmr_modulation_ends)},
            {"relearning_lambda", cfg.relearning_lambda}, {"relearning_every", cfg.relearning_every},
            {"relearning_times", cfg.relearning_times},
            {"gblend_super_epoch", cfg.gblend_super_epoch}, {"held_out", cfg.held_out},
            {"mmpareto_gamma", cfg.mmpareto_gamma},
            {"agm_alpha", cfg.agm_alpha}, {"agm_max_gap", cfg.agm_max_gap},
            {"lr", cfg.lr},
            {"momentum", cfg.momentum}, {"epochs", cfg.epochs},
            {"warmup_epochs", cfg.warmup_epochs}, {"batch_size", cfg.batch_size},
            {"seed", cfg.seed},       {"device", cfg.device},
            {"threads", threads},     {"world_size", world_size}};
  }
};

/// Trains `net` with the policy `cfg.policy` names (each for any number of branches);
/// returns the summary (empty on ranks other than 0).
template <class Net>
nlohmann::json train_with_policy(Net net, const Splits& all_rows, const TrainConfig& cfg,
                                 const nlohmann::json& args,
                                 const c10::intrusive_ptr<CollectiveBackend>& pg) {
  const Splits data = cfg.held_out > 0 ? hold_out(all_rows, cfg.held_out, "--held-out") : all_rows;
  if (cfg.policy == "vanilla") return train_and_evaluate(net, VanillaPolicy(), data, cfg, args, pg);
  if (cfg.policy == "joint") return train_and_evaluate(net, JointTrainingPolicy(), data, cfg, args, pg);
  if (cfg.policy == "ogm-ge") {  // any number of branches; the same noise on every rank
    const auto ogm = OGMGEOptions().alpha(cfg.ogm_alpha).noise(cfg.ogm_noise).seed(cfg.seed)
                         .modulation_ends(cfg.ogm_modulation_ends);
    return train_and_evaluate(net, OGMGEPolicy(ogm), data, cfg, args, pg);
  }
  if (cfg.policy == "opm") {  // any number of branches; the same per-step draw on every rank
    const auto opm = OPMOptions().q_base(cfg.opm_q_base).lambda(cfg.opm_lambda).p_exe(cfg.opm_p_exe).seed(cfg.seed);
    return train_and_evaluate(net, OPMPolicy(opm), data, cfg, args, pg);
  }
  if (cfg.policy == "pmr") {  // any number of branches; the same prototypes on every rank
    const auto pmr = PMROptions().alpha(cfg.pmr_alpha).momentum(cfg.pmr_momentum)
                         .modulation_ends(cfg.pmr_modulation_ends);
    return train_and_evaluate(net, PMRPolicy(pmr), data, cfg, args, pg);
  }
  if (cfg.policy == "relearning") {  // any number of branches; the same features and moves on every rank
    const auto relearning = ReLearningOptions().lambda(cfg.relearning_lambda).every(cfg.relearning_every)
                                .times(cfg.relearning_times);
    return train_and_evaluate(net, ReLearningPolicy(relearning), data, cfg, args, pg);
  }
  if (cfg.policy == "smv") {  // any number of branches; the same resampled rows on every rank
    return train_and_evaluate(net, SampleValuationPolicy(), data, cfg, args, pg);
  }
  if (cfg.policy == "gblend") {  // any number of branches; measures on the held-out rows
    const auto gblend = GradientBlendingOptions().super_epoch(cfg.gblend_super_epoch);
    return train_and_evaluate(net, GradientBlendingPolicy(gblend), data, cfg, args, pg);
  }
  if (cfg.policy == "mmpareto") {  // any number of branches; late fusion too
    const auto mmpareto = MMParetoOptions().gamma(cfg.mmpareto_gamma);
    return train_and_evaluate(net, MMParetoPolicy(mmpareto), data, cfg, args, pg);
  }
  if (cfg.policy == "agm") {  // any number of branches (2^N - 2 masked passes a step); late fusion too
    const auto agm = AGMOptions().alpha(cfg.agm_alpha).max_gap(cfg.agm_max_gap);
    return train_and_evaluate(net, AGMPolicy(agm), data, cfg, args, pg);
  }
  if (cfg.policy == "random") {
    return train_and_evaluate(net, RandomPolicy(RandomOptions().seed(cfg.seed)), data, cfg, args, pg);
  }
  return train_and_evaluate(net, GuidedPolicy(GuidedOptions().alpha(cfg.alpha).Q(cfg.Q)), data, cfg, args, pg);
}

/// One line of results and where the summary is (rank 0).
inline void print_summary(const nlohmann::json& summary, const std::filesystem::path& out) {
  const auto& test = summary["test"];
  const auto& u = summary["utilization_test"];
  std::string line = "best epoch " + std::to_string(summary["best_epoch"].get<int>() + 1) +
                     ": test y " + percent(test["y"].get<double>());
  for (std::size_t k = 0; test.contains(numbered("y", k)); ++k) {
    line += numbered(" y", k) + " " + percent(test[numbered("y", k)].get<double>());
  }
  if (u.contains("d_util")) {  // two branches: the paper's names, d_util signed
    line += ", u(m1|m0) " + u["u_m1_given_m0"].dump() + ", u(m0|m1) " + u["u_m0_given_m1"].dump() +
            ", d_util " + u["d_util"].dump();
  } else {
    for (std::size_t k = 0; k < u["utilization"].size(); ++k) {
      line += numbered(k == 0 ? ", u_" : " u_", k) + " " + u["utilization"][k].dump();
    }
    line += ", spread " + u["spread"].dump();
  }
  if (summary.contains("missing_modality_test")) {
    for (const auto& [name, accuracy] : summary["missing_modality_test"].items()) {
      line += "\n  " + name + ": test y " + percent(accuracy.get<double>());
    }
  }
  std::printf("%s\nsummary: %s\n", line.c_str(), (out / "summary.json").string().c_str());
}

/// The body of an example's main(): runs it and turns errors into a message and exit 1.
template <class Run>
int run_main(const char* program, Run&& run) {
  try {
    return run();
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
  }
  return 1;
}

}  // namespace mmbalance::examples
