// Data-parallel training on c10d (Gloo over 127.0.0.1): ranks run as threads of this
// process, each with its own process group, through a fresh FileStore.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <torch/cuda.h>

#include <mmbalance/distributed.h>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

std::string fresh_store() {
  static std::atomic<int> counter{0};
  const fs::path p = fs::temp_directory_path() /
                     ("mmbalance-test-store-" + std::to_string(::getpid()) + "-" +
                      std::to_string(counter++));
  fs::remove(p);
  return "file://" + p.string();
}

// Runs body(rank, process_group) for ranks [0, joining) of a group of `world`, one thread
// each. Returns each rank's exception (null if it finished).
// A TCP port on 127.0.0.1 that was free a moment ago.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(fd);
  return ntohs(addr.sin_port);
}

template <class Body>
std::vector<std::exception_ptr> run_ranks(int world, Body body,
                                          std::chrono::milliseconds timeout = 20s,
                                          int joining = -1, std::string store = fresh_store()) {
  if (joining < 0) joining = world;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(joining));
  std::vector<std::thread> threads;
  for (int r = 0; r < joining; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r, make_process_group(ProcessGroupOptions(store, r, world).timeout(timeout)));
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

void rethrow_any(const std::vector<std::exception_ptr>& errors) {
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return mmbalance::detail::error_text(x);
  }
}

// BatchNorm normalises with the local batch, so a rank's half batch differs from the
// combined one: compare with BatchNorm on its (frozen) running statistics.
template <class NetT>
void freeze_batch_norm(NetT& net) {
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (auto* bn = dynamic_cast<torch::nn::BatchNorm2dImpl*>(m.get())) bn->eval();
  }
}

constexpr int kGlobalBatch = 8;
constexpr int kStepsPerEpoch = 4;

// Steps [first, last) of a run in which step i's global batch comes from seed i and this
// rank trains on its contiguous share of the rows (rows·rank/world to rows·(rank+1)/world:
// uneven for 3 ranks), its loss scaled by its share (rows_r·world/rows, passed to
// balancer.loss) so that the ranks' average is the global batch's mean; `sync` turns the
// local loss into the one the balancer observes, `sum` adds a policy's statistics up over
// the ranks. Returns the step kinds (two branches, `small_batch`) or the plans (an
// N-branch network, `n_way_batch`).
template <class NetT, class BalancerT, class Sync>
auto train_share(NetT& net, torch::optim::Optimizer& optimizer, BalancerT& balancer, int first,
                 int last, int rank, int world, Sync&& sync,
                 const std::function<void(at::Tensor&)>& sum = {}) {
  constexpr bool two_branches = std::is_same_v<NetT, Net>;
  std::vector<std::conditional_t<two_branches, StepKind, StepPlan>> kinds;
  const std::int64_t begin = kGlobalBatch * rank / world, end = kGlobalBatch * (rank + 1) / world;
  const double scale = static_cast<double>((end - begin) * world) / kGlobalBatch;
  const at::Device device = net->parameters().front().device();
  const auto share = [&](const at::Tensor& t) { return t.narrow(0, begin, end - begin).to(device); };
  for (int i = first; i < last; ++i) {
    auto [kind, loss] = [&] {
      if constexpr (two_branches) {
        const auto b = small_batch(kGlobalBatch, static_cast<std::uint64_t>(i));
        const StepKind kind = balancer.next_step();
        const at::Tensor x0 = share(b.x0), x1 = share(b.x1);
        return std::pair(kind, balancer.loss(net->forward(x0, x1, kind), share(b.target), {x0, x1}, scale));
      } else {
        const auto b = n_way_batch(net->num_branches(), kGlobalBatch, static_cast<std::uint64_t>(i));
        const StepPlan plan = balancer.next_plan();
        std::vector<at::Tensor> inputs;
        for (const auto& x : b.inputs) inputs.push_back(share(x));
        return std::pair(plan, balancer.loss(net->forward(inputs, plan), share(b.target), inputs, scale));
      }
    }();
    optimizer.zero_grad();
    loss.backward();
    balancer.observe(sync(loss), sum);
    optimizer.step();
    kinds.push_back(kind);
    if ((i + 1) % kStepsPerEpoch != 0) continue;
    using Policy = std::remove_cvref_t<decltype(balancer.policy())>;
    if constexpr (ObservesEpochLosses<Policy>) {
      // A training sample (seeds 900, 901) and held-out data (950, 951), each rank its rows.
      const auto shard = [&](std::uint64_t seed) {
        std::vector<std::conditional_t<two_branches, MultiModalBatch, Batch>> batches;
        for (std::uint64_t s = seed; s < seed + 2; ++s) {
          if constexpr (two_branches) {
            const auto b = small_batch(kGlobalBatch, s);
            batches.push_back({share(b.x0), share(b.x1), share(b.target)});
          } else {
            const auto b = n_way_batch(net->num_branches(), kGlobalBatch, s);
            std::vector<at::Tensor> inputs;
            for (const auto& x : b.inputs) inputs.push_back(share(x));
            batches.push_back({std::move(inputs), share(b.target)});
          }
        }
        return batches;
      };
      if (sum) {
        balancer.end_epoch(net, shard(900), shard(950), sum);
      } else {
        balancer.end_epoch(net, shard(900), shard(950));
      }
    } else if constexpr (ObservesEpochFeatures<Policy>) {
      // Features: every rank all the rows of a training sample (seeds 900, 901) and of
      // held-out data (950, 951), as a clustering needs them together.
      const auto all_rows = [&](std::uint64_t seed) {
        std::vector<std::conditional_t<two_branches, MultiModalBatch, Batch>> batches;
        for (std::uint64_t s = seed; s < seed + 2; ++s) {
          if constexpr (two_branches) {
            batches.push_back(small_batch(kGlobalBatch, s));
          } else {
            batches.push_back(n_way_batch(net->num_branches(), kGlobalBatch, s));
          }
        }
        return batches;
      };
      if (sum) {
        balancer.end_epoch(net, all_rows(900), all_rows(950), optimizer, sum);
      } else {
        balancer.end_epoch(net, all_rows(900), all_rows(950), optimizer);
      }
    } else {
      balancer.end_epoch();
    }
  }
  return kinds;
}


