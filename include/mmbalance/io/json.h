#pragma once
/// \file
/// nlohmann::json conversions of the library's reports, for logs and summaries. Not in the
/// umbrella header: include it (and link `mmbalance::json`) where you write JSON.

#include <cmath>

#include <nlohmann/json.hpp>

#include "mmbalance/balancing/balancer.h"
#include "mmbalance/metrics/learning_speed_meter.h"
#include "mmbalance/metrics/utilization_probe.h"

namespace mmbalance {

/// JSON has no NaN: an undefined value (NaN, ±inf) becomes null.
inline nlohmann::json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

/// {"regular": n, "rebalance_m0": n, "rebalance_m1": n}, named by `to_string(StepKind)`.
inline nlohmann::json step_counts_json(const StepCounts& counts) {
  nlohmann::json j = nlohmann::json::object();
  for (int k = 0; k < kNumStepKinds; ++k) {
    j[std::string(to_string(static_cast<StepKind>(k)))] = counts[static_cast<std::size_t>(k)];
  }
  return j;
}

inline void to_json(nlohmann::json& j, const SpeedSummary& s) {
  j = {{"s_m1_given_m0", number_or_null(s.s_m1_given_m0)},
       {"s_m0_given_m1", number_or_null(s.s_m0_given_m1)},
       {"d_speed", number_or_null(s.d_speed)}};
}

inline void to_json(nlohmann::json& j, const UtilizationReport& r) {
  j = {{"accuracy", number_or_null(r.accuracy)},
       {"accuracy0", number_or_null(r.accuracy0)},
       {"accuracy0_cut", number_or_null(r.accuracy0_cut)},
       {"accuracy1", number_or_null(r.accuracy1)},
       {"accuracy1_cut", number_or_null(r.accuracy1_cut)},
       {"u_m1_given_m0", number_or_null(r.u_m1_given_m0)},
       {"u_m0_given_m1", number_or_null(r.u_m0_given_m1)},
       {"d_util", number_or_null(r.d_util)},
       {"samples", r.samples}};
}

}  // namespace mmbalance
