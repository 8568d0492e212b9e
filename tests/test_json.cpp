// io/json.h on its own: it must compile without the rest of the umbrella header.
#include <mmbalance/io/json.h>

#include <catch2/catch.hpp>

using namespace mmbalance;

TEST_CASE("SpeedSummary and UtilizationReport convert to JSON, undefined values as null",
          "[json]") {
  const nlohmann::json speed = SpeedSummary::from_accumulators({1.0, 2.0, 10.0, 2.0});
  CHECK(speed["s_m1_given_m0"].get<double>() == 1.0);  // log10(10 / 1)
  CHECK(speed["s_m0_given_m1"].get<double>() == 0.0);  // log10(2 / 2)
  CHECK(speed["d_speed"].get<double>() == 1.0);
  CHECK(speed["spread"].get<double>() == 1.0);
  CHECK(speed["speeds"] == nlohmann::json::array({1.0, 0.0}));
  CHECK(speed["fastest"].get<std::int64_t>() == 0);
  // A group with no gradient yet: undefined, and JSON has no NaN.
  const nlohmann::json undefined = SpeedSummary::from_accumulators({0.0, 2.0, 10.0, 2.0});
  CHECK(undefined["s_m1_given_m0"].is_null());
  CHECK(undefined["d_speed"].is_null());
  CHECK(undefined["s_m0_given_m1"].get<double>() == 0.0);

  UtilizationReport r;
  r.accuracy = 0.75;
  r.head_accuracy = {0.5, 0.0};
  r.cut_accuracy = {0.25, 0.0};
  r.utilization = {0.5, NAN};
  r.accuracy0 = 0.5;
  r.accuracy0_cut = 0.25;
  r.accuracy1 = 0.0;
  r.accuracy1_cut = 0.0;
  r.u_m1_given_m0 = 0.5;
  r.samples = 8;
  const nlohmann::json j = r;
  CHECK(j["accuracy"].get<double>() == 0.75);
  CHECK(j["accuracy0_cut"].get<double>() == 0.25);
  CHECK(j["u_m1_given_m0"].get<double>() == 0.5);
  CHECK(j["u_m0_given_m1"].is_null());  // A(f1) = 0: undefined
  CHECK(j["d_util"].is_null());
  CHECK(j["spread"].is_null());
  CHECK(j["utilization"] == nlohmann::json::array({0.5, nullptr}));
  CHECK(j["samples"].get<std::int64_t>() == 8);
  CHECK(j.size() == 13);  // the six of any network, and the seven two-branch names

  const nlohmann::json counts = step_counts_json(StepCounts{5, 2, 1});
  CHECK(counts == nlohmann::json{{"regular", 5}, {"rebalance_m0", 2}, {"rebalance_m1", 1}});
}

TEST_CASE("N-branch speeds, utilization and plan counts convert to JSON", "[json]") {
  // accumulators θ_0 θ_1 θ_2, then θ_0' θ_1' θ_2': s = log10(100/1), log10(1/1), undefined
  const nlohmann::json speed = SpeedSummary::from_accumulators({1.0, 1.0, 0.0, 100.0, 1.0, 3.0});
  CHECK(speed["speeds"][0].get<double>() == 2.0);
  CHECK(speed["speeds"][1].get<double>() == 0.0);
  CHECK(speed["speeds"][2].is_null());
  CHECK(speed["spread"].is_null());  // a speed is undefined
  CHECK(speed["fastest"].get<std::int64_t>() == -1);
  const nlohmann::json defined = SpeedSummary::from_speeds({0.5, -0.25, 0.25});
  CHECK(defined["spread"].get<double>() == 0.75);
  CHECK(defined["fastest"].get<std::int64_t>() == 0);
  // The signed two-branch values are not written for three branches.
  CHECK_FALSE(defined.contains("d_speed"));
  CHECK_FALSE(defined.contains("s_m1_given_m0"));
  CHECK(defined.size() == 3);

  UtilizationReport r;
  r.accuracy = 0.5;
  r.head_accuracy = {0.5, 0.25, 0.0};
  r.cut_accuracy = {0.25, 0.25, 0.0};
  r.utilization = {0.5, 0.0, NAN};
  r.spread = 0.5;
  r.samples = 4;
  const nlohmann::json j = r;
  CHECK(j["head_accuracy"] == nlohmann::json::array({0.5, 0.25, 0.0}));
  CHECK(j["utilization"][0].get<double>() == 0.5);
  CHECK(j["utilization"][2].is_null());
  CHECK(j["spread"].get<double>() == 0.5);
  CHECK_FALSE(j.contains("d_util"));  // the signed value is for two branches only
  CHECK(j["samples"].get<std::int64_t>() == 4);

  CHECK(plan_counts_json({7, 1, 2, 3}) ==
        nlohmann::json{{"regular", 7}, {"rebalance_m0", 1}, {"rebalance_m1", 2}, {"rebalance_m2", 3}});
}