// Largest |a - b| / max(|b|) over every parameter and buffer.
double max_relative_difference(const torch::nn::Module& a, const torch::nn::Module& b) {
  double worst = 0;
  auto compare = [&](const at::Tensor& x, const at::Tensor& y) {
    const double scale = std::max(y.abs().max().item<double>(), 1e-12);
    worst = std::max(worst, (x.to(at::kDouble) - y.to(at::kDouble)).abs().max().item<double>() / scale);
  };
  const auto pb = b.named_parameters();
  for (const auto& p : a.named_parameters()) compare(p.value(), pb[p.key()]);
  const auto bb = b.named_buffers();
  for (const auto& x : a.named_buffers()) {
    if (x.value().numel() > 0) compare(x.value(), bb[x.key()]);
  }
  return worst;
}

// On CUDA, cuDNN picks other kernels for other batch sizes (and may use TF32), so the
// one-process run agrees only to about 1e-3 and its step kinds are not compared: a d_speed
// near 0 may take the other sign. The ranks must still agree with each other exactly.
// Returns the policies as they end: one process's, rank 0's, rank 1's.
template <class Policy, class NetT = Net>
std::vector<Policy> check_matches_single_process(const Policy& policy, at::Device device = at::kCPU,
                                                 NetT make_net(std::uint64_t) = two_branch_net,
                                                 double cpu_tolerance = 1e-5, int world = 2) {
  constexpr int kSteps = 16;
  const double tolerance = device.is_cuda() ? 1e-3 : cpu_tolerance;
  NetT single = make_net(0);
  single->to(device);
  freeze_batch_norm(single);
  auto single_opt = make_sgd(single);
  Balancer<Policy> single_balancer(single, policy);
  const auto single_kinds = train_share(single, single_opt, single_balancer, 0, kSteps, 0, 1,
                                        [](const at::Tensor& l) { return l; });

  // Ranks 1.. start from other weights: DataParallel must replace them with rank 0's.
  std::vector<NetT> nets;
  for (int r = 0; r < world; ++r) nets.push_back(make_net(static_cast<std::uint64_t>(r)));
  std::vector<std::remove_const_t<decltype(single_kinds)>> kinds(static_cast<std::size_t>(world));
  std::vector<Policy> policies(static_cast<std::size_t>(world), policy);
  rethrow_any(run_ranks(world, [&](int rank, auto pg) {
    NetT& net = nets[static_cast<std::size_t>(rank)];
    net->to(device);
    freeze_batch_norm(net);
    DataParallel dp(net, pg);
    auto opt = make_sgd(net);
    Balancer<Policy> balancer(net, policy);
    kinds[static_cast<std::size_t>(rank)] =
        train_share(net, opt, balancer, 0, kSteps, rank, world,
                    [&](const at::Tensor& l) { return dp.synchronize(l); }, dp.sum_across_ranks());
    policies[static_cast<std::size_t>(rank)] = balancer.policy();
  }));

  if (!device.is_cuda()) CHECK(kinds[0] == single_kinds);
  std::vector<Policy> ended{single_balancer.policy()};
  for (int r = 0; r < world; ++r) {
    const auto i = static_cast<std::size_t>(r);
    CHECK(kinds[i] == kinds[0]);
    CHECK(max_relative_difference(*nets[i], *single) < tolerance);
    // Step for step the same parameters on every rank, bit for bit.
    CHECK(same_state(*nets[i], *nets[0]));
    ended.push_back(policies[i]);
  }
  return ended;
}

}  // namespace

TEST_CASE("DataParallel, vanilla: 2 ranks match one process on the combined batches",
          "[distributed]") {
  check_matches_single_process(VanillaPolicy());
}

TEST_CASE("DataParallel, joint training: 2 ranks match one process on the fused output's loss",
          "[distributed]") {
  check_matches_single_process(JointTrainingPolicy());
  check_matches_single_process(JointTrainingPolicy(), at::kCPU, small_late_net);
  check_matches_single_process(JointTrainingPolicy(), at::kCPU, small_three_way);
}

