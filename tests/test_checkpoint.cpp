#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <type_traits>

#include <unistd.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;
namespace fs = std::filesystem;

namespace {

// An archive's bytes behind a well-formed checkpoint header (written here by hand: magic,
// payload size and FNV-1a checksum, little-endian), so that they reach LibTorch's reader.
std::string with_checkpoint_header(const std::string& payload) {
  std::string file(mmbalance::detail::kCheckpointMagic);
  for (const std::uint64_t v : {static_cast<std::uint64_t>(payload.size()), mmbalance::detail::fnv1a(payload)}) {
    for (int i = 0; i < 8; ++i) file += static_cast<char>((v >> (8 * i)) & 0xff);
  }
  return file + payload;
}

fs::path temp_file(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("mmbalance_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir / name;
}

// Steps [first, last) of the deterministic run of `train_steps` (two branches) or
// `train_plans` (N branches), as plans.
template <class NetT, class BalancerT>
std::vector<StepPlan> run_steps(NetT& net, torch::optim::Optimizer& opt, BalancerT& balancer,
                                int first, int last) {
  if constexpr (std::is_same_v<NetT, Net>) {
    std::vector<StepPlan> plans;
    for (const StepKind kind : train_steps(net, opt, balancer, first, last, 4)) {
      plans.push_back(kind);
    }
    return plans;
  } else {
    return train_plans(net, opt, balancer, first, last, 4);
  }
}

template <class NetT, class BalancerT>
void check_resume_is_exact(NetT make_net(std::uint64_t), BalancerT make_balancer(NetT&),
                           const std::string& name) {
  const int total = 14, split = 6;
  // Uninterrupted.
  auto full = make_net(31);
  auto opt_full = make_sgd(full);
  auto bal_full = make_balancer(full);
  auto plans_full = run_steps(full, opt_full, bal_full, 0, total);

  // Interrupted after `split` steps; resumed in fresh objects.
  auto first = make_net(31);
  auto opt_first = make_sgd(first);
  auto bal_first = make_balancer(first);
  auto plans = run_steps(first, opt_first, bal_first, 0, split);
  const auto path = temp_file(name).string();
  save_checkpoint(path, first, opt_first, bal_first);
  CHECK_FALSE(fs::exists(path + ".tmp"));

  auto resumed = make_net(77);  // other initial values: all must come from the file
  auto opt_resumed = make_sgd(resumed);
  auto bal_resumed = make_balancer(resumed);
  load_checkpoint(path, resumed, opt_resumed, bal_resumed);
  auto rest = run_steps(resumed, opt_resumed, bal_resumed, split, total);
  plans.insert(plans.end(), rest.begin(), rest.end());

  CHECK(plans == plans_full);
  CHECK(same_state(*full, *resumed));
  CHECK(torch::equal(bal_full.meter().accumulated(), bal_resumed.meter().accumulated()));
  CHECK(bal_full.step() == bal_resumed.step());
  CHECK(bal_full.epoch() == bal_resumed.epoch());
  CHECK(bal_full.total_plan_counts() == bal_resumed.total_plan_counts());
  CHECK(bal_full.last_speeds().speeds == bal_resumed.last_speeds().speeds);
  CHECK(std::isfinite(bal_resumed.last_speeds().spread));
  CHECK(bal_full.last_speeds().spread == bal_resumed.last_speeds().spread);
  if (bal_full.branches() == 2) CHECK(bal_full.last_d_speed() == bal_resumed.last_d_speed());
  // Branches were held after the resume, so the resumed policy state was exercised.
  CHECK(std::count_if(plans.begin() + split, plans.end(),
                      [](const StepPlan& p) { return !p.is_regular(); }) > 0);
}

Net two_branches(std::uint64_t seed) { return small_net(seed); }

}  // namespace

TEST_CASE("save -> load -> continue equals an uninterrupted guided run bit for bit",
          "[checkpoint]") {
  check_resume_is_exact<Net, GuidedBalancer>(
      two_branches,
      [](Net& net) {
        return GuidedBalancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
      },
      "guided.pt");
}

TEST_CASE("save -> load -> continue equals an uninterrupted random run bit for bit",
          "[checkpoint]") {
  check_resume_is_exact<Net, RandomBalancer>(
      two_branches,
      [](Net& net) { return RandomBalancer(net, RandomPolicy(RandomOptions().seed(3))); },
      "random.pt");
}

TEST_CASE("save -> load -> continue is exact with lagged d_speed reads", "[checkpoint]") {
  check_resume_is_exact<Net, GuidedBalancer>(
      two_branches,
      [](Net& net) {
        return GuidedBalancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
                              BalancerOptions().check_every_step(false).speed_read(
                                  SpeedRead::previous_step));
      },
      "guided_lagged.pt");
}

