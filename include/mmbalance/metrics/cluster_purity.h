#pragma once
/// \file
/// How well a representation separates the classes without any classifier: the purity of
/// a k-means clustering of features scaled to [-1, 1] per dimension (the measure of
/// Wei et al., "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024,
/// GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py, `reinit_score` and
/// `purity_score`, which use scikit-learn's MinMaxScaler(feature_range=(-1, 1)) and
/// KMeans(n_clusters=classes, random_state=0)). Computed on the CPU in double precision.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>

#include "mmbalance/detail/check.h"

namespace mmbalance {

/// Options for `kmeans`: scikit-learn's KMeans defaults.
///
/// Example:
/// ```
/// const at::Tensor clusters = kmeans(scaled, KMeansOptions(10).runs(1));
/// ```
struct KMeansOptions {
  explicit KMeansOptions(std::int64_t clusters) : clusters_(clusters) {}
  /// The number of clusters.
  TORCH_ARG(std::int64_t, clusters);
  /// Independent k-means++ starts; the clustering with the least inertia is kept
  /// (scikit-learn's `n_init`, 10 before its version 1.4).
  TORCH_ARG(std::int64_t, runs) = 10;
  /// Lloyd iterations per run at most (`max_iter`).
  TORCH_ARG(std::int64_t, max_iterations) = 300;
  /// A run stops when the centers moved less than this times the mean per-dimension
  /// variance of the data, summed over the centers' squared moves (`tol`).
  TORCH_ARG(double, tolerance) = 1e-4;
  /// Seed of the starts' draws (`random_state`).
  TORCH_ARG(std::uint64_t, seed) = 0;
};

/// `x` (rows, dimensions) scaled per dimension to [-1, 1] over its rows, computed in
/// doubles: a dimension whose range is below 10 epsilons of x's type (float's for types
/// narrower than double) counts as constant and is divided by 1 instead, so it stays near
/// -1 (scikit-learn's MinMaxScaler, `_handle_zeros_in_scale`, since its version 1.0).
inline at::Tensor min_max_scale(const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() == 2 && x.size(0) > 0, "min_max_scale: expected (rows, dimensions) with rows, got ",
              detail::shape_string(x));
  const double constant_below = 10 * (x.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON);
  const at::Tensor d = x.to(at::kCPU, at::kDouble);
  const at::Tensor low = std::get<0>(d.min(0));
  const at::Tensor range = std::get<0>(d.max(0)) - low;
  return (d - low) / at::where(range < constant_below, at::ones_like(range), range) * 2 - 1;
}