TEST_CASE("DataParallel, guided: 2 ranks take the same steps as one process", "[distributed]") {
  // alpha = 0 opens a re-balancing window after every regular step, in the direction of
  // d_speed's sign, so both directions and the gate averages are exercised.
  check_matches_single_process(GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
}

TEST_CASE("DataParallel, three branches: 2 ranks take the same plans as one process",
          "[distributed][n-way]") {
  // alpha = 0: a window after every regular step, holding the fastest branch.
  check_matches_single_process(GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), at::kCPU,
                               small_three_way);
  check_matches_single_process(VanillaPolicy(), at::kCPU, small_three_way);
}

TEST_CASE("DataParallel, OGM-GE: 2 ranks modulate as one process on the combined batches",
          "[distributed][ogm-ge]") {
  // The scores are added up over the ranks before the coefficients, and the noise comes
  // from the same seed on every rank and in the single process.
  check_matches_single_process(OGMGEPolicy(OGMGEOptions().alpha(0.8).seed(4)));
  check_matches_single_process(OGMGEPolicy(OGMGEOptions().alpha(0.8).noise(false)), at::kCPU,
                               small_three_way);
}

TEST_CASE("DataParallel, PMR: 2 ranks keep the prototypes and terms of one process on the combined batches",
          "[distributed][pmr]") {
  // The class sums and scores are added up over the ranks: the same prototypes and the
  // same coefficients on every rank and in the single process.
  const auto ended = check_matches_single_process(PMRPolicy(PMROptions().alpha(1.0)), at::kCPU, small_late_net);
  REQUIRE(ended[0].prototypes().size() == 2);
  CHECK(ended[0].coefficients().sum().item<double>() > 0);  // a branch was behind: the term acted
  for (std::size_t r = 1; r < ended.size(); ++r) {
    CHECK(ended[r].coefficients().equal(ended[0].coefficients()));
    for (std::size_t k = 0; k < 2; ++k) CHECK(ended[r].prototypes()[k].allclose(ended[0].prototypes()[k], 1e-5, 1e-6));
  }
  for (std::size_t k = 0; k < 2; ++k) CHECK(ended[1].prototypes()[k].equal(ended[2].prototypes()[k]));  // rank for rank
  check_matches_single_process(PMRPolicy(PMROptions().alpha(1.0)), at::kCPU, small_three_way);
}

TEST_CASE("DataParallel, OPM: 2 ranks drop the same branch in the same steps and keep one model",
          "[distributed][opm]") {
  // Not against one process: the per-sample drops come from LibTorch's default generator
  // (here shared by the rank threads, in a real run each process's own), so no rank drops
  // the rows one process would. The plans (a seeded draw and scores summed over the
  // ranks) and the scores must agree rank for rank, and so the parameters.
  constexpr int kSteps = 16;
  std::vector<ThreeWay> nets{small_three_way(0), small_three_way(1)};
  std::vector<std::vector<StepPlan>> plans(2);
  std::vector<std::vector<double>> scores(2);
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    ThreeWay& net = nets[static_cast<std::size_t>(rank)];
    freeze_batch_norm(net);
    DataParallel dp(net, pg);
    auto opt = make_sgd(net);
    Balancer<OPMPolicy> balancer(net, OPMPolicy(OPMOptions().p_exe(0.6).seed(3)), BalancerOptions().warmup_epochs(0));
    plans[static_cast<std::size_t>(rank)] =
        train_share(net, opt, balancer, 0, kSteps, rank, 2, [&](const at::Tensor& l) { return dp.synchronize(l); },
                    dp.sum_across_ranks());
    scores[static_cast<std::size_t>(rank)] = balancer.policy().scores();
  }));
  REQUIRE(scores[0].size() == 3);
  CHECK(scores[0] == scores[1]);
  const auto dropping = std::count_if(plans[0].begin(), plans[0].end(),
                                      [](const StepPlan& p) { return p.modulated_branch().has_value(); });
  CHECK(dropping > 0);  // the decisions compared include drops
  REQUIRE(plans[0].size() == plans[1].size());
  for (std::size_t i = 0; i < plans[0].size(); ++i) {
    CHECK(plans[0][i].modulated_branch() == plans[1][i].modulated_branch());
    CHECK(plans[0][i].keep_probability() == plans[1][i].keep_probability());
  }
  CHECK(same_state(*nets[0], *nets[1]));
}

TEST_CASE("DataParallel, MMPareto: 2 ranks combine the gradients of one process on the combined "
          "batches", "[distributed][mmpareto]") {
  // Each rank's fused gradients are averaged over the ranks (as DataParallel averages the
  // gradients) before the cosine test and the min-norm weights; MMTM, late fusion, three
  // branches.
  check_matches_single_process(for_branches(MMParetoPolicy(), 2));
  check_matches_single_process(for_branches(MMParetoPolicy(MMParetoOptions().gamma(1.2)), 3), at::kCPU, small_three_way);
  // Heads that lean apart make branch 0's gradients conflict, where the min-norm weights
  // depend on the averaged g_m: the same conflicts on the ranks as in one process.
  // (Within 1e-4: the min-norm weights divide by |g − g_m|², which amplifies the rounding
  // of the averaged gradients; measured 5e-5 since warm-up trains MMPareto's three terms.)
  const auto ended = check_matches_single_process(for_branches(MMParetoPolicy(), 2), at::kCPU, leaning_late_net, 1e-4);
  const at::Tensor single = ended[0].conflict_steps();
  CHECK(single[0].item<std::int64_t>() > 0);
  CHECK(at::equal(ended[1].conflict_steps(), single));
  CHECK(at::equal(ended[2].conflict_steps(), single));
}

