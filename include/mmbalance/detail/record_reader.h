#pragma once
/// \file
/// Reads the entries of a balancer's checkpoint record, refusing a missing or mistyped
/// one by name (every part of the balancer reads its own entries with it).

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/serialize/archive.h>

namespace mmbalance::detail {

struct RecordReader {
  torch::serialize::InputArchive& archive;

  c10::IValue value(const char* key) const {
    c10::IValue v;
    TORCH_CHECK(archive.try_read(key, v), "Balancer::load: no '", key, "' in the balancer's record");
    return v;
  }
  /// On the CPU: a checkpoint is read onto the model's device.
  at::Tensor tensor(const char* key) const {
    at::Tensor t;
    TORCH_CHECK(archive.try_read(key, t), "Balancer::load: no '", key, "' in the balancer's record");
    return t.to(at::kCPU);
  }
  std::int64_t integer(const char* key) const {
    const c10::IValue v = value(key);
    TORCH_CHECK(v.isInt(), "Balancer::load: '", key, "' is not an integer");
    return v.toInt();
  }
  double number(const char* key) const {
    const c10::IValue v = value(key);
    TORCH_CHECK(v.isDouble(), "Balancer::load: '", key, "' is not a number");
    return v.toDouble();
  }
};

}  // namespace mmbalance::detail
