// Three modalities: Colored-and-gray MNIST (colour image, gray image) plus the digit's
// name spoken (espeak-ng speakers from scripts/make-speech, noise at a stated SNR, log-mel
// features), with balanced multi-modal learning for N branches. See docs/examples.md.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>

#include <CLI/CLI.hpp>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>

#include <mmbalance/distributed.h>

#include "common/cli.h"
#include "colored_mnist/colored_mnist_data.h"
#include "colored_mnist/mnist_readers.h"
#include "spoken_digits_data.h"

using namespace mmbalance;
using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

using SpokenDigitNet = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, MMTM>;

struct DataFlags {
  std::string data_dir = MMBALANCE_DEFAULT_DATA_DIR;
  std::string speech_dir;  // default: data_dir/speech
  std::uint64_t data_seed = 0;
  double colour_noise = 0.05;
  double snr_db = -12.0;
  std::int64_t train_size = 6400, validation_size = 1600, test_size = 2000;
  std::int64_t validation_speakers = 20, test_speakers = 20;
};

/// The colour and gray digits of colored_mnist, and for each digit a clip of its label
/// spoken by a speaker of the same split (training, validation and test speakers are
/// disjoint; a speaker is one voice, variant, speed and pitch of scripts/make-speech's
/// grid, so a voice recurs across splits at other speeds and pitches). Audio features are
/// standardized with the training clips' mean and std.
Splits load_data(const DataFlags& data_flags) {
  const LabelledImages all = load_mnist_json(fs::path(data_flags.data_dir) / "mnist" / "digits");
  const std::int64_t n = all.labels.size(0);
  // Each size alone first: their sum cannot overflow then.
  TORCH_CHECK(data_flags.train_size <= n && data_flags.validation_size <= n && data_flags.test_size <= n &&
                  data_flags.train_size + data_flags.validation_size + data_flags.test_size <= n,
              "only ", n, " MNIST digits found, fewer than --train-size ", data_flags.train_size,
              " + --validation-size ", data_flags.validation_size, " + --test-size ", data_flags.test_size);
  auto gen = at::detail::createCPUGenerator(data_flags.data_seed + 7919);
  const at::Tensor perm = at::randperm(n, gen, at::kLong);
  const LabelledImages test = take(all, perm.narrow(0, 0, data_flags.test_size));
  const LabelledImages pool = take(all, perm.narrow(0, data_flags.test_size, n - data_flags.test_size));
  Splits data = make_colored_splits(pool, test, data_flags.train_size, data_flags.validation_size, data_flags.colour_noise, data_flags.data_seed);

  const fs::path speech = data_flags.speech_dir.empty() ? fs::path(data_flags.data_dir) / "speech" : fs::path(data_flags.speech_dir);
  const SpeakerSplit speakers = split_speakers(read_speakers(speech), data_flags.validation_speakers,
                                               data_flags.test_speakers, data_flags.data_seed + 104729);
  const SpeechOptions options = SpeechOptions().snr_db(data_flags.snr_db);
  const SpokenDigits train_clips = load_spoken_digits(speech, speakers.train, options, data_flags.data_seed);
  const at::Tensor mean = train_clips.features.mean(), spread = train_clips.features.std();
  TORCH_CHECK(spread.item<double>() > 0, "the training clips' features in ", speech.string(),
              " are all equal: nothing to learn from the audio");
  auto pairing = at::detail::createCPUGenerator(data_flags.data_seed + 1299709);
  const auto add_audio = [&](Split& split, const SpokenDigits& clips) {
    const at::Tensor chosen = pair_with_clips(split.y, clips, pairing);
    split.x.push_back(((clips.features - mean) / spread).index_select(0, chosen));
  };
  add_audio(data.train, train_clips);
  add_audio(data.validation, load_spoken_digits(speech, speakers.validation, options, data_flags.data_seed));
  add_audio(data.test, load_spoken_digits(speech, speakers.test, options, data_flags.data_seed));
  std::fprintf(stderr, "speakers: %zu train / %zu validation / %zu test, SNR %g dB\n",
               speakers.train.size(), speakers.validation.size(), speakers.test.size(), data_flags.snr_db);
  return data;
}

// Stages of w, 2w, 4w, 4w channels (w = 32: 32, 64, 128, 128).
ConvBranch image_branch(std::int64_t in_channels, std::int64_t w) {
  return ConvBranch(ConvBranchOptions(in_channels, 10).channels({w, 2 * w, 4 * w, 4 * w}).strides({1, 2, 2, 2}));
}

/// Log-mel input (1 x 40 x 96): stride 2 from the first stage keeps its cost near an
/// image branch's.
ConvBranch audio_branch(std::int64_t w) {
  return ConvBranch(ConvBranchOptions(1, 10).channels({w, 2 * w, 4 * w, 4 * w}).strides({2, 2, 2, 2}));
}

SpokenDigitNet make_net(std::uint64_t seed, std::int64_t w) {
  at::manual_seed(seed);
  return SpokenDigitNet(std::tuple{image_branch(3, w), image_branch(1, w), audio_branch(w)},
                        {{{1, 1, 1}, MMTM(MMTMOptions({2 * w, 2 * w, 2 * w}))},
                         {{2, 2, 2}, MMTM(MMTMOptions({4 * w, 4 * w, 4 * w}))},
                         {{3, 3, 3}, MMTM(MMTMOptions({4 * w, 4 * w, 4 * w}))}});
}

