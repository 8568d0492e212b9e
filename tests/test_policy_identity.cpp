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
  CHECK(version.toInt() == 1);
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
