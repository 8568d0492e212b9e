#pragma once
/// \file
/// The three kinds of training step of balanced multi-modal learning (docs/algorithm.md §5).

#include <cstdint>
#include <ostream>
#include <string_view>

namespace mmbalance {

/// Which step a training iteration takes.
enum class StepKind : std::uint8_t {
  /// Normal forward/backward with both modalities; feeds the learning-speed meter.
  regular = 0,
  /// Every fusion module applies its running-average gate to branch 0, so branch 0
  /// gets no information from m1 and must learn from m0 itself.
  rebalance_m0 = 1,
  /// Symmetric: branch 1 is cut from m0.
  rebalance_m1 = 2,
};

inline constexpr int kNumStepKinds = 3;

constexpr std::string_view to_string(StepKind kind) {
  switch (kind) {
    case StepKind::regular: return "regular";
    case StepKind::rebalance_m0: return "rebalance_m0";
    case StepKind::rebalance_m1: return "rebalance_m1";
  }
  return "invalid";
}

inline std::ostream& operator<<(std::ostream& os, StepKind kind) { return os << to_string(kind); }

}  // namespace mmbalance