TEST_CASE("DataParallel, AGM: 2 ranks scale the gradients of one process on the combined "
          "batches", "[distributed][agm]") {
  // Each rank runs the masked passes on its rows; the scores' sums and row counts are
  // added up over the ranks before the coefficients: MMTM, late fusion, three branches.
  const auto ended = check_matches_single_process(for_branches(AGMPolicy(AGMOptions().alpha(0.5)), 2));
  check_matches_single_process(for_branches(AGMPolicy(AGMOptions().alpha(0.5)), 2), at::kCPU, leaning_late_net);
  check_matches_single_process(for_branches(AGMPolicy(AGMOptions().alpha(0.5)), 3), at::kCPU, small_three_way);
  // The running means are the same everywhere, and the coefficients did modulate.
  for (const auto& p : ended) CHECK(at::allclose(p.running_scores(), ended[0].running_scores(), 1e-6, 1e-9));
  CHECK(at::equal(ended[1].running_scores(), ended[2].running_scores()));
  CHECK(ended[0].modulated_steps().item<std::int64_t>() > 0);
  CHECK((ended[0].last_coefficients() - 1).abs().max().item<double>() > 1e-4);
}

TEST_CASE("DataParallel, uneven shares: 3 ranks of 2, 3 and 3 rows, each loss scaled by its share "
          "through balancer.loss, match one process", "[distributed][agm][mmpareto]") {
  // The scale reaches what the balancer computes from the loss (MMPareto's fused
  // gradients) and the scores' row counts (AGM), so unequal shares average correctly.
  check_matches_single_process(VanillaPolicy(), at::kCPU, two_branch_net, 1e-5, 3);
  check_matches_single_process(for_branches(MMParetoPolicy(), 2), at::kCPU, leaning_late_net, 1e-4, 3);  // as above
  const auto ended = check_matches_single_process(for_branches(AGMPolicy(AGMOptions().alpha(0.5)), 2), at::kCPU, two_branch_net, 1e-5, 3);
  for (std::size_t r = 1; r < ended.size(); ++r) {
    CHECK(at::allclose(ended[r].running_scores(), ended[0].running_scores(), 1e-6, 1e-9));
  }
}

// Gradient-Blending that keeps every measurement and the weights after it.
struct BlendHistory : GradientBlendingPolicy {
  using GradientBlendingPolicy::GradientBlendingPolicy;
  std::vector<EpochLosses> losses;
  std::vector<LossWeights> weights;
  void observe_epoch_losses(const EpochLosses& measured) {
    GradientBlendingPolicy::observe_epoch_losses(measured);
    losses.push_back(measured);
    weights.push_back(loss_weights());
  }
};

TEST_CASE("DataParallel, Gradient-Blending: 2 ranks measure the losses of one process on the "
          "combined batches and weigh them alike", "[distributed][gblend]") {
  // Each rank measures its rows and the sums cover both: the losses of one process (within
  // 1e-4: its model drifts from the ranks' by the amplified rounding below; without the
  // sums they differ by 1e-2), bit-equal on the ranks, and each rank's weights the rule
  // applied to them.
  // (The averaged gradients keep the ranks' models equal whatever their weights.)
  for (const std::size_t branches : {2, 3}) {
    const BlendHistory policy(GradientBlendingOptions().super_epoch(1));
    // The rule divides by squared differences of losses, so the 1e-7 differences between
    // batches of 4 and of 8 rows (other kernels) reach the weights, then the parameters:
    // those compared within 1e-2 (without the sums over the ranks they differ by 0.4).
    const auto ended = branches == 2 ? check_matches_single_process(policy, at::kCPU, two_branch_net, 1e-2)
                                     : check_matches_single_process(policy, at::kCPU, small_three_way, 1e-2);
    const BlendHistory &single = ended[0], &rank0 = ended[1], &rank1 = ended[2];
    REQUIRE(single.losses.size() == 4);  // the ends of epochs 0 (warm-up) to 3
    REQUIRE(rank0.losses.size() == 4);
    REQUIRE(rank1.losses.size() == 4);
    const auto flat = [](const EpochLosses& l) {
      std::vector<double> v = l.train.heads;
      v.push_back(l.train.fused);
      v.insert(v.end(), l.held_out.heads.begin(), l.held_out.heads.end());
      v.push_back(l.held_out.fused);
      return v;
    };
    double moved = 0;
    for (std::size_t e = 0; e < 4; ++e) {
      CHECK(flat(rank0.losses[e]) == flat(rank1.losses[e]));
      CHECK(rank0.losses[e].held_out.samples == 16);  // both ranks' 8 rows of 2 batches
      const std::vector<double> ranks = flat(rank0.losses[e]), one = flat(single.losses[e]);
      for (std::size_t j = 0; j < one.size(); ++j) CHECK(ranks[j] == Approx(one[j]).epsilon(1e-4));
      CHECK(rank0.weights[e].heads == rank1.weights[e].heads);
      CHECK(rank0.weights[e].fused == rank1.weights[e].fused);
      if (e > 0) {
        const std::vector<double> rule = GradientBlendingPolicy::blend_weights(rank0.losses[e - 1], rank0.losses[e]);
        for (std::size_t k = 0; k < branches; ++k) {
          CHECK(rank0.weights[e].heads[k] == rule[k]);
          moved += std::abs(rule[k] - 1.0 / static_cast<double>(branches + 1));
        }
        CHECK(rank0.weights[e].fused == rule[branches]);
      }
    }
    CHECK(moved > 1e-3);  // not uniform throughout
  }
}