TEST_CASE("save -> load -> continue is exact for three branches, guided and random",
          "[checkpoint][n-way]") {
  check_resume_is_exact<ThreeWay, Balancer<GuidedPolicy>>(
      small_three_way,
      [](ThreeWay& net) {
        return Balancer<GuidedPolicy>(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
      },
      "guided_three.pt");
  check_resume_is_exact<ThreeWay, Balancer<RandomPolicy>>(
      small_three_way,
      [](ThreeWay& net) {
        return Balancer<RandomPolicy>(net, RandomPolicy(RandomOptions().seed(5)));
      },
      "random_three.pt");
  check_resume_is_exact<ThreeWay, Balancer<GuidedPolicy>>(
      small_three_way,
      [](ThreeWay& net) {
        return Balancer<GuidedPolicy>(
            net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)),
            BalancerOptions().check_every_step(false).speed_read(SpeedRead::previous_step));
      },
      "guided_three_lagged.pt");
}

TEST_CASE("A three-branch checkpoint is refused by a two-branch network, nothing changed",
          "[checkpoint][n-way][bad-input]") {
  ThreeWay three = small_three_way(33);
  auto opt3 = make_sgd(three);
  Balancer<GuidedPolicy> bal3(three, GuidedPolicy());
  train_plans(three, opt3, bal3, 0, 5, 4);
  const auto path = temp_file("three.pt").string();
  save_checkpoint(path, three, opt3, bal3);

  TwoWay two = small_two_way();
  auto opt2 = make_sgd(two);
  Balancer<GuidedPolicy> bal2(two, GuidedPolicy());
  train_plans(two, opt2, bal2, 0, 3, 4);
  const auto model_before = two.clone();
  const auto opt_before = optimizer_state(opt2);
  const auto balancer_before = saved_bytes(bal2);
  CHECK_THROWS_WITH(load_checkpoint(path, two, opt2, bal2),
                    Catch::Contains("checkpoint " + path + " was made for another architecture") &&
                        Catch::Contains("(79 vs 52 parameters and buffers)"));
  CHECK(same_state(*two, *model_before));
  CHECK(optimizer_state(opt2) == opt_before);
  CHECK(saved_bytes(bal2) == balancer_before);
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
                    Catch::Contains("checkpoint " + junk + " is not an mmbalance checkpoint"));
  CHECK_THROWS_WITH(load_checkpoint(junk + ".missing", net, opt, balancer),
                    Catch::Contains("cannot read checkpoint " + junk + ".missing"));

  // A plain LibTorch archive of the module, as torch::save writes it.
  torch::serialize::OutputArchive plain;
  net->save(plain);
  const auto module_only = temp_file("module_only.pt").string();
  plain.save_to(module_only);
  CHECK_THROWS_WITH(load_checkpoint(module_only, net, opt, balancer),
                    Catch::Contains("is not an mmbalance checkpoint"));

  // The same archive behind a well-formed header and checksum (made here by hand): it
  // reaches LibTorch's reader and lacks the architecture record.
  std::ostringstream archive_bytes;
  plain.save_to(archive_bytes);
  const auto wrapped = temp_file("wrapped_module.pt").string();
  std::ofstream(wrapped, std::ios::binary) << with_checkpoint_header(archive_bytes.str());
  CHECK_THROWS_WITH(load_checkpoint(wrapped, net, opt, balancer),
                    Catch::Contains("has no architecture record"));
}

