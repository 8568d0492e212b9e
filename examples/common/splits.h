#pragma once
// In-memory data of the example programs: every modality and the labels per split.

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace mmbalance::examples {

/// Makes the inputs (one tensor per modality, in branch order) of the samples `ids` of a
/// data source. With an `augment_seed` it applies training-time augmentation drawn from
/// that seed (so a resumed run draws the same); without one, the evaluation transform.
using InputLoader = std::function<std::vector<at::Tensor>(
    const at::Tensor& ids, std::optional<std::uint64_t> augment_seed)>;

/// One split: every modality, labels. Either in memory (`x[k]` for modality k; images may
/// be uint8 0..255 to save memory) or loaded batch by batch (`load` with the source's
/// `ids` of the split's rows). `model_input` turns a batch into floats (uint8 images into
/// [0, 1]).
struct Split {
  std::vector<at::Tensor> x;
  at::Tensor y;
  InputLoader load{};
  at::Tensor ids{};

  std::int64_t size() const { return y.size(0); }

  /// Rows [begin, begin + length).
  Split slice(std::int64_t begin, std::int64_t length) const {
    auto part = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, begin, length) : t; };
    Split s{{}, part(y), load, part(ids)};
    for (const at::Tensor& m : x) s.x.push_back(part(m));
    return s;
  }

  /// The inputs of rows `rows` (CPU, uint8 or float), one tensor per modality.
  std::vector<at::Tensor> inputs(const at::Tensor& rows,
                                 std::optional<std::uint64_t> augment_seed = {}) const {
    if (load) return load(ids.index_select(0, rows), augment_seed);
    std::vector<at::Tensor> out;
    for (const at::Tensor& m : x) out.push_back(m.index_select(0, rows));
    return out;
  }
};

struct Splits {
  Split train, validation, test;
  /// Rows taken out of the training data for a policy that measures generalization
  /// (Gradient-Blending); none otherwise.
  std::optional<Split> held_out{};
};

/// `data` with the last floor(n · `fraction`) of its n training rows moved to `held_out`
/// (the training rows are in random order already); at least one row must stay on each
/// side, or the error names `flag`.
inline Splits hold_out(const Splits& data, double fraction, const std::string& flag) {
  const std::int64_t n = data.train.size();
  // floor, with a margin for products such as 0.29 * 100 = 28.999...
  const auto held = static_cast<std::int64_t>(std::floor(static_cast<double>(n) * fraction + 1e-9));
  TORCH_CHECK(held >= 1 && held < n, flag, " ", fraction, ": holding out that part of ", n,
              " training rows leaves ", held, " held out and ", n - held,
              " to train on; both need at least one");
  Splits out = data;
  out.train = data.train.slice(0, n - held);
  out.held_out = data.train.slice(n - held, held);
  return out;
}

/// A batch on `device` as the model takes it: floats; uint8 images scaled to [0, 1].
inline at::Tensor model_input(const at::Tensor& x, at::Device device) {
  const at::Tensor on_device = x.to(device, /*non_blocking=*/true);
  return on_device.scalar_type() == at::kByte ? on_device.to(at::kFloat).div_(255.0) : on_device;
}

}  // namespace mmbalance::examples
