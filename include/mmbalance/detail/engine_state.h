#pragma once
/// \file
/// Saving and restoring a policy's `std::mt19937_64` in a checkpoint: the engine's state
/// as the text the C++ standard defines for it, so a resumed run draws what it would have.

#include <random>
#include <sstream>
#include <string>

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>

namespace mmbalance::detail {

inline std::string engine_state(const std::mt19937_64& engine) {
  std::ostringstream state;
  state << engine;
  return state.str();
}

/// The engine `state` (a saved `engine_state`) describes; anything else throws, naming
/// `owner` (the policy).
inline std::mt19937_64 engine_from_state(const c10::IValue& state, const char* owner) {
  TORCH_CHECK(state.isString(), owner, ": damaged state in checkpoint");
  std::mt19937_64 engine;
  std::istringstream in(state.toStringRef());
  in >> engine;
  TORCH_CHECK(!in.fail(), owner, ": corrupt generator state in checkpoint");
  return engine;
}

}  // namespace mmbalance::detail
