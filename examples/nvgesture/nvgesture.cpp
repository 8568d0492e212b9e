// NVGesture: hand gestures from RGB and depth clips with 3-d convolutional branches and
// MMTMs after the last three stages: the paper's third benchmark. The data cannot be
// downloaded by this project; see docs/examples.md.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <mmbalance/distributed.h>

#include "common/cli.h"
#include "nvgesture_clips.h"

using namespace mmbalance;
using namespace mmbalance::examples;

namespace {

ConvMMTMNet make_net(std::uint64_t seed, std::int64_t classes, std::int64_t width) {
  at::manual_seed(seed);
  const std::vector<std::int64_t> channels{width, 2 * width, 4 * width, 8 * width};
  auto branch = [&](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, classes).channels(channels).strides({2, 2, 2, 2}).spatial_dims(3));
  };
  return ConvMMTMNet(branch(3), branch(1),
                     {{1, MMTM(channels[1], channels[1])},
                      {2, MMTM(channels[2], channels[2])},
                      {3, MMTM(channels[3], channels[3])}});
}

Split lazy_split(const InputLoader& load, at::Tensor labels, at::Tensor ids) {
  return {{}, labels.index_select(0, ids), load, std::move(ids)};
}

int run(int argc, char** argv) {
  CLI::App app{"NVGesture from RGB and depth clips with balanced multi-modal learning (mmbalance)"};
  std::string data_dir, train_list = "nvgesture_train_correct_cvpr2016_v2.lst",
                        test_list = "nvgesture_test_correct_cvpr2016_v2.lst";
  ClipShape shape;
  std::int64_t classes = 25, width = 32, validation_size = -1;
  std::uint64_t data_seed = 0;
  CommonFlags flags;  // the paper's NVGesture recipe: lr 0.01, momentum 0.9, batch 4, alpha 0.1
  flags.cfg.batch_size = 4;
  flags.cfg.epochs = 30;
  app.add_option("--data-dir", data_dir, "NVGesture root: list files and Video_data/ with extracted frames")
      ->required();
  app.add_option("--train-list", train_list, "training list, relative to --data-dir")->capture_default_str();
  app.add_option("--test-list", test_list, "test list, relative to --data-dir")->capture_default_str();
  app.add_option("--frames", shape.frames, "frames per clip")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--resize", shape.resize, "frames are resized to this square size")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--crop", shape.crop, "then cropped to this square size")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--classes", classes, "gesture classes")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--width", width, "channels of the first of four 3-d convolution stages")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--validation-size", validation_size, "training clips held out for validation (default: 20 %)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--data-seed", data_seed, "which training clips are held out")->capture_default_str();
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  flags.cfg.eval_batch_size = 2 * flags.cfg.batch_size;  // clips are large
  if (shape.crop > shape.resize) throw CLI::ValidationError("--crop", "must not exceed --resize");
  const auto pg = flags.finish(data_seed);
  const TrainConfig& cfg = flags.cfg;

  const auto train_clips = index_nvgesture(data_dir, std::filesystem::path(data_dir) / train_list);
  const auto test_clips = index_nvgesture(data_dir, std::filesystem::path(data_dir) / test_list);
  const at::Tensor train_labels = gesture_labels(train_clips), test_labels = gesture_labels(test_clips);
  const std::int64_t top_label = std::max(train_labels.max().item<std::int64_t>(),
                                          test_labels.max().item<std::int64_t>());
  TORCH_CHECK(top_label < classes, "a list has label ", top_label + 1, " but --classes is ", classes);
  const auto n_train = static_cast<std::int64_t>(train_clips.size());
  if (validation_size < 0) validation_size = n_train / 5;
  TORCH_CHECK(validation_size > 0 && validation_size < n_train, "--validation-size ", validation_size,
              " must leave training clips among the ", n_train, " listed, and hold out at least one");
  auto gen = at::detail::createCPUGenerator(data_seed + 7919);
  const at::Tensor perm = at::randperm(n_train, gen, at::kLong);
  const InputLoader train_source = nvgesture_loader(train_clips, shape);
  const Splits data{lazy_split(train_source, train_labels, perm.narrow(0, validation_size, n_train - validation_size)),
                    lazy_split(train_source, train_labels, perm.narrow(0, 0, validation_size)),
                    lazy_split(nvgesture_loader(test_clips, shape), test_labels,
                               at::arange(static_cast<std::int64_t>(test_clips.size()), at::kLong))};
  std::fprintf(stderr, "nvgesture: %lld train / %lld validation / %lld test clips of %lld frames at %lldx%lld, policy %s\n",
               static_cast<long long>(data.train.size()), static_cast<long long>(data.validation.size()),
               static_cast<long long>(data.test.size()), static_cast<long long>(shape.frames),
               static_cast<long long>(shape.crop), static_cast<long long>(shape.crop), cfg.policy.c_str());

  nlohmann::json args = flags.json();
  args.update({{"dataset", "nvgesture"}, {"data_dir", data_dir}, {"frames", shape.frames},
               {"resize", shape.resize}, {"crop", shape.crop}, {"classes", classes}, {"width", width},
               {"data_seed", data_seed}, {"train_size", data.train.size()},
               {"validation_size", data.validation.size()}, {"test_size", data.test.size()}});
  const nlohmann::json summary = train_with_policy(make_net(cfg.seed, classes, width), data, cfg, args, pg);
  if (flags.rank == 0) print_summary(summary, cfg.out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main("nvgesture", [&] { return run(argc, argv); });
}
