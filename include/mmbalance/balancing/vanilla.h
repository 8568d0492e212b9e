#pragma once
/// \file
/// Vanilla training: regular steps only (d_speed is still measured).

#include "mmbalance/balancing/policy.h"

namespace mmbalance {

struct VanillaPolicy {
  StepKind next_step() const { return StepKind::regular; }
};

static_assert(BalancingPolicy<VanillaPolicy>);

}  // namespace mmbalance
