#pragma once
/// \file
/// `DataParallel`: data-parallel balanced training of a `MultiModalNet` over a c10d
/// process group, so that every rank measures the same d_speed and takes the same steps.

#include <concepts>
#include <cstdint>
#include <exception>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/arg.h>
#include <torch/nn/module.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/distributed/collective.h"
#include "mmbalance/fusion/running_mean.h"
#include "mmbalance/model/multimodal_net.h"

namespace mmbalance {

/// Options for `DataParallel`.
///
/// Example:
/// ```
/// DataParallel dp(net, process_group, DataParallelOptions().bucket_cap_mb(25));
/// ```
struct DataParallelOptions {
  /// Gradients are flattened into buckets of at most this many MiB; each bucket is one
  /// all-reduce, and all buckets are in flight together.
  TORCH_ARG(double, bucket_cap_mb) = 25.0;
};

/// Call `synchronize(loss)` after `backward()` and hand what it returns to the balancer:
/// ```
/// auto pg = make_process_group(ProcessGroupOptions("tcp://127.0.0.1:29500", rank, world));
/// DataParallel dp(net, pg);                 // rank 0's parameters and buffers everywhere
/// RandomPolicy policy(RandomOptions().seed(agree_on_seed(pg, seed)));
/// for (auto& batch : my_shard) {            // each rank: its own rows of the global batch
///   StepKind kind = balancer.next_step();   // the same kind on every rank
///   auto loss = modality_specific_loss(net->forward(batch.x0, batch.x1, kind), batch.target);
///   optimizer.zero_grad();
///   loss.backward();
///   balancer.observe(dp.synchronize(loss)); // gradients averaged before the meter sees them
///   optimizer.step();
/// }
/// dp.synchronize_buffers();                 // before evaluating or saving
/// ```
/// What is identical on every rank after `synchronize`: the gradients (averaged), the
/// returned loss (averaged), and the fusion modules' staged gate sums (added up over
/// ranks, then committed by the balancer), so the gate means equal what one process with
/// the combined batch computes. Parameters stay identical because they start identical and every rank's
/// optimizer applies the same gradients; hence the meter's d_speed and the balancer's step
/// kinds are the same everywhere. BatchNorm normalises with each rank's local batch (as
/// PyTorch's DDP does by default); its running statistics drift apart per rank until
/// `synchronize_buffers()` averages them.
///
/// Every rank must call every collective method (`synchronize`, `synchronize_buffers`,
/// `all_reduce_sum`, `barrier`) in the same order. A rank that dies or stops
/// makes the others throw within the process group's timeout.
template <MultiModalModel Net>
class DataParallel {
 public:
  DataParallel(Net net, c10::intrusive_ptr<CollectiveBackend> process_group,
               DataParallelOptions options = {})
      : net_(std::move(net)), pg_(std::move(process_group)), options_(options) {
    TORCH_CHECK(pg_, "DataParallel: the process group is null");
    TORCH_CHECK(options_.bucket_cap_mb() > 0, "DataParallel: bucket_cap_mb must be positive, got ",
                options_.bucket_cap_mb());
    check_same_model_shape();
    broadcast_from_rank0();
  }

  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int rank() const { return pg_->getRank(); }
  int world_size() const { return pg_->getSize(); }
  const c10::intrusive_ptr<CollectiveBackend>& process_group() const { return pg_; }

  /// After `backward()`: averages the gradients over all ranks (bucketed), adds up the
  /// fusion modules' staged gate sums in place, and returns this step's loss
  /// averaged over all ranks (detached), which is what the balancer should observe. No
  /// host read.
  at::Tensor synchronize(const at::Tensor& loss) {
    TORCH_CHECK(loss.defined() && loss.numel() == 1, "DataParallel::synchronize: loss must be a "
                "scalar, got ", detail::shape_string(loss));
    const double inverse_world = 1.0 / world_size();

    // Gradients, in parameter order, cut into buckets of one device and dtype.
    std::vector<at::Tensor> grads;
    for (const auto& p : net_->parameters()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "DataParallel: sparse gradients are not supported");
      grads.push_back(p.grad());
    }
    std::vector<Bucket> buckets = make_buckets(grads);

    // The loss and the fusion modules' staged gate sums (double, on the modules' device)
    // travel together in one more small bucket; the gate sums come back added up over
    // ranks, in place, for the balancer to commit.
    std::vector<at::Tensor> extras;
    for (auto& mean : gate_means_) extras.push_back(mean->staged());
    const at::Device device = extras.empty() ? loss.device() : extras.front().device();
    // A copy even where the loss is already double here: the reduced sum is written back
    // into this bucket's sources, and the caller's loss must stay as it was.
    extras.insert(extras.begin(), loss.detach().reshape({1}).to(device, at::kDouble, false, /*copy=*/true));
    Bucket extra{extras, at::cat(extras)};
    buckets.push_back(std::move(extra));