TEST_CASE("DataParallel, ReLearning: 2 ranks diagnose as one process and move their branches alike",
          "[distributed][relearning]") {
  // Warm-up 1 of 4 epochs, re-initializing after epochs 2 and 3: every rank clusters the
  // same rows, the strengths are the ranks' average (equal), the models stay one; two and
  // three branches.
  const ReLearningPolicy policy(ReLearningOptions().every(1).times(2).kmeans_runs(2));
  for (const std::size_t branches : {2, 3}) {
    const auto ended = branches == 2 ? check_matches_single_process(policy, at::kCPU, small_late_net)
                                     : check_matches_single_process(policy, at::kCPU, small_three_way);
    const ReLearningDiagnosis &single = ended[0].last_diagnosis(), &rank0 = ended[1].last_diagnosis(),
                              &rank1 = ended[2].last_diagnosis();
    REQUIRE(single.epochs == 3);
    CHECK(rank0.epochs == 3);
    REQUIRE(rank0.strengths.size() == branches);
    CHECK(rank0.strengths == rank1.strengths);
    CHECK(rank0.train_purity == single.train_purity);
    CHECK(rank0.held_out_purity == single.held_out_purity);
    double moved = 0;
    for (std::size_t k = 0; k < branches; ++k) {
      CHECK(rank0.strengths[k] == Approx(single.strengths[k]).epsilon(1e-12));
      moved += rank0.strengths[k];
    }
    CHECK(moved > 0);  // a move was made
  }
}

TEST_CASE("CUDA: DataParallel over Gloo with the model on the GPU", "[distributed][cuda]") {
  if (!torch::cuda::is_available()) return;
  const at::Device cuda(at::kCUDA, 0);
  check_matches_single_process(VanillaPolicy(), cuda);
  check_matches_single_process(GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)), cuda);
}

TEST_CASE("DataParallel: gate averages are those of the combined batches, micro-batches included",
          "[distributed]") {
  Net single = small_net(0);
  freeze_batch_norm(single);
  auto b = small_batch(kGlobalBatch, 3);
  single->forward(b.x0, b.x1, StepKind::regular);

  std::vector<Net> nets{small_net(0), small_net(0)};
  std::array<std::array<double, 2>, 2> staged_rows{};
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    Net& net = nets[static_cast<std::size_t>(rank)];
    freeze_batch_norm(net);
    DataParallel dp(net, pg);
    // Rank 0 takes its 4 rows in one pass, rank 1 in two micro-batches of 2 (gradient
    // accumulation): pending sums add up until synchronize.
    const std::int64_t micro = rank == 0 ? 4 : 2;
    at::Tensor loss = at::zeros({});
    for (std::int64_t first = 4 * rank; first < 4 * rank + 4; first += micro) {
      const auto out = net->forward(b.x0.narrow(0, first, micro), b.x1.narrow(0, first, micro));
      (out.y0.sum() + out.y1.sum()).backward();
      loss = loss + out.y.sum().detach();
    }
    // Before synchronize each rank has staged its own 4 rows; after, the sums of all 8.
    // (Checked after the threads: Catch2's assertions are not thread-safe.)
    staged_rows[static_cast<std::size_t>(rank)][0] =
        net->taps[0].module->gate_mean->staged()[-1].item<double>();
    dp.synchronize(loss);
    staged_rows[static_cast<std::size_t>(rank)][1] =
        net->taps[0].module->gate_mean->staged()[-1].item<double>();
    for (auto& mean : net->gate_means()) mean->commit();  // what the balancer does
  }));
  for (const auto& rows : staged_rows) {
    CHECK(rows[0] == 4.0);
    CHECK(rows[1] == kGlobalBatch);
  }
  for (auto& mean : single->gate_means()) mean->commit();
  for (std::size_t k = 0; k < single->taps.size(); ++k) {
    for (const auto& net : nets) {
      const auto& got = net->taps[k].module;
      const auto& want = single->taps[k].module;
      CHECK(got->gate_mean->samples.item<double>() == kGlobalBatch);
      CHECK(at::allclose(got->gate_mean->mean, want->gate_mean->mean, 1e-5, 1e-6));
    }
  }
}