TEST_CASE("A damaged checkpoint is refused by its checksum before LibTorch reads it",
          "[checkpoint][bad-input]") {
  auto net = small_net(38);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net);
  train_steps(net, opt, balancer, 0, 2, 4);
  const auto path = temp_file("to_damage.pt").string();
  save_checkpoint(path, net, opt, balancer);
  std::ifstream in(path, std::ios::binary);
  const std::string good{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  const auto damaged = temp_file("damaged.pt").string();
  const auto before = net.clone();
  auto try_load = [&](const std::string& bytes) {
    std::ofstream(damaged, std::ios::binary | std::ios::trunc) << bytes;
    load_checkpoint(damaged, net, opt, balancer);
  };
  std::string flipped = good;
  flipped[good.size() / 2] = static_cast<char>(flipped[good.size() / 2] ^ 0x10);
  CHECK_THROWS_WITH(try_load(flipped), Catch::Contains("checkpoint " + damaged + " is damaged") &&
                                           Catch::Contains("checksum"));
  CHECK_THROWS_WITH(try_load(good.substr(0, good.size() - 100)),
                    Catch::Contains("is damaged") && Catch::Contains("truncated or extended"));
  CHECK_THROWS_WITH(try_load(good + "x"), Catch::Contains("truncated or extended"));
  std::string huge = good;  // a size field of 2^63
  huge[mmbalance::detail::kCheckpointMagic.size() + 7] = static_cast<char>(0x80);
  CHECK_THROWS_WITH(try_load(huge), Catch::Contains("truncated or extended"));
  CHECK(same_state(*net, *before));
  CHECK_NOTHROW(try_load(good));
}

