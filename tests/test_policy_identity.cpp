#include <catch2/catch.hpp>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {

// A policy whose identity and state are set by the test: it saves one number, and records
// which form of load ran and with which version.
template <std::int64_t Version, bool ReadsEarlier = false>
struct Versioned {
  static constexpr PolicyIdentity checkpoint_identity{"test.versioned", Version};
  std::int64_t value = 0;
  std::int64_t loaded_version = -1;  // -1: load(archive), else load(archive, version)

  StepPlan next_plan() { return StepPlan::regular(); }
  void save(torch::serialize::OutputArchive& archive) const { archive.write("value", value); }
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue v;
    archive.read("value", v);
    value = v.toInt();
    loaded_version = -1;
  }
  void load(torch::serialize::InputArchive& archive, std::int64_t version)
    requires ReadsEarlier
  {
    load(archive);
    loaded_version = version;
  }
};

// One policy under two C++ names (a rename, or a move to another namespace): the same
// declared identity and state format.
template <int Name>
struct Counter {
  static constexpr PolicyIdentity checkpoint_identity{"test.counter", 1};
  std::int64_t count = 0;
  StepPlan next_plan() {
    ++count;
    return StepPlan::regular();
  }
  void save(torch::serialize::OutputArchive& archive) const { archive.write("count", count); }
  void load(torch::serialize::InputArchive& archive) {
    c10::IValue v;
    archive.read("count", v);
    count = v.toInt();
  }
};

// A vanilla balancer's record with its identity entries replaced by `write_identity`'s, as
// an earlier version (or a damaged file) would have it.
template <class WriteIdentity>
std::string record_with(WriteIdentity write_identity) {
  Net net = small_net(3);
  VanillaBalancer vanilla(net);
  torch::serialize::InputArchive in;
  std::istringstream bytes(saved_bytes(vanilla));
  in.load_from(bytes);
  torch::serialize::OutputArchive out;
  for (const std::string key : {"branches", "meter_steps", "step", "epoch", "skipped", "warmup_epochs",
                                "speed_read"}) {
    c10::IValue v;
    REQUIRE(in.try_read(key, v));
    out.write(key, v);
  }
  for (const std::string key : {"accumulated", "group_numel", "last_speeds", "epoch_counts", "total_counts"}) {
    at::Tensor t;
    REQUIRE(in.try_read(key, t));
    out.write(key, t);
  }
  write_identity(out);
  std::stringstream s;
  out.save_to(s);
  return s.str();
}

std::string record_with_type(const std::string& type) {
  return record_with([&](torch::serialize::OutputArchive& out) { out.write("policy_type", type); });
}

template <class From, class To>
void save_then_load(From from, To& to) {
  Net net = small_net(3);
  Balancer<From> saving(net, std::move(from));
  Balancer<To> loading(net, to);
  load_saved(loading, saved_bytes(saving));
  to = loading.policy();
}

}  // namespace

TEST_CASE("A balancer's record names its policy by the identity the policy declares, not its C++ type",
          "[policy_identity][checkpoint]") {
  Net net = small_net(3);
  GuidedBalancer guided(net, GuidedPolicy());
  torch::serialize::InputArchive in;
  std::istringstream bytes(saved_bytes(guided));
  in.load_from(bytes);
  c10::IValue name, version, type;
  REQUIRE(in.try_read("policy_name", name));
  REQUIRE(in.try_read("policy_version", version));
  CHECK(name.toStringRef() == "mmbalance.guided");
  CHECK(version.toInt() == 2);
  CHECK_FALSE(in.try_read("policy_type", type));

  // A renamed type with the same identity loads it, state and all; another policy does not.
  Balancer<Counter<0>> before_rename(net, Counter<0>{}, BalancerOptions().warmup_epochs(0));
  auto opt = make_sgd(net);
  train_steps(net, opt, before_rename, 0, 1);  // next_step() on a policy with only next_plan()
  Balancer<Counter<1>> renamed(net, Counter<1>{}, BalancerOptions().warmup_epochs(0));
  load_saved(renamed, saved_bytes(before_rename));
  CHECK(renamed.policy().count == 1);
  RandomBalancer random(net, RandomPolicy());
  CHECK_THROWS_WITH(load_saved(random, saved_bytes(guided)),
                    Catch::Contains("made with policy 'mmbalance.guided'") &&
                        Catch::Contains("this balancer's policy is 'mmbalance.random'"));
}

TEST_CASE("A policy's state format version: the same loads, an earlier one only into a policy that "
          "reads it (with the version), a later one never", "[policy_identity][checkpoint]") {
  Versioned<1> v1;
  v1.value = 41;
  SECTION("the same version: load(archive)") {
    Versioned<1> to;
    save_then_load(v1, to);
    CHECK(to.value == 41);
    CHECK(to.loaded_version == -1);
  }
  SECTION("an earlier version, read by load(archive, version)") {
    Versioned<2, true> to;
    save_then_load(v1, to);
    CHECK(to.value == 41);
    CHECK(to.loaded_version == 1);
  }
  SECTION("an earlier version, and the policy reads its own only") {
    Versioned<2> to;
    CHECK_THROWS_WITH(save_then_load(v1, to),
                      Catch::Contains("test.versioned state of format version 1") &&
                          Catch::Contains("reads version 2 only"));
    CHECK(to.value == 0);
  }
  SECTION("a later version") {
    Versioned<3> v3;
    Versioned<2, true> to;
    CHECK_THROWS_WITH(save_then_load(v3, to), Catch::Contains("format version 3, newer than this policy's (2)"));
    CHECK(to.value == 0);
  }
}

