#pragma once
/// \file
/// nlohmann::json conversions of the library's reports, for logs and summaries. Not in the
/// umbrella header: include it (and link `mmbalance::json`) where you write JSON.

#include <cmath>
#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "mmbalance/balancing/balancer.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/metrics/utilization_probe.h"
#include "mmbalance/model/step_plan.h"

namespace mmbalance {

/// JSON has no NaN: an undefined value (NaN, ±inf) becomes null.
inline nlohmann::json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

/// Steps per plan, [regular, branch 0 held, ..., branch N-1 held] as the `Balancer`
/// counts them, as {"regular": n, "rebalance_m0": n, ...}, named by `to_string(StepPlan)`.
inline nlohmann::json plan_counts_json(const std::vector<std::int64_t>& counts) {
  nlohmann::json j = nlohmann::json::object();
  for (std::size_t i = 0; i < counts.size(); ++i) {
    j[to_string(i == 0 ? StepPlan::regular() : StepPlan::hold(i - 1))] = counts[i];
  }
  return j;
}

/// {"regular": n, "rebalance_m0": n, "rebalance_m1": n}: `plan_counts_json` of two branches.
inline nlohmann::json step_counts_json(const StepCounts& counts) {
  return plan_counts_json(std::vector<std::int64_t>(counts.begin(), counts.end()));
}

/// {"speeds": [s_0, ...], "spread": ..., "fastest": k}, and for two branches
/// "s_m1_given_m0", "s_m0_given_m1" and the signed "d_speed"; undefined values are null.
inline void to_json(nlohmann::json& j, const SpeedSummary& s) {
  nlohmann::json speeds = nlohmann::json::array();
  for (const double v : s.speeds) speeds.push_back(number_or_null(v));
  j = {{"speeds", speeds}, {"spread", number_or_null(s.spread)}, {"fastest", s.fastest}};
  if (s.speeds.size() != 2) return;
  j["s_m1_given_m0"] = number_or_null(s.s_m1_given_m0);
  j["s_m0_given_m1"] = number_or_null(s.s_m0_given_m1);
  j["d_speed"] = number_or_null(s.d_speed);
}

/// {"accuracy", "head_accuracy": [...], "cut_accuracy": [...], "utilization": [u_0, ...],
/// "spread", "samples"}, and for two branches also "accuracy0", "accuracy0_cut",
/// "accuracy1", "accuracy1_cut", "u_m1_given_m0", "u_m0_given_m1" and the signed "d_util";
/// undefined values are null.
inline void to_json(nlohmann::json& j, const UtilizationReport& r) {
  const auto numbers = [](const std::vector<double>& v) {
    nlohmann::json a = nlohmann::json::array();
    for (const double x : v) a.push_back(number_or_null(x));
    return a;
  };
  j = {{"accuracy", number_or_null(r.accuracy)},
       {"head_accuracy", numbers(r.head_accuracy)},
       {"cut_accuracy", numbers(r.cut_accuracy)},
       {"utilization", numbers(r.utilization)},
       {"spread", number_or_null(r.spread)},
       {"samples", r.samples}};
  if (r.head_accuracy.size() == 2) {
    j["accuracy0"] = number_or_null(r.accuracy0);
    j["accuracy0_cut"] = number_or_null(r.accuracy0_cut);
    j["accuracy1"] = number_or_null(r.accuracy1);
    j["accuracy1_cut"] = number_or_null(r.accuracy1_cut);
    j["u_m1_given_m0"] = number_or_null(r.u_m1_given_m0);
    j["u_m0_given_m1"] = number_or_null(r.u_m0_given_m1);
    j["d_util"] = number_or_null(r.d_util);
  }
}

}  // namespace mmbalance