TEST_CASE("DataParallel: a checkpoint from 2 ranks resumes in 1 process", "[distributed]") {
  const fs::path path = fs::temp_directory_path() /
                        ("mmbalance-dist-ckpt-" + std::to_string(::getpid()) + ".pt");
  const GuidedPolicy policy(GuidedOptions().alpha(0.0).Q(2));
  std::vector<Net> nets{small_net(0), small_net(0)};
  std::vector<std::vector<StepKind>> continued(2);
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    Net& net = nets[static_cast<std::size_t>(rank)];
    freeze_batch_norm(net);
    DataParallel dp(net, pg);
    auto opt = make_sgd(net);
    GuidedBalancer balancer(net, policy);
    auto sync = [&](const at::Tensor& l) { return dp.synchronize(l); };
    train_share(net, opt, balancer, 0, 8, rank, 2, sync);
    dp.synchronize_buffers();
    if (dp.rank() == 0) save_checkpoint(path.string(), net, opt, balancer);
    dp.barrier();
    continued[static_cast<std::size_t>(rank)] = train_share(net, opt, balancer, 8, 14, rank, 2, sync);
  }));

  Net resumed = small_net(5);
  freeze_batch_norm(resumed);
  auto opt = make_sgd(resumed);
  GuidedBalancer balancer(resumed, policy);
  load_checkpoint(path.string(), resumed, opt, balancer);
  const auto kinds = train_share(resumed, opt, balancer, 8, 14, 0, 1,
                                 [](const at::Tensor& l) { return l; });
  CHECK(kinds == continued[0]);
  CHECK(max_relative_difference(*nets[0], *resumed) < 1e-5);
  fs::remove(path);
}

TEST_CASE("DataParallel: the random policy draws the same steps on every rank",
          "[distributed]") {
  std::vector<std::vector<StepPlan>> draws(2);
  std::vector<std::uint64_t> seeds(2);
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    // Each rank asks for its own seed; rank 0's wins everywhere.
    const std::uint64_t seed = agree_on_seed(pg, 100 + static_cast<std::uint64_t>(rank));
    seeds[static_cast<std::size_t>(rank)] = seed;
    auto policy = for_branches(RandomPolicy(RandomOptions().seed(seed)), 2);
    for (int i = 0; i < 200; ++i) draws[static_cast<std::size_t>(rank)].push_back(policy.next_plan());
  }));
  CHECK(seeds[0] == 100);
  CHECK(seeds[1] == 100);
  CHECK(draws[0] == draws[1]);
  auto other = for_branches(RandomPolicy(RandomOptions().seed(101)), 2);
  std::vector<StepPlan> other_draws;
  for (int i = 0; i < 200; ++i) other_draws.push_back(other.next_plan());
  CHECK(other_draws != draws[0]);
}

TEST_CASE("DataParallel: the probe adds up squeeze averages and counts over ranks",
          "[distributed]") {
  std::vector<MultiModalBatch> train, eval;
  for (std::uint64_t s = 0; s < 3; ++s) train.push_back(small_batch(kGlobalBatch, 50 + s));
  for (std::uint64_t s = 0; s < 2; ++s) eval.push_back(small_batch(kGlobalBatch, 60 + s));
  Net single = small_net(0);
  const UtilizationReport want = probe_utilization(single, train, eval);

  std::vector<UtilizationReport> got(2);
  std::vector<Net> nets{small_net(0), small_net(0)};
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    Net& net = nets[static_cast<std::size_t>(rank)];
    DataParallel dp(net, pg);
    auto share = [rank](const std::vector<MultiModalBatch>& batches) {
      std::vector<MultiModalBatch> out;
      for (const auto& b : batches) {
        out.push_back({b.x0.narrow(0, 4 * rank, 4), b.x1.narrow(0, 4 * rank, 4),
                       b.target.narrow(0, 4 * rank, 4)});
      }
      return out;
    };
    got[static_cast<std::size_t>(rank)] =
        probe_utilization(net, share(train), share(eval), dp.sum_across_ranks());
  }));
  for (const auto& r : got) {
    CHECK(r.samples == want.samples);
    CHECK(r.accuracy == want.accuracy);
    CHECK(r.accuracy0_cut == want.accuracy0_cut);
    CHECK(r.accuracy1_cut == want.accuracy1_cut);
  }
  for (std::size_t k = 0; k < single->taps.size(); ++k) {
    CHECK(at::allclose(nets[1]->taps[k].module->squeeze_mean->mean,
                       single->taps[k].module->squeeze_mean->mean, 1e-5, 1e-6));
    CHECK(nets[1]->taps[k].module->squeeze_mean->samples.item<double>() == 3 * kGlobalBatch);
  }
}

TEST_CASE("DataParallel: ranks with different models fail together", "[distributed]") {
  const auto errors = run_ranks(2, [&](int rank, auto pg) {
    Net net = small_net(0, rank == 0 ? 3 : 4);
    DataParallel dp(net, pg);
  });
  for (const auto& e : errors) {
    REQUIRE(e);
    CHECK_THAT(message_of(e), Catch::Contains("the ranks hold different models"));
  }
}

TEST_CASE("A rank that never joins makes the others fail within the timeout",
          "[distributed]") {
  const auto start = std::chrono::steady_clock::now();
  const auto errors = run_ranks(2, [](int, auto) {}, 2s, /*joining=*/1);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE(errors[0]);
  CHECK_THAT(message_of(errors[0]), Catch::Contains("could not form the process group"));
  CHECK(seconds < 15);
}

