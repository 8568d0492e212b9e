#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include <unistd.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;
namespace fs = std::filesystem;

namespace {

fs::path temp_file(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("mmbalance_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir / name;
}

template <class BalancerT>
void check_resume_is_exact(BalancerT make_balancer(Net&), const std::string& name) {
  const int total = 14, split = 6;
  // Uninterrupted.
  auto full = small_net(31);
  auto opt_full = make_sgd(full);
  auto bal_full = make_balancer(full);
  auto kinds_full = train_steps(full, opt_full, bal_full, 0, total, 4);

  // Interrupted after `split` steps; resumed in fresh objects.
  auto first = small_net(31);
  auto opt_first = make_sgd(first);
  auto bal_first = make_balancer(first);
  auto kinds = train_steps(first, opt_first, bal_first, 0, split, 4);
  const auto path = temp_file(name).string();
  save_checkpoint(path, first, opt_first, bal_first);
  CHECK_FALSE(fs::exists(path + ".tmp"));

  auto resumed = small_net(77);  // other initial values: all must come from the file
  auto opt_resumed = make_sgd(resumed);
  auto bal_resumed = make_balancer(resumed);
  load_checkpoint(path, resumed, opt_resumed, bal_resumed);
  auto rest = train_steps(resumed, opt_resumed, bal_resumed, split, total, 4);
  kinds.insert(kinds.end(), rest.begin(), rest.end());

  CHECK(kinds == kinds_full);
  CHECK(same_state(*full, *resumed));
  CHECK(torch::equal(bal_full.meter().accumulated(), bal_resumed.meter().accumulated()));
  CHECK(bal_full.step() == bal_resumed.step());
  CHECK(bal_full.epoch() == bal_resumed.epoch());
  CHECK(bal_full.last_d_speed() == bal_resumed.last_d_speed());
}

}  // namespace

TEST_CASE("save -> load -> continue equals an uninterrupted guided run bit for bit",
          "[checkpoint]") {
  check_resume_is_exact<GuidedBalancer>(
      [](Net& net) {
        return GuidedBalancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
      },
      "guided.pt");
}

TEST_CASE("save -> load -> continue equals an uninterrupted random run bit for bit",
          "[checkpoint]") {
  check_resume_is_exact<RandomBalancer>(
      [](Net& net) { return RandomBalancer(net, RandomPolicy(RandomOptions().seed(3))); },
      "random.pt");
}

TEST_CASE("save -> load -> continue is exact with lagged d_speed reads", "[checkpoint]") {
  check_resume_is_exact<GuidedBalancer>(
      [](Net& net) {
        return GuidedBalancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                              BalancerOptions().check_every_step(false).speed_read(
                                  SpeedRead::previous_step));
      },
      "guided_lagged.pt");
}

TEST_CASE("Loading a checkpoint of another architecture fails clearly and changes nothing",
          "[checkpoint][bad-input]") {
  auto net = small_net(32);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net);
  const auto path = temp_file("small.pt").string();
  save_checkpoint(path, net, opt, balancer);

  torch::manual_seed(0);
  auto opts = [](int64_t in) { return ConvBranchOptions(in, 3).channels({4, 16}).strides({1, 2}); };
  Net other(ConvBranch(opts(3)), ConvBranch(opts(1)), {{0, MMTM(4, 4)}, {1, MMTM(16, 16)}});
  auto other_copy = other.clone();
  auto opt_other = make_sgd(other);
  GuidedBalancer bal_other(other);
  CHECK_THROWS_WITH(load_checkpoint(path, other, opt_other, bal_other),
                    Catch::Contains("was made for another architecture") &&
                        Catch::Contains("[8, 4, 3, 3]") && Catch::Contains("[16, 4, 3, 3]"));
  CHECK(same_state(*other, *other_copy));

  const auto junk = temp_file("junk.pt").string();
  std::ofstream(junk) << "not a checkpoint";
  CHECK_THROWS_WITH(load_checkpoint(junk, net, opt, balancer),
                    Catch::Contains("cannot read checkpoint " + junk));

  torch::serialize::OutputArchive plain;
  net->save(plain);
  const auto module_only = temp_file("module_only.pt").string();
  plain.save_to(module_only);
  CHECK_THROWS_WITH(load_checkpoint(module_only, net, opt, balancer),
                    Catch::Contains("has no architecture record"));
}

TEST_CASE("A balancer state made for other parameter groups is rejected", "[checkpoint][bad-input]") {
  auto net = small_net(33);
  GuidedBalancer balancer(net);
  torch::serialize::OutputArchive out;
  balancer.save(out);
  std::stringstream buffer;
  out.save_to(buffer);

  torch::manual_seed(0);
  auto opts = [](int64_t in) { return ConvBranchOptions(in, 3).channels({4, 16}).strides({1, 2}); };
  Net other(ConvBranch(opts(3)), ConvBranch(opts(1)), {{0, MMTM(4, 4)}, {1, MMTM(16, 16)}});
  GuidedBalancer bal_other(other);
  torch::serialize::InputArchive in;
  in.load_from(buffer);
  CHECK_THROWS_WITH(bal_other.load(in), Catch::Contains("was made for parameter groups with"));
}