    all_reduce(buckets, "all-reduce of gradients");

    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i + 1 < buckets.size(); ++i) {
      buckets[i].flat.mul_(inverse_world);
    }
    for (const auto& b : buckets) scatter(b);
    return (extras.front() * inverse_world).reshape({}).to(loss.scalar_type());
  }

  /// Averages the floating-point buffers outside the fusion modules (BatchNorm's running
  /// mean and variance) over all ranks. The running mean then equals one process's with
  /// the combined batches (it is linear in the batch means); the running variance leaves
  /// out the spread between ranks' batch means. Call before evaluating or saving.
  void synchronize_buffers() {
    std::vector<at::Tensor> buffers;
    for (const auto& b : local_buffers()) {
      if (at::isFloatingType(b.scalar_type())) buffers.push_back(b);
    }
    std::vector<Bucket> buckets = make_buckets(buffers);
    all_reduce(buckets, "all-reduce of buffers");
    at::NoGradGuard no_grad;
    for (auto& b : buckets) {
      b.flat.mul_(1.0 / world_size());
      scatter(b);
    }
  }

  /// Adds `t` up over all ranks, in place (counts, metrics). Pass
  /// `dp.sum_across_ranks()` to `probe_utilization`.
  void all_reduce_sum(at::Tensor& t) {
    TORCH_CHECK(t.is_contiguous(), "DataParallel::all_reduce_sum: needs a contiguous tensor");
    std::vector<at::Tensor> one{t};
    detail::run_collective(*pg_, "all-reduce", [&] { return pg_->allreduce(one); });
  }

  /// A callable that adds a tensor up over all ranks in place.
  auto sum_across_ranks() {
    return [this](at::Tensor& t) { all_reduce_sum(t); };
  }

  /// Rank 0's parameters and buffers to every rank (the constructor does this; call it
  /// again after rank 0 alone loaded weights).
  void broadcast_from_rank0() {
    std::vector<at::Tensor> state;
    for (const auto& p : net_->parameters()) state.push_back(p);
    for (const auto& b : net_->buffers()) state.push_back(b);
    std::vector<Bucket> buckets = make_buckets(state);
    c10d::BroadcastOptions opts;
    opts.rootRank = 0;
    for (auto& b : buckets) {
      std::vector<at::Tensor> one{b.flat};
      detail::run_collective(*pg_, "broadcast of the model",
                             [&] { return pg_->broadcast(one, opts); });
    }
    at::NoGradGuard no_grad;
    for (auto& b : buckets) scatter(b);
  }

  /// Blocks until every rank has called it.
  void barrier() {
    detail::run_collective(*pg_, "barrier", [&] { return pg_->barrier(); });
  }

 private:
  // Tensors flattened into one contiguous buffer, and where each came from.
  struct Bucket {
    std::vector<at::Tensor> sources;
    at::Tensor flat;
  };

  static std::vector<at::Tensor> flattened(const std::vector<at::Tensor>& ts) {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(t.reshape({-1}));
    return out;
  }

  // Consecutive tensors of one device and dtype, up to bucket_cap_mb per bucket.
  std::vector<Bucket> make_buckets(const std::vector<at::Tensor>& tensors) const {
    const auto cap = static_cast<std::int64_t>(options_.bucket_cap_mb() * 1024 * 1024);
    std::vector<Bucket> buckets;
    std::int64_t bytes = 0;
    for (const auto& t : tensors) {
      const std::int64_t size = t.numel() * static_cast<std::int64_t>(t.element_size());
      const bool fits = !buckets.empty() && bytes + size <= cap &&
                        buckets.back().sources.front().device() == t.device() &&
                        buckets.back().sources.front().scalar_type() == t.scalar_type();
      if (!fits) {
        buckets.push_back({});
        bytes = 0;
      }
      buckets.back().sources.push_back(t);
      bytes += size;
    }
    for (auto& b : buckets) b.flat = at::cat(flattened(b.sources));
    return buckets;
  }

  // Sums each bucket over all ranks; all buckets are in flight together.
  void all_reduce(std::vector<Bucket>& buckets, const char* what) {
    try {
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      works.reserve(buckets.size());
      for (auto& b : buckets) {
        std::vector<at::Tensor> one{b.flat};
        works.push_back(pg_->allreduce(one));
      }
      for (auto& w : works) w->wait();
    } catch (const std::exception& e) {
      detail::collective_failed(*pg_, what, e);
    }
  }

  // Copies a reduced bucket back into the tensors it was made from.
  static void scatter(const Bucket& b) {
    std::int64_t offset = 0;
    for (const auto& t : b.sources) {
      t.copy_(b.flat.narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }

  std::vector<at::Tensor> local_buffers() const {
    std::unordered_set<const void*> fusion;
    for (const auto& means : {net_->gate_means(), net_->squeeze_means()}) {
      for (const auto& m : means) {
        for (const auto& b : m->buffers()) fusion.insert(b.unsafeGetTensorImpl());
      }
    }
    std::vector<at::Tensor> out;
    for (const auto& b : net_->buffers()) {
      if (!fusion.count(b.unsafeGetTensorImpl())) out.push_back(b);
    }
    return out;
  }

  // Every rank must hold a model of the same shape; checked with one all-reduce so that
  // all ranks fail together rather than hang in a mismatched collective.
  void check_same_model_shape() {
    std::int64_t count = 0, numel = 0;
    for (const auto& p : net_->parameters()) {
      ++count;
      numel += p.numel();
    }
    for (const auto& b : net_->buffers()) {
      ++count;
      numel += b.numel();
    }
    std::vector<at::Tensor> one{at::tensor({count, numel, -count, -numel}, at::kLong)
                                    .to(detail::collective_device(*pg_))};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::MAX;
    detail::run_collective(*pg_, "model check", [&] { return pg_->allreduce(one, opts); });
    const at::Tensor host = one[0].to(at::kCPU);
    const std::int64_t* v = host.data_ptr<std::int64_t>();
    TORCH_CHECK(v[0] == -v[2] && v[1] == -v[3], "DataParallel: the ranks hold different models "
                "(this rank: ", count, " tensors with ", numel, " elements; largest across "
                "ranks: ", v[0], " tensors, ", v[1], " elements; smallest: ", -v[2], ", ", -v[3],
                ")");
  }

  Net net_;
  std::vector<RunningMean> gate_means_ = net_->gate_means();
  c10::intrusive_ptr<CollectiveBackend> pg_;
  DataParallelOptions options_;
};

}  // namespace mmbalance