TEST_CASE("A damaged archive behind a valid checksum is refused by its zip records' CRC-32 "
          "and bounds before LibTorch parses it", "[checkpoint][bad-input]") {
  auto net = small_net(39);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net);
  train_steps(net, opt, balancer, 0, 2, 4);
  const auto path = temp_file("to_rewrap.pt").string();
  save_checkpoint(path, net, opt, balancer);
  std::ifstream in(path, std::ios::binary);
  const std::string file{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  const std::string payload = file.substr(mmbalance::detail::kCheckpointHeader);
  const auto damaged = temp_file("rewrapped.pt").string();
  const auto before = net.clone();
  auto try_load = [&](const std::string& archive) {
    std::ofstream(damaged, std::ios::binary | std::ios::trunc) << with_checkpoint_header(archive);
    load_checkpoint(damaged, net, opt, balancer);
  };
  // Little-endian fields of the zip format, read here by hand.
  const auto u16 = [&](std::size_t at) {
    return static_cast<std::size_t>(static_cast<unsigned char>(payload[at]) |
                                    static_cast<unsigned char>(payload[at + 1]) << 8);
  };
  REQUIRE(payload.substr(0, 4) == std::string("PK\x03\x04", 4));  // the first record's local header
  const std::string first_name = payload.substr(30, u16(26));
  const std::size_t first_data = 30 + u16(26) + u16(28);
  std::string flipped = payload;
  flipped[first_data + 3] = static_cast<char>(flipped[first_data + 3] ^ 0x01);
  CHECK_THROWS_WITH(try_load(flipped), Catch::Contains("checkpoint " + damaged + " is damaged: record " +
                                                       first_name + " does not match its CRC-32"));
  CHECK_THROWS_WITH(try_load(payload.substr(0, payload.size() - 1)),
                    Catch::Contains("is damaged: its archive has no zip directory at its end"));
  std::string moved_record = payload;  // the first record's local header no longer where the directory says
  moved_record[0] = 'X';
  CHECK_THROWS_WITH(try_load(moved_record), Catch::Contains("record " + first_name + " has no local header at offset 0"));
  // The zip64 end record (LibTorch writes one; its locator is the 20 bytes before the end
  // record and names its offset) pointing at another directory than the end record does.
  const std::size_t locator = payload.size() - 22 - 20;
  REQUIRE(payload.substr(locator, 4) == std::string("PK\x06\x07", 4));
  std::size_t zip64_record = 0;
  for (int i = 7; i >= 0; --i) zip64_record = (zip64_record << 8) | static_cast<unsigned char>(payload[locator + 8 + static_cast<std::size_t>(i)]);
  std::string far_directory = payload;  // the directory's offset past the end, in both records
  far_directory[payload.size() - 22 + 19] = static_cast<char>(0x7f);
  far_directory[zip64_record + 48 + 3] = static_cast<char>(0x7f);
  CHECK_THROWS_WITH(try_load(far_directory), Catch::Contains("does not fit in its"));
  std::string other_directory = payload;
  other_directory[zip64_record + 48] = static_cast<char>(other_directory[zip64_record + 48] ^ 0x08);
  CHECK_THROWS_WITH(try_load(other_directory), Catch::Contains("its archive's two zip directory records disagree"));
  CHECK(same_state(*net, *before));
  CHECK_NOTHROW(try_load(payload));
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


TEST_CASE("A checkpoint that does not fit the balancer or the optimizer is refused before "
          "anything changes", "[checkpoint][bad-input]") {
  auto net = small_net(36);
  auto opt = make_sgd(net);
  GuidedBalancer guided(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
  train_steps(net, opt, guided, 0, 6, 4);
  const auto path = temp_file("guided_run.pt").string();
  save_checkpoint(path, net, opt, guided);

  // Another state to load into: trained differently, so any overwrite would show.
  auto target = small_net(37);
  auto target_opt = make_sgd(target);
  RandomBalancer random(target, RandomPolicy(RandomOptions().seed(1)));
  train_steps(target, target_opt, random, 0, 3, 4);
  const auto model_before = target.clone();
  const auto opt_before = optimizer_state(target_opt);
  const auto balancer_before = saved_bytes(random);

  SECTION("another policy") {
    CHECK_THROWS_WITH(load_checkpoint(path, target, target_opt, random),
                      Catch::Contains("cannot restore checkpoint " + path) &&
                          Catch::Contains("made with policy 'mmbalance.guided'") &&
                          Catch::Contains("unchanged"));
  }
  SECTION("an optimizer of another type (after the model was already loaded)") {
    auto adam = torch::optim::Adam(target->parameters(), torch::optim::AdamOptions(1e-3));
    GuidedBalancer guided_target(target, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
    const auto guided_before = saved_bytes(guided_target);
    const auto adam_before = optimizer_state(adam);
    CHECK_THROWS_WITH(load_checkpoint(path, target, adam, guided_target),
                      Catch::Contains("cannot restore checkpoint " + path));
    CHECK(saved_bytes(guided_target) == guided_before);
    CHECK(optimizer_state(adam) == adam_before);
  }
  CHECK(same_state(*target, *model_before));
  CHECK(optimizer_state(target_opt) == opt_before);
  CHECK(saved_bytes(random) == balancer_before);
}

TEST_CASE("A record that fails after the optimizer was loaded leaves no optimizer state behind",
          "[checkpoint][bad-input]") {
  // A trained run's records (SGD with momentum buffers) and a gradient record of the wrong
  // size, which is read last, behind a valid header and checksum.
  auto net = small_net(38);
  auto opt = make_sgd(net);
  GuidedBalancer guided(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
  train_steps(net, opt, guided, 0, 4, 4);
  torch::serialize::OutputArchive archive, model, optim, bal;
  archive.write("architecture", architecture_fingerprint(*net));
  archive.write("modules", module_description(*net));
  net->save(model);
  opt.save(optim);
  guided.save(bal);
  archive.write("model", model);
  archive.write("optimizer", optim);
  archive.write("balancer", bal);
  archive.write("grad_defined", at::ones({1}, at::kByte));
  std::ostringstream bytes;
  archive.save_to(bytes);
  const auto path = temp_file("bad_gradient_record.pt").string();
  std::ofstream(path, std::ios::binary) << with_checkpoint_header(bytes.str());

  // A fresh optimizer has no momentum buffers; the failed load must not leave the file's.
  auto target = small_net(39);
  auto target_opt = make_sgd(target);
  GuidedBalancer target_balancer(target, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)));
  const auto model_before = target.clone();
  const auto opt_before = optimizer_state(target_opt);
  const auto balancer_before = saved_bytes(target_balancer);
  REQUIRE(target_opt.state().empty());
  CHECK_THROWS_WITH(load_checkpoint(path, target, target_opt, target_balancer),
                    Catch::Contains("gradient record has 1 entries") &&
                        Catch::Contains("unchanged"));
  CHECK(target_opt.state().empty());
  CHECK(optimizer_state(target_opt) == opt_before);
  CHECK(same_state(*target, *model_before));
  CHECK(saved_bytes(target_balancer) == balancer_before);
}

TEST_CASE("A checkpoint made with other module options (MMTM gate_scale) is refused",
          "[checkpoint][bad-input]") {
  auto make = [](double gate_scale) {
    torch::manual_seed(0);
    auto opts = [](int64_t in) { return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}); };
    return Net(ConvBranch(opts(3)), ConvBranch(opts(1)),
               {{0, MMTM(MMTMOptions(4, 4).gate_scale(gate_scale))},
                {1, MMTM(MMTMOptions(8, 8).gate_scale(gate_scale))}});
  };
  auto net = make(2.0);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net);
  const auto path = temp_file("gate_scale.pt").string();
  save_checkpoint(path, net, opt, balancer);
  auto other = make(1.0);
  auto other_opt = make_sgd(other);
  GuidedBalancer other_balancer(other);
  const auto before = other.clone();
  CHECK_THROWS_WITH(load_checkpoint(path, other, other_opt, other_balancer),
                    Catch::Contains("modules with other options") &&
                        Catch::Contains("gate_scale=2") && Catch::Contains("gate_scale=1"));
  CHECK(same_state(*other, *before));
}