TEST_CASE("A rank that dies makes the others fail within the timeout", "[distributed]") {
  std::atomic<bool> rank1_gone{false};
  double seconds = 0;
  const auto errors = run_ranks(2, [&](int rank, auto pg) {
    Net net = small_net(0);
    DataParallel dp(net, pg);
    if (rank == 1) {
      rank1_gone = true;
      return;  // leaves, closing its connections
    }
    while (!rank1_gone) std::this_thread::yield();
    const auto start = std::chrono::steady_clock::now();
    try {
      auto b = small_batch(4, 0);
      auto loss = modality_specific_loss(net->forward(b.x0, b.x1), b.target);
      loss.backward();
      dp.synchronize(loss);
    } catch (...) {
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      throw;
    }
  }, 3s);
  REQUIRE(errors[0]);
  CHECK_FALSE(errors[1]);
  CHECK_THAT(message_of(errors[0]), Catch::Contains("rank 0 of 2: all-reduce of gradients failed"));
  CHECK(seconds < 15);
}

TEST_CASE("A TCP store served by rank 0 on 127.0.0.1 forms the group", "[distributed]") {
  const std::string store = "tcp://127.0.0.1:" + std::to_string(free_port());
  std::vector<at::Tensor> sums(3);
  rethrow_any(run_ranks(3, [&](int rank, auto pg) {
    Net net = small_net(static_cast<std::uint64_t>(rank));
    DataParallel dp(net, pg);
    at::Tensor t = at::full({2}, static_cast<double>(rank + 1));
    dp.all_reduce_sum(t);
    sums[static_cast<std::size_t>(rank)] = t;
  }, 20s, -1, store));
  for (const auto& t : sums) CHECK(at::equal(t, at::full({2}, 6.0)));
}

namespace {
// A process environment written out by hand: `getenv` for ProcessGroupOptions::from_environment.
std::function<const char*(const char*)> environment(std::map<std::string, std::string> vars) {
  auto held = std::make_shared<std::map<std::string, std::string>>(std::move(vars));
  return [held](const char* name) -> const char* {
    const auto it = held->find(name);
    return it == held->end() ? nullptr : it->second.c_str();
  };
}
}  // namespace