TEST_CASE("Records from before identities name the policy by its C++ type: the library's map to "
          "their identities, a user's type loads into the same type", "[policy_identity][checkpoint]") {
  // A stateless user policy declares no identity: its record carries its type name.
  struct UserPolicy {
    StepPlan next_plan() { return StepPlan::regular(); }
  };
  Net net = small_net(3);
  VanillaBalancer vanilla(net);
  CHECK_NOTHROW(load_saved(vanilla, record_with_type("mmbalance::VanillaPolicy")));
  Balancer<UserPolicy> user(net, UserPolicy());
  CHECK_NOTHROW(load_saved(user, record_with_type(c10::demangle(typeid(UserPolicy).name()))));
  CHECK_THROWS_WITH(load_saved(user, record_with_type("mmbalance::VanillaPolicy")),
                    Catch::Contains("made with policy 'mmbalance.vanilla'"));
  CHECK_THROWS_WITH(load_saved(vanilla, record_with_type("SomeoneElsesPolicy")),
                    Catch::Contains("made with policy 'SomeoneElsesPolicy'"));
}

TEST_CASE("A damaged identity record is refused, naming what is wrong, and changes nothing",
          "[policy_identity][checkpoint][bad-input]") {
  Net net = small_net(3);
  auto opt = make_sgd(net);
  VanillaBalancer vanilla(net);
  train_steps(net, opt, vanilla, 0, 3);  // a state unlike the records' (a fresh balancer's)
  const std::string before = saved_bytes(vanilla);
  const auto refused = [&](const std::string& record, const std::string& message) {
    CHECK_THROWS_WITH(load_saved(vanilla, record), Catch::Contains(message));
    CHECK(saved_bytes(vanilla) == before);
  };
  refused(record_with([](auto& out) {
            out.write("policy_name", std::int64_t{7});
            out.write("policy_version", std::int64_t{1});
          }),
          "damaged policy name or version");
  refused(record_with([](auto& out) { out.write("policy_name", std::string("mmbalance.vanilla")); }),
          "damaged policy name or version");
  refused(record_with([](auto& out) {
            out.write("policy_name", std::string("mmbalance.vanilla"));
            out.write("policy_version", std::int64_t{-3});
          }),
          "negative policy format version -3");
  refused(record_with([](auto& out) {
            out.write("policy_name", std::string("mmbalance.vanilla"));
            out.write("policy_version", std::int64_t{0});
          }),
          "format version 0, which no declared identity has");
  refused(record_with([](auto&) {}), "names no policy");
  // The same record with a sound identity loads.
  CHECK_NOTHROW(load_saved(vanilla, record_with([](auto& out) {
                  out.write("policy_name", std::string("mmbalance.vanilla"));
                  out.write("policy_version", std::int64_t{1});
                })));
}

namespace {

// The identity `read_policy_identity` finds in a record holding what `write` writes.
template <class Write>
mmbalance::detail::SavedPolicyIdentity identity_in(Write write) {
  torch::serialize::OutputArchive out;
  write(out);
  std::stringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  return mmbalance::detail::read_policy_identity(in);
}

bool is(const mmbalance::detail::SavedPolicyIdentity& id, const std::string& name, std::int64_t version) {
  return id.name == name && id.version == version;
}

// A balancer's record with its policy named `name`, `version` (as a record written before
// the N-branch policies were merged into GuidedPolicy and RandomPolicy).
template <class BalancerT>
std::string renamed_record(const BalancerT& balancer, const std::string& name, std::int64_t version) {
  torch::serialize::InputArchive in;
  std::istringstream bytes(saved_bytes(balancer));
  in.load_from(bytes);
  torch::serialize::OutputArchive out, policy;
  for (const std::string& key : in.keys()) {
    at::Tensor t;
    c10::IValue v;
    if (key == "policy" || key == "policy_name" || key == "policy_version") continue;
    if (in.try_read(key, t)) {
      out.write(key, t);
    } else if (in.try_read(key, v)) {
      out.write(key, v);
    }
  }
  out.write("policy_name", name);
  out.write("policy_version", version);
  balancer.policy().save(policy);
  out.write("policy", policy);
  std::stringstream s;
  out.save_to(s);
  return s.str();
}

// GuidedPolicy's state in the two-branch format of version 1, written by hand.
torch::serialize::InputArchive guided_v1_state(std::int64_t mode, double last_d_speed, std::int64_t q = 3) {
  torch::serialize::OutputArchive out;
  out.write("mode", mode);
  out.write("window_step", std::int64_t{1});
  out.write("last_d_speed", last_d_speed);
  out.write("alpha", 0.1);
  out.write("Q", q);
  std::stringstream bytes;
  out.save_to(bytes);
  torch::serialize::InputArchive in;
  in.load_from(bytes);
  return in;
}

}  // namespace