/// The audio branch trained alone (the uni-modal reference of the audio modality): its
/// test accuracy at the best validation epoch. A plain loop: same optimizer, batch order
/// and epochs as the multi-modal runs.
nlohmann::json train_audio_only(const Splits& data, const TrainConfig& cfg, std::int64_t width) {
  at::manual_seed(cfg.seed);
  ConvBranch branch = audio_branch(width);
  torch::optim::SGD optimizer(branch->parameters(), torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum));
  const auto accuracy = [&](const Split& s) {
    branch->eval();
    at::NoGradGuard no_grad;
    std::int64_t correct = 0;
    for (std::int64_t i = 0; i < s.size(); i += cfg.eval_batch_size) {
      const std::int64_t len = std::min(cfg.eval_batch_size, s.size() - i);
      correct += branch->forward(s.x[2].narrow(0, i, len)).argmax(1).eq(s.y.narrow(0, i, len)).sum().item<std::int64_t>();
    }
    branch->train();
    return static_cast<double>(correct) / static_cast<double>(s.size());
  };
  nlohmann::json best = {{"epoch", -1}, {"validation", -1.0}};
  const std::int64_t n = data.train.size();
  for (std::int64_t epoch = 0; epoch < cfg.epochs; ++epoch) {
    auto gen = at::detail::createCPUGenerator(cfg.seed * 1000003ULL + static_cast<std::uint64_t>(epoch));
    const at::Tensor perm = at::randperm(n, gen, at::kLong);
    for (std::int64_t i = 0; i < n; i += cfg.batch_size) {
      const at::Tensor rows = perm.narrow(0, i, std::min(cfg.batch_size, n - i));
      const at::Tensor loss = torch::nn::functional::cross_entropy(
          branch->forward(data.train.x[2].index_select(0, rows)), data.train.y.index_select(0, rows));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
    }
    const double val = accuracy(data.validation), test = accuracy(data.test);
    std::fprintf(stderr, "epoch %lld: audio alone validation %s test %s\n", static_cast<long long>(epoch + 1),
                 percent(val).c_str(), percent(test).c_str());
    if (val > best["validation"].get<double>()) best = {{"epoch", epoch}, {"validation", val}, {"test", test}};
  }
  return best;
}

int run(int argc, char** argv) {
  CLI::App app{"Colored and gray MNIST digits plus the spoken digit: balanced learning over three "
               "modalities (mmbalance)"};
  DataFlags data_flags;
  bool audio_only = false;
  std::int64_t width = 32;
  CommonFlags flags;
  app.add_option("--data-dir", data_flags.data_dir, "where scripts/fetch-data put the digits")->capture_default_str();
  app.add_option("--speech-dir", data_flags.speech_dir, "scripts/make-speech's output (default DATA_DIR/speech)");
  app.add_option("--data-seed", data_flags.data_seed, "splits, colours, speakers, noise, pairing")->capture_default_str();
  app.add_option("--colour-noise", data_flags.colour_noise, "variance of the per-channel colour noise")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--snr-db", data_flags.snr_db, "signal-to-noise ratio of the spoken digits, dB")
      ->check(CLI::Range(-60.0, 200.0))->capture_default_str();
  app.add_option("--train-size", data_flags.train_size, "training digits")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--validation-size", data_flags.validation_size, "validation digits")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--test-size", data_flags.test_size, "test digits")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--validation-speakers", data_flags.validation_speakers, "voices kept for validation")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--test-speakers", data_flags.test_speakers, "voices kept for test")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--width", width, "channels of each branch's first of four convolution stages (then 2x, 4x, 4x)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_flag("--audio-only", audio_only,
               "train the audio branch alone and report its accuracy (the audio's uni-modal reference)");
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  const auto pg = flags.finish(data_flags.data_seed);
  const TrainConfig& cfg = flags.cfg;
  TORCH_CHECK(!audio_only || (!pg && cfg.device == "cpu" && cfg.resume.empty()),
              "--audio-only trains on the CPU in one process from scratch: no --world-size, "
              "--device cuda or --resume");

  const Splits data = load_data(data_flags);
  std::fprintf(stderr, "%lld train / %lld validation / %lld test, policy %s\n",
               static_cast<long long>(data.train.size()), static_cast<long long>(data.validation.size()),
               static_cast<long long>(data.test.size()), audio_only ? "(audio alone)" : cfg.policy.c_str());
  nlohmann::json args = flags.json();
  args.update({{"data_seed", data_flags.data_seed}, {"colour_noise", data_flags.colour_noise}, {"snr_db", data_flags.snr_db},
               {"train_size", data_flags.train_size}, {"validation_size", data_flags.validation_size},
               {"test_size", data_flags.test_size}, {"validation_speakers", data_flags.validation_speakers},
               {"test_speakers", data_flags.test_speakers}, {"width", width}});
  if (audio_only) {
    fs::create_directories(cfg.out);
    fs::remove(cfg.out / "summary.json");  // never leave an earlier run's summary behind
    const nlohmann::json summary = {{"args", args}, {"audio_only", train_audio_only(data, cfg, width)}};
    write_json_atomically(cfg.out / "summary.json", summary);
    std::printf("audio alone: best epoch %d, test %s\n", summary["audio_only"]["epoch"].get<int>() + 1,
                percent(summary["audio_only"]["test"].get<double>()).c_str());
    return 0;
  }
  const nlohmann::json summary = train_with_policy(make_net(cfg.seed, width), data, cfg, args, pg);
  if (flags.rank == 0) print_summary(summary, cfg.out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main("spoken_digits", [&] { return run(argc, argv); });
}
