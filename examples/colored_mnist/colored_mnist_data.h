#pragma once
// Colored-and-gray MNIST (Kim et al. 2019, as used by the paper): m0 is the digit drawn in
// a colour (3x28x28: colour x gray intensity, black background), m1 the gray image
// (1x28x28). In training the colour is the palette colour of the label plus Gaussian
// noise; in validation and test it is a palette colour drawn independently of the label,
// with the same noise. See docs/examples.md and docs/results-notes.md.

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "mnist_readers.h"
#include "common/splits.h"

namespace mmbalance::examples {


/// The palette, one RGB colour per class 0..9.
inline at::Tensor palette() {
  return at::tensor({0.90f, 0.10f, 0.10f,  0.10f, 0.80f, 0.10f,  0.10f, 0.20f, 0.95f,
                     0.95f, 0.90f, 0.10f,  0.90f, 0.10f, 0.90f,  0.10f, 0.90f, 0.90f,
                     1.00f, 0.55f, 0.00f,  0.50f, 0.10f, 0.70f,  0.60f, 0.35f, 0.15f,
                     0.75f, 0.75f, 0.75f})
      .view({10, 3});
}

/// Colours gray digits: colour = palette[label] (or a random palette colour) + N(0, variance)
/// per channel, clipped to [0, 1].
inline Split colorize(const LabelledImages& gray, bool colour_follows_label, double variance,
                      at::Generator& gen) {
  TORCH_CHECK(variance >= 0, "colour noise variance must be >= 0, got ", variance);
  const std::int64_t n = gray.labels.size(0);
  const at::Tensor index =
      colour_follows_label ? gray.labels : at::randint(10, {n}, gen, at::kLong);
  const at::Tensor colour =
      (palette().index_select(0, index) + std::sqrt(variance) * at::randn({n, 3}, gen))
          .clamp(0, 1);
  return {{gray.images * colour.view({n, 3, 1, 1}), gray.images}, gray.labels};
}

inline LabelledImages take(const LabelledImages& d, const at::Tensor& index) {
  return {d.images.index_select(0, index), d.labels.index_select(0, index)};
}

/// Splits `train_pool` (seeded permutation) into `train_size` training and
/// `validation_size` validation digits, and colours them and `test`.
inline Splits make_colored_splits(const LabelledImages& train_pool,
                                         const LabelledImages& test, std::int64_t train_size,
                                         std::int64_t validation_size, double variance,
                                         std::uint64_t seed) {
  const std::int64_t pool = train_pool.labels.size(0);
  TORCH_CHECK(train_size > 0 && validation_size > 0 && train_size + validation_size <= pool,
              "cannot take ", train_size, " training and ", validation_size,
              " validation digits from ", pool);
  auto gen = at::detail::createCPUGenerator(seed);
  const at::Tensor perm = at::randperm(pool, gen, at::kLong);
  const auto train = take(train_pool, perm.narrow(0, 0, train_size));
  const auto val = take(train_pool, perm.narrow(0, train_size, validation_size));
  return {colorize(train, true, variance, gen), colorize(val, false, variance, gen),
          colorize(test, false, variance, gen)};
}

}  // namespace mmbalance::examples