TEST_CASE("Records of the N-branch guided and random policies read as GuidedPolicy's and "
          "RandomPolicy's version 2, by name and by C++ type", "[policy_identity][checkpoint]") {
  const auto named = [](const std::string& name, std::int64_t version) {
    return identity_in([&](auto& out) {
      out.write("policy_name", name);
      out.write("policy_version", version);
    });
  };
  const auto typed = [](const std::string& type) {
    return identity_in([&](auto& out) { out.write("policy_type", type); });
  };
  CHECK(is(named("mmbalance.guided_n_way", 1), "mmbalance.guided", 2));
  CHECK(is(named("mmbalance.random_n_way", 1), "mmbalance.random", 2));
  CHECK(is(named("mmbalance.guided_n_way", 2), "mmbalance.guided_n_way", 2));  // never written: stays
  CHECK(is(named("mmbalance.guided", 1), "mmbalance.guided", 1));
  CHECK(is(typed("mmbalance::NWayGuidedPolicy"), "mmbalance.guided", 2));
  CHECK(is(typed("mmbalance::NWayRandomPolicy"), "mmbalance.random", 2));
  CHECK(is(typed("mmbalance::GuidedPolicy"), "mmbalance.guided", 1));
  CHECK(is(typed("mmbalance::RandomPolicy"), "mmbalance.random", 1));

  // A whole record named as the N-branch policies' loads, state and all.
  ThreeWay net = small_three_way(7);
  auto opt = make_sgd(net);
  Balancer<GuidedPolicy> guided(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)), BalancerOptions().warmup_epochs(0));
  train_plans(net, opt, guided, 0, 2, 100);  // regular, then a window opened: one step into it
  REQUIRE(guided.policy().window_open());
  Balancer<GuidedPolicy> resumed(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(3)), BalancerOptions().warmup_epochs(0));
  load_saved(resumed, renamed_record(guided, "mmbalance.guided_n_way", 1));
  CHECK(saved_bytes(resumed) == saved_bytes(guided));
  Balancer<RandomPolicy> random(net, RandomPolicy(RandomOptions().seed(4)));
  train_plans(net, opt, random, 0, 7, 4);
  Balancer<RandomPolicy> random_resumed(net, RandomPolicy(RandomOptions().seed(4)));
  load_saved(random_resumed, renamed_record(random, "mmbalance.random_n_way", 1));
  CHECK(saved_bytes(random_resumed) == saved_bytes(random));
  RandomPolicy draws = random.policy(), resumed_draws = random_resumed.policy();
  for (int i = 0; i < 10; ++i) CHECK(resumed_draws.next_plan() == draws.next_plan());
}

TEST_CASE("GuidedPolicy reads the two-branch format of version 1: the window holds branch 0 where "
          "the last d_speed was > 0, else branch 1; damaged states are refused, changing nothing",
          "[policy_identity][checkpoint][bad-input]") {
  const auto make = [] { return for_branches(GuidedPolicy(GuidedOptions().alpha(0.1).Q(3)), 2); };
  // A window of Q = 3 with one step taken: two more re-balancing steps, then regular.
  for (const auto& [last_d_speed, kind] : {std::pair{-0.3, StepKind::rebalance_m1}, std::pair{0.2, StepKind::rebalance_m0},
                                           std::pair{double(NAN), StepKind::rebalance_m1}}) {
    CAPTURE(last_d_speed);
    GuidedPolicy p = make();
    auto state = guided_v1_state(1, last_d_speed);
    p.load(state, 1);
    CHECK(p.next_plan() == kind);
    CHECK(p.next_plan() == kind);
    CHECK(p.next_plan() == StepKind::regular);
  }
  GuidedPolicy closed = make();
  auto closed_state = guided_v1_state(0, 0.5);
  closed.load(closed_state, 1);
  CHECK(closed.next_plan() == StepKind::regular);

  GuidedPolicy p = make();
  const std::string before = saved_bytes(p);
  auto bad_mode = guided_v1_state(2, 0.5);
  CHECK_THROWS_WITH(p.load(bad_mode, 1), Catch::Contains("bad mode 2"));
  auto other_q = guided_v1_state(1, 0.5, 4);
  CHECK_THROWS_WITH(p.load(other_q, 1), Catch::Contains("made with Q 4"));
  torch::serialize::InputArchive empty;
  CHECK_THROWS_WITH(p.load(empty, 1), Catch::Contains("damaged state"));
  CHECK(saved_bytes(p) == before);
  auto three = for_branches(GuidedPolicy(GuidedOptions().alpha(0.1).Q(3)), 3);
  auto state = guided_v1_state(1, 0.5);
  CHECK_THROWS_WITH(three.load(state, 1), Catch::Contains("a two-branch state, this policy balances 3"));
}