TEST_CASE("ProcessGroupOptions::from_environment reads torchrun's variables, then Slurm's, and "
          "names each one missing",
          "[distributed]") {
  // torchrun on a machine of a multi-machine run: its agent serves the store.
  const auto torchrun = ProcessGroupOptions::from_environment(environment(
      {{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.5"},
       {"MASTER_PORT", "29400"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
       {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}));  // torchrun's win over Slurm's
  CHECK(torchrun.store() == "tcp://10.0.0.5:29400");
  CHECK(torchrun.rank() == 3);
  CHECK(torchrun.world_size() == 8);
  CHECK(torchrun.local_rank() == 1);
  CHECK(torchrun.hostname().empty());  // not loopback: Gloo binds to this machine's address
  CHECK(torchrun.network_interface().empty());
  CHECK(torchrun.store_served_by_launcher());
  // Slurm (srun), the script exporting MASTER_ADDR and MASTER_PORT; rank 0 serves the store.
  const auto slurm = ProcessGroupOptions::from_environment(environment(
      {{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "2"}, {"MASTER_ADDR", "127.0.0.1"},
       {"MASTER_PORT", "12345"}}));
  CHECK(slurm.store() == "tcp://127.0.0.1:12345");
  CHECK(slurm.rank() == 5);
  CHECK(slurm.world_size() == 6);
  CHECK(slurm.local_rank() == 2);
  CHECK(slurm.hostname() == "127.0.0.1");
  CHECK_FALSE(slurm.store_served_by_launcher());
  CHECK(ProcessGroupOptions::from_environment(environment({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                                            {"MASTER_PORT", "1"}, {"GLOO_SOCKET_IFNAME", "eth1"}}))
            .network_interface() == "eth1");
  CHECK(ProcessGroupOptions::from_environment(environment({{"RANK", "0"}, {"WORLD_SIZE", "1"},
                                                            {"MASTER_ADDR", "localhost"}, {"MASTER_PORT", "1"}}))
            .local_rank() == -1);
  // What is missing or malformed, named.
  CHECK_THROWS_WITH(ProcessGroupOptions::from_environment(environment({{"WORLD_SIZE", "2"}})),
                    Catch::Contains("not set: RANK (or SLURM_PROCID), MASTER_PORT, MASTER_ADDR") &&
                        Catch::Contains("torchrun"));
  CHECK_THROWS_WITH(ProcessGroupOptions::from_environment(environment(
                        {{"RANK", "1x"}, {"WORLD_SIZE", "-2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "80"}})),
                    Catch::Contains("not a whole number in range: RANK='1x', WORLD_SIZE='-2'"));
  CHECK_THROWS_WITH(ProcessGroupOptions::from_environment(environment(
                        {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}})),
                    Catch::Contains("MASTER_PORT=70000 is not a port"));
  CHECK_THROWS_WITH(ProcessGroupOptions::from_environment(environment(
                        {{"RANK", "0"}, {"WORLD_SIZE", "0"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})),
                    Catch::Contains("WORLD_SIZE=0 (the number of processes) must be at least 1"));
  CHECK_THROWS_WITH(ProcessGroupOptions::from_environment(environment(
                        {{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})),
                    Catch::Contains("SLURM_PROCID=4 is not below SLURM_NTASKS=4"));
  // Whether an environment describes a launched run at all.
  CHECK(ProcessGroupOptions::environment_describes_run(environment({{"WORLD_SIZE", "2"}})));
  // An srun step of several tasks, MASTER_ADDR exported or not (then from_environment names it).
  CHECK(ProcessGroupOptions::environment_describes_run(environment({{"SLURM_STEP_NUM_TASKS", "4"}})));
  // A batch script itself (one task of an allocation of several) is no launch.
  CHECK_FALSE(ProcessGroupOptions::environment_describes_run(
      environment({{"SLURM_NTASKS", "8"}, {"SLURM_STEP_NUM_TASKS", "1"}, {"MASTER_ADDR", "h"}})));
  CHECK_FALSE(ProcessGroupOptions::environment_describes_run(environment({})));
}

TEST_CASE("A store torchrun's agent serves: every rank joins it as a client", "[distributed]") {
  // The agent's store, as torchrun serves it before starting the ranks.
  const int port = free_port();
  c10d::TCPStoreOptions agent;
  agent.port = static_cast<std::uint16_t>(port);
  agent.isServer = true;
  agent.waitWorkers = false;
  const auto agent_store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", agent);
  for (const bool served_by_launcher : {true, false}) {
    CAPTURE(served_by_launcher);
    std::vector<std::exception_ptr> errors(2);
    std::vector<double> sums(2, 0.0);  // checked here: Catch's assertions are not for threads
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        try {
          auto options = ProcessGroupOptions::from_environment(environment(
              {{"RANK", std::to_string(r)}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"},
               {"MASTER_PORT", std::to_string(port)},
               {"TORCHELASTIC_USE_AGENT_STORE", served_by_launcher ? "True" : "False"}}));
          auto pg = make_process_group(options.timeout(3s));
          at::Tensor t = at::full({1}, static_cast<double>(r + 1));
          std::vector<at::Tensor> tensors{t};
          pg->allreduce(tensors)->wait();
          sums[static_cast<std::size_t>(r)] = t.item<double>();
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
        }
      });
    }
    for (auto& t : threads) t.join();
    if (served_by_launcher) {
      rethrow_any(errors);
      CHECK(sums == std::vector<double>{3.0, 3.0});
    } else {  // rank 0 would serve a store of its own on the agent's port: refused
      REQUIRE(errors[0]);
      CHECK_THAT(message_of(errors[0]), Catch::Contains("could not form the process group"));
    }
  }
}

TEST_CASE("make_process_group rejects bad arguments", "[distributed]") {
  CHECK_THROWS_WITH(make_process_group(ProcessGroupOptions("file:///tmp/x", 2, 2)),
                    Catch::Contains("rank must be in [0, 2)"));
  CHECK_THROWS_WITH(make_process_group(ProcessGroupOptions("redis://x", 0, 1)),
                    Catch::Contains("expected file:///path or tcp://host:port"));
  CHECK_THROWS_WITH(make_process_group(ProcessGroupOptions("tcp://127.0.0.1:99999", 0, 1)),
                    Catch::Contains("port must be 1..65535"));
}

TEST_CASE("DataParallel: a step one rank makes non-finite is rejected on every rank, gate "
          "means unchanged everywhere", "[distributed]") {
  std::vector<Net> nets{small_net(0), small_net(0)};
  std::vector<std::vector<at::Tensor>> before(2), after(2);
  std::vector<std::string> errors(2);
  rethrow_any(run_ranks(2, [&](int rank, auto pg) {
    Net& net = nets[static_cast<std::size_t>(rank)];
    auto opt = make_sgd(net);
    DataParallel dp(net, pg);
    VanillaBalancer balancer(net, VanillaPolicy(), BalancerOptions().warmup_epochs(0));
    auto sync = [&](const at::Tensor& loss) { return dp.synchronize(loss); };
    train_share(net, opt, balancer, 0, 3, rank, 2, sync);  // accepted: the means moved
    for (auto& m : net->gate_means()) before[static_cast<std::size_t>(rank)].push_back(m->mean.clone());
    // Step 3: only rank 1's loss is infinite; the averaged loss is infinite on both.
    const auto b = small_batch(kGlobalBatch, 3);
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0.narrow(0, 4 * rank, 4), b.x1.narrow(0, 4 * rank, 4), kind),
                                       b.target.narrow(0, 4 * rank, 4));
    if (rank == 1) loss = loss * INFINITY;
    opt.zero_grad();
    loss.backward();
    try {
      balancer.observe(dp.synchronize(loss));
    } catch (const c10::Error& e) {
      errors[static_cast<std::size_t>(rank)] = e.what_without_backtrace();
    }
    for (auto& m : net->gate_means()) after[static_cast<std::size_t>(rank)].push_back(m->mean.clone());
    // The loop goes on together.
    train_share(net, opt, balancer, 4, 6, rank, 2, sync);
  }));
  for (int rank = 0; rank < 2; ++rank) {
    INFO("rank " << rank);
    CHECK_THAT(errors[static_cast<std::size_t>(rank)], Catch::Contains("non-finite loss"));
    REQUIRE(before[static_cast<std::size_t>(rank)].size() == 2);
    for (std::size_t k = 0; k < 2; ++k) {
      CHECK(torch::equal(before[static_cast<std::size_t>(rank)][k], after[static_cast<std::size_t>(rank)][k]));
    }
  }
  CHECK(torch::equal(nets[0]->taps[0].module->gate_mean->mean, nets[1]->taps[0].module->gate_mean->mean));
}