TEST_CASE("Module descriptions written before the one network read in today's words; a hostile "
          "one is left as it is", "[checkpoint][bad-input]") {
  using mmbalance::detail::upgraded_module_description;
  CHECK(upgraded_module_description("mmbalance::MultiModalNet(stages=4, taps=[1, 2, 3])(\n"
                                    "  (fusion0): mmbalance::MMTM(dim0=64, dim1=32, ratio=4, gate_scale=2)\n") ==
        "mmbalance::MultiModalNet(branches=2, taps=[(1, 1), (2, 2), (3, 3)])(\n"
        "  (fusion0): mmbalance::MMTM(dims=[64, 32], ratio=4, gate_scale=2)\n");
  CHECK(upgraded_module_description("mmbalance::MultiModalNet(stages=2, taps=[])") ==
        "mmbalance::MultiModalNet(branches=2, taps=[])");
  CHECK(upgraded_module_description("mmbalance::NWayMultiModalNet(branches=3, taps=[(1, 1, 0)])(\n"
                                    "  (fusion0): mmbalance::NWayMMTM(dims=[4, 4, 2], ratio=4, gate_scale=2)\n") ==
        "mmbalance::MultiModalNet(branches=3, taps=[(1, 1, 0)])(\n"
        "  (fusion0): mmbalance::MMTM(dims=[4, 4, 2], ratio=4, gate_scale=2)\n");
  // A megabyte of digits where a list should end: no match, no crash, nothing changed.
  const std::string hostile = "mmbalance::MultiModalNet(stages=1, taps=[" + std::string(1 << 20, '7');
  CHECK(upgraded_module_description(hostile) == hostile);
  const std::string unterminated = "mmbalance::MMTM(dim0=" + std::string(1 << 20, '3');
  CHECK(upgraded_module_description(unterminated) == unterminated);
}