namespace detail {

// Squared Euclidean distance of every row of x to every row of centers (rows, centers),
// as differences (exact for near points, unlike the |a|^2 - 2ab + |b|^2 form).
inline at::Tensor squared_distances(const at::Tensor& x, const at::Tensor& centers) {
  return (x.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(-1);
}

// Index i drawn with probability (cumulative[i] - cumulative[i - 1]) / cumulative[-1] (the
// cumulative sums of the weights); uniform for all-zero weights.
inline std::int64_t draw_weighted(const at::Tensor& cumulative, std::mt19937_64& engine) {
  const double total = cumulative[-1].item<double>();
  const std::int64_t n = cumulative.size(0);
  if (!(total > 0)) return std::uniform_int_distribution<std::int64_t>(0, n - 1)(engine);
  const double u = std::uniform_real_distribution<double>(0, total)(engine);
  const std::int64_t i = at::searchsorted(cumulative, at::scalar_tensor(u, at::kDouble)).item<std::int64_t>();
  return std::min(i, n - 1);
}

// Greedy k-means++ (scikit-learn's `_kmeans_plusplus`): the first center a uniform row,
// each next one the best of 2 + ln(k) rows drawn in proportion to the squared distance to
// the nearest center so far, best meaning the least summed squared distance after it.
inline at::Tensor kmeans_plus_plus(const at::Tensor& x, std::int64_t k, std::mt19937_64& engine) {
  const std::int64_t n = x.size(0);
  const auto trials = 2 + static_cast<std::int64_t>(std::log(static_cast<double>(k)));
  std::vector<std::int64_t> chosen{std::uniform_int_distribution<std::int64_t>(0, n - 1)(engine)};
  at::Tensor nearest = squared_distances(x, x[chosen[0]].unsqueeze(0)).squeeze(1);
  for (std::int64_t c = 1; c < k; ++c) {
    const at::Tensor cumulative = nearest.cumsum(0);
    std::vector<std::int64_t> candidates;
    for (std::int64_t t = 0; t < trials; ++t) candidates.push_back(draw_weighted(cumulative, engine));
    const at::Tensor index = at::tensor(candidates, at::kLong);
    const at::Tensor after = at::minimum(nearest.unsqueeze(1), squared_distances(x, x.index_select(0, index)));
    const std::int64_t best = after.sum(0).argmin().item<std::int64_t>();  // the first of equals
    chosen.push_back(candidates[static_cast<std::size_t>(best)]);
    nearest = after.select(1, best).contiguous();
  }
  return x.index_select(0, at::tensor(chosen, at::kLong));
}

struct Clustering {
  at::Tensor assignment;  // (rows) cluster indices
  double inertia = 0;     // summed squared distance of the rows to their centers
};

// One update of Lloyd's iterations, as scikit-learn's `lloyd_iter_chunked_dense`: the mean
// of each cluster's rows under `assignment`; each empty cluster takes one of the rows
// farthest from their centers (`distance`, farthest first), which leaves its old cluster
// (`_relocate_empty_clusters_dense`; nothing moves when every row sits on its center). A
// cluster left with no row keeps its center.
inline at::Tensor updated_centers(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& assignment,
                                  const at::Tensor& distance) {
  const std::int64_t k = centers.size(0);
  at::Tensor sums = at::zeros_like(centers).index_add_(0, assignment, x);
  at::Tensor counts = at::zeros({k}, x.options()).index_add_(0, assignment, at::ones({x.size(0)}, x.options()));
  const at::Tensor empty = (counts == 0).nonzero().flatten();
  if (empty.numel() > 0 && distance.max().item<double>() > 0) {
    const at::Tensor far = std::get<1>(distance.topk(std::min(empty.numel(), x.size(0))));
    for (std::int64_t e = 0; e < far.size(0); ++e) {
      const std::int64_t row = far[e].item<std::int64_t>(), to = empty[e].item<std::int64_t>();
      const std::int64_t from = assignment[row].item<std::int64_t>();
      sums[from] -= x[row];
      counts[from] -= 1;
      sums[to] = x[row];
      counts[to] = 1;
    }
  }
  const at::Tensor held = (counts > 0).unsqueeze(1);
  return at::where(held, sums / counts.clamp_min(1).unsqueeze(1), centers);
}

// Lloyd's iterations from `centers`: stops when no row changes cluster, or the centers'
// summed squared move is at most `tolerance`, or after `iterations`; the rows then go to
// their nearest final center.
inline Clustering lloyd(const at::Tensor& x, at::Tensor centers, std::int64_t iterations, double tolerance) {
  at::Tensor distances = squared_distances(x, centers);
  at::Tensor assignment = distances.argmin(1);
  for (std::int64_t it = 0; it < iterations; ++it) {
    const at::Tensor moved =
        updated_centers(x, centers, assignment, distances.gather(1, assignment.unsqueeze(1)).squeeze(1));
    const double shift = (moved - centers).pow(2).sum().item<double>();
    centers = moved;
    distances = squared_distances(x, centers);
    const at::Tensor next = distances.argmin(1);
    const bool stable = at::equal(next, assignment);
    assignment = next;
    if (stable || shift <= tolerance) break;
  }
  return {assignment, distances.gather(1, assignment.unsqueeze(1)).sum().item<double>()};
}

}  // namespace detail

/// The cluster of each row of `x` (rows, dimensions) under k-means: `options.runs()`
/// greedy k-means++ starts drawn from one engine seeded with `options.seed()`, each
/// refined by Lloyd's iterations, the one with the least inertia kept (the first of
/// equals). Deterministic for a given `x` and options. Returns (rows) int64 cluster indices
/// on the CPU.
inline at::Tensor kmeans(const at::Tensor& x, const KMeansOptions& options) {
  TORCH_CHECK(x.defined() && x.dim() == 2, "kmeans: expected (rows, dimensions), got ", detail::shape_string(x));
  TORCH_CHECK(options.clusters() >= 1 && options.clusters() <= x.size(0), "kmeans: ", options.clusters(),
              " clusters for ", x.size(0), " rows");
  TORCH_CHECK(options.runs() >= 1 && options.max_iterations() >= 1 && options.tolerance() >= 0,
              "kmeans: runs and max_iterations must be >= 1 and tolerance >= 0, got ", options.runs(), ", ",
              options.max_iterations(), ", ", options.tolerance());
  const at::Tensor d = x.to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(at::isfinite(d).all().item<bool>(), "kmeans: the rows hold values that are not finite");
  const double tolerance = options.tolerance() * d.var(0, false).mean().item<double>();
  std::mt19937_64 engine(options.seed());
  detail::Clustering best{at::Tensor(), std::numeric_limits<double>::infinity()};
  for (std::int64_t r = 0; r < options.runs(); ++r) {
    detail::Clustering run = detail::lloyd(d, detail::kmeans_plus_plus(d, options.clusters(), engine),
                                           options.max_iterations(), tolerance);
    if (run.inertia < best.inertia || !best.assignment.defined()) best = std::move(run);
  }
  return best.assignment;
}

/// The share of rows whose label is the most common label of their cluster: each cluster
/// counts its majority label's rows, summed over clusters, over all rows (1: every cluster
/// holds one class). `labels` and `clusters` are (rows) integer tensors.
inline double cluster_purity(const at::Tensor& labels, const at::Tensor& clusters) {
  TORCH_CHECK(labels.defined() && clusters.defined() && labels.dim() == 1 && clusters.sizes() == labels.sizes() &&
                  labels.size(0) > 0,
              "cluster_purity: labels and clusters must be the same (rows) with rows, got ", detail::shape_string(labels),
              " and ", detail::shape_string(clusters));
  const at::Tensor y = labels.to(at::kCPU, at::kLong), c = clusters.to(at::kCPU, at::kLong);
  TORCH_CHECK(y.min().item<std::int64_t>() >= 0 && c.min().item<std::int64_t>() >= 0,
              "cluster_purity: labels and clusters must be >= 0");
  const std::int64_t classes = y.max().item<std::int64_t>() + 1;
  const std::int64_t groups = c.max().item<std::int64_t>() + 1;
  const at::Tensor table = at::zeros({groups * classes}, at::kLong).index_add_(0, c * classes + y, at::ones_like(y));
  const std::int64_t majority = std::get<0>(table.view({groups, classes}).max(1)).sum().item<std::int64_t>();
  return static_cast<double>(majority) / static_cast<double>(y.size(0));
}

}  // namespace mmbalance
