#pragma once
/// \file
/// Small helpers for error messages.

#include <exception>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

/// An exception's message without LibTorch's C++ backtrace.
inline std::string error_text(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace mmbalance::detail