TEST_CASE("Upgrading a module description is linear in its length: many repeated old names",
          "[checkpoint][bad-input]") {
  std::string repeated;
  for (int i = 0; i < 200000; ++i) repeated += "mmbalance::NWayMMTM(mmbalance::MMTM(dim0=1, dim1=2, ";
  const std::string upgraded = mmbalance::detail::upgraded_module_description(repeated);
  CHECK(upgraded.size() == repeated.size() - 200000 * 7);  // "NWay" gone, "dim0=1, dim1=2" -> "dims=[1, 2]"
  CHECK(upgraded.find("NWay") == std::string::npos);
}

TEST_CASE("Fingerprints and descriptions written while MMTM's joint layer was named 'squeeze' "
          "match today's, and nothing else is renamed",
          "[checkpoint]") {
  using mmbalance::detail::with_joint_layer_renamed;
  const std::string today = "param fusion0.joint.weight:[5, 8]\nparam fusion0.joint.bias:[5]\n"
                            "param joint.weight:[3, 3]\nparam user.squeeze.weight:[2]\n";
  // The same model as recorded before the rename: its MMTM entries under the old name
  // (one of them an MMTM at the root).
  const std::string before = "param fusion0.squeeze.weight:[5, 8]\nparam fusion0.squeeze.bias:[5]\n"
                             "param squeeze.weight:[3, 3]\nparam user.squeeze.weight:[2]\n";
  CHECK(with_joint_layer_renamed(before, today, false) == today);
  CHECK_NOTHROW(mmbalance::detail::check_same_architecture(before, today, "old.ckpt"));
  // Another shape is another architecture, reported under the name it was recorded with.
  const std::string other = "param fusion0.squeeze.weight:[6, 8]\nparam fusion0.squeeze.bias:[5]\n"
                            "param squeeze.weight:[3, 3]\nparam user.squeeze.weight:[2]\n";
  CHECK_THROWS_WITH(mmbalance::detail::check_same_architecture(other, today, "old.ckpt"),
                    Catch::Contains("entry 0 is 'param fusion0.squeeze.weight:[6, 8]'"));
  // A module of the user's own with a "squeeze" submodule keeps it; an indented match is
  // no match.
  const std::string user = "param user.squeeze.weight:[2]\n";
  CHECK(with_joint_layer_renamed(user, "param user.joint.weight:[3]\n", false) == user);
  CHECK(with_joint_layer_renamed("param a.squeeze.w:[1]\n", "xparam a.joint.w:[1]\n", false) ==
        "param a.squeeze.w:[1]\n");
  // Module descriptions: the layer's line, at its indentation.
  const std::string described = "  (fusion0): mmbalance::MMTM(dims=[4, 4], ratio=4, gate_scale=2)(\n"
                                "    (joint): torch::nn::Linear(in_features=8, out_features=2, bias=true)\n  )";
  const std::string described_before = "  (fusion0): mmbalance::MMTM(dims=[4, 4], ratio=4, gate_scale=2)(\n"
                                       "    (squeeze): torch::nn::Linear(in_features=8, out_features=2, bias=true)\n  )";
  CHECK(with_joint_layer_renamed(described_before, described, true) == described);
  CHECK_NOTHROW(mmbalance::detail::check_same_modules(described_before, described, "old.ckpt"));
}

TEST_CASE("A hostile fingerprint of many 'squeeze' entries renames none the model lacks",
          "[checkpoint][bad-input]") {
  // Two hundred thousand lines naming a "squeeze", against a model's one: each looked up
  // once in the model's lines, none renamed, the file refused.
  std::string hostile;
  for (int i = 0; i < 200000; ++i) hostile += "param m" + std::to_string(i) + ".squeeze.weight:[4]\n";
  const std::string current = "param fusion0.joint.weight:[4]\n";
  const std::string upgraded = mmbalance::detail::with_joint_layer_renamed(hostile, current, false);
  CHECK(upgraded == hostile);
  CHECK_THROWS_WITH(mmbalance::detail::check_same_architecture(hostile, current, "hostile.ckpt"),
                    Catch::Contains("was made for another architecture"));
}
