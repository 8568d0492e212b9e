#pragma once
// In-memory data of the example programs: both modalities and the labels per split.

#include <cstdint>

#include <ATen/ATen.h>

namespace mmbalance::examples {

/// One split: modality 0, modality 1, labels. Images may be stored as uint8 (0..255) to
/// save memory; `model_input` turns a batch of them into floats in [0, 1].
struct Split {
  at::Tensor x0, x1, y;
  std::int64_t size() const { return y.size(0); }
};

struct Splits {
  Split train, validation, test;
};

/// A batch on `device` as the model takes it: floats; uint8 images scaled to [0, 1].
inline at::Tensor model_input(const at::Tensor& x, at::Device device) {
  const at::Tensor on_device = x.to(device, /*non_blocking=*/true);
  return on_device.scalar_type() == at::kByte ? on_device.to(at::kFloat).div_(255.0) : on_device;
}

}  // namespace mmbalance::examples
