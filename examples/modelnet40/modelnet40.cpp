// ModelNet40 from two rendered views (front and rear, MVCNN's 12-view renders) with
// ResNet18-style branches and MMTMs after the last three residual stages: the paper's
// second benchmark. The data cannot be downloaded by this project; see docs/examples.md.
#include <cstdio>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include <mmbalance/distributed.h>

#include "common/cli.h"
#include "mvcnn.h"

using namespace mmbalance;
using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

ResNetMMTMNet make_net(std::uint64_t seed, std::int64_t classes, std::int64_t width, bool small_stem) {
  at::manual_seed(seed);
  const std::vector<std::int64_t> widths{width, 2 * width, 4 * width, 8 * width};
  auto branch = [&] {
    return ResNetBranch(ResNetBranchOptions(1, classes).widths(widths).imagenet_stem(!small_stem));
  };
  return ResNetMMTMNet(branch(), branch(),
                       {{1, MMTM(widths[1], widths[1])},
                        {2, MMTM(widths[2], widths[2])},
                        {3, MMTM(widths[3], widths[3])}});
}

int run(int argc, char** argv) {
  CLI::App app{"ModelNet40 from front and rear views with balanced multi-modal learning (mmbalance)"};
  std::string data_dir;
  int view0 = 1, view1 = 7, image_size = 0;
  std::int64_t width = 64, validation_size = -1;
  bool small_stem = false;
  std::uint64_t data_seed = 0;
  CommonFlags flags;  // the paper's ModelNet40 recipe: plain SGD, lr 0.1, batch 8, alpha 0.01
  flags.cfg.lr = 0.1;
  flags.cfg.momentum = 0.0;
  flags.cfg.batch_size = 8;
  flags.cfg.alpha = 0.01;
  flags.cfg.epochs = 20;
  app.add_option("--data-dir", data_dir, "MVCNN renders: <dir>/<class>/<train|test>/<object>_vNNN.png")
      ->required();
  app.add_option("--view0", view0, "view of modality 0 (front)")->check(CLI::Range(0, 999))->capture_default_str();
  app.add_option("--view1", view1, "view of modality 1 (rear)")->check(CLI::Range(0, 999))->capture_default_str();
  app.add_option("--image-size", image_size, "resize views to this many pixels (0: keep, 224 for MVCNN)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--width", width, "channels of the first residual stage (64: ResNet18)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_flag("--small-stem", small_stem, "one 3x3 convolution instead of ImageNet's stem (small images)");
  app.add_option("--validation-size", validation_size,
                 "training objects held out for validation (default: 10 %)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--data-seed", data_seed, "which training objects are held out")->capture_default_str();
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  const auto pg = flags.finish(data_seed);
  const TrainConfig& cfg = flags.cfg;

  const MvcnnIndex index = index_mvcnn(data_dir, view0, view1);
  const auto n_train = static_cast<std::int64_t>(index.train.size());
  if (validation_size < 0) validation_size = n_train / 10;
  TORCH_CHECK(validation_size > 0 && validation_size < n_train, "--validation-size ", validation_size,
              " must leave training objects among the ", n_train, " found, and hold out at least one");
  std::fprintf(stderr, "modelnet40: %zu classes, %lld train / %lld test objects, views %s and %s\n",
               index.classes.size(), static_cast<long long>(n_train),
               static_cast<long long>(index.test.size()), view_name(view0).c_str(),
               view_name(view1).c_str());
  // A seeded hold-out of training objects for validation.
  auto gen = at::detail::createCPUGenerator(data_seed + 7919);
  const at::Tensor perm = at::randperm(n_train, gen, at::kLong);
  std::vector<MvcnnObject> train, validation;
  for (std::int64_t i = 0; i < n_train; ++i) {
    const auto& o = index.train[static_cast<std::size_t>(perm[i].item<std::int64_t>())];
    (i < validation_size ? validation : train).push_back(o);
  }
  const Splits data{load_mvcnn_views(train, image_size), load_mvcnn_views(validation, image_size),
                    load_mvcnn_views(index.test, image_size)};
  std::fprintf(stderr, "loaded %lldx%lld views: %lld train / %lld validation / %lld test, policy %s\n",
               static_cast<long long>(data.train.x[0].size(2)), static_cast<long long>(data.train.x[0].size(3)),
               static_cast<long long>(data.train.size()), static_cast<long long>(data.validation.size()),
               static_cast<long long>(data.test.size()), cfg.policy.c_str());

  nlohmann::json args = flags.json();
  args.update({{"dataset", "modelnet40"}, {"data_dir", data_dir}, {"view0", view0}, {"view1", view1},
               {"image_size", data.train.x[0].size(2)}, {"width", width}, {"small_stem", small_stem},
               {"data_seed", data_seed}, {"classes", index.classes.size()},
               {"train_size", data.train.size()}, {"validation_size", data.validation.size()},
               {"test_size", data.test.size()}});
  const auto classes = static_cast<std::int64_t>(index.classes.size());
  const nlohmann::json summary =
      train_with_policy(make_net(cfg.seed, classes, width, small_stem), data, cfg, args, pg);
  if (flags.rank == 0) print_summary(summary, cfg.out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_main("modelnet40", [&] { return run(argc, argv); });
}
