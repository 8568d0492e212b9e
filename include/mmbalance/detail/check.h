#pragma once
/// \file
/// Small helpers for error messages.

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

namespace mmbalance::detail {

/// "[8, 3, 28, 28]" for error messages.
inline std::string shape_string(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (std::int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

}  // namespace mmbalance::detail
