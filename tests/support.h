#pragma once
// Small models and data shared by the tests.

#include <concepts>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include <torch/torch.h>

#include <mmbalance/mmbalance.h>

namespace mmbalance::testing {

using Net = ConvMMTMNet;

/// Two 2-stage branches (4 and 8 channels) with an MMTM after each stage, 8x8 inputs.
inline Net small_net(std::uint64_t seed = 0, std::int64_t classes = 3) {
  torch::manual_seed(seed);
  auto opts = [classes](std::int64_t in) {
    return ConvBranchOptions(in, classes).channels({4, 8}).strides({1, 2});
  };
  return Net(ConvBranch(opts(3)), ConvBranch(opts(1)),
             {{0, MMTM(MMTMOptions(4, 4))}, {1, MMTM(MMTMOptions(8, 8))}});
}

/// `small_net`'s late-fusion twin: the same branches, no fusion modules.
inline Net small_late_net(std::uint64_t seed = 0) {
  torch::manual_seed(seed);
  const auto opts = [](std::int64_t in) { return ConvBranchOptions(in, 3).channels({4, 8}).strides({1, 2}); };
  return Net(ConvBranch(opts(3)), ConvBranch(opts(1)), std::vector<FusionTap<MMTM>>{});
}

/// `small_late_net` with heads that lean to different classes from the start (branch 0's
/// to class 1, branch 1's strongly to class 0): rows where the fused output is wrong
/// because of branch 1 make the multimodal and uni-modal gradients of branch 0 conflict.
inline Net leaning_late_net(std::uint64_t seed = 0) {
  Net net = small_late_net(seed);
  torch::NoGradGuard no_grad;
  net->branch0->classifier->bias.copy_(at::tensor({0.0F, 5.0F, 0.0F}));
  net->branch1->classifier->bias.copy_(at::tensor({10.0F, 0.0F, 0.0F}));
  return net;
}

/// Options of a 3-class ConvBranch with the given stages.
inline ConvBranchOptions branch_options(std::int64_t in, std::vector<std::int64_t> channels,
                                        std::vector<std::int64_t> strides) {
  return ConvBranchOptions(in, 3).channels(std::move(channels)).strides(std::move(strides));
}

using TwoWay = MultiModalNet<ConvBranch, ConvBranch, MMTM>;

/// Detached copies of `tensors` (parameters as they are now).
inline std::vector<at::Tensor> clones(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

/// A two-branch fusion module's outputs as a pair.
inline std::pair<at::Tensor, at::Tensor> as_pair(const std::vector<at::Tensor>& outputs) {
  return {outputs.at(0), outputs.at(1)};
}
using ThreeWay = MultiModalNet<ConvBranch, ConvBranch, ConvBranch, MMTM>;

/// The two-branch N-way twin of `small_net`: same shapes, same submodule names, so it
/// loads a `small_net`'s saved state.
inline TwoWay small_two_way() {
  return TwoWay(std::tuple{ConvBranch(branch_options(3, {4, 8}, {1, 2})),
                           ConvBranch(branch_options(1, {4, 8}, {1, 2}))},
                {{{0, 0}, MMTM(MMTMOptions({4, 4}))},
                 {{1, 1}, MMTM(MMTMOptions({8, 8}))}});
}

/// Three branches with different stage counts, for 8x8 inputs: colour (3 stages), gray
/// (2), a third 2-channel modality (2). Tap 0 reads stages (1, 0, 0), tap 1 (2, 1, 1).
inline ThreeWay small_three_way(std::uint64_t seed) {
  torch::manual_seed(seed);
  return ThreeWay(std::tuple{ConvBranch(branch_options(3, {4, 6, 8}, {1, 2, 1})),
                             ConvBranch(branch_options(1, {5, 8}, {2, 1})),
                             ConvBranch(branch_options(2, {3, 4}, {1, 2}))},
                  {{{1, 0, 0}, MMTM(MMTMOptions({6, 5, 3}).ratio(2))},
                   {{2, 1, 1}, MMTM(MMTMOptions({8, 8, 4}).ratio(2))}});
}

/// A fixed batch: colour image, gray image, labels.
inline MultiModalBatch small_batch(std::int64_t n, std::uint64_t seed, std::int64_t classes = 3) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::randn({n, 3, 8, 8}, gen), at::randn({n, 1, 8, 8}, gen),
          at::randint(classes, {n}, gen)};
}

/// A fixed batch for an N-branch test network of up to three branches (colour image, gray
/// image, a 2-channel third modality, then labels). For two branches it is
/// `small_batch(n, seed)`: the same draws in the same order.
inline Batch n_way_batch(std::size_t branches, std::int64_t n, std::uint64_t seed) {
  TORCH_CHECK(branches >= 2 && branches <= 3, "n_way_batch: 2 or 3 branches");
  auto gen = at::detail::createCPUGenerator(seed);
  const std::int64_t channels[] = {3, 1, 2};
  std::vector<at::Tensor> x;
  for (std::size_t k = 0; k < branches; ++k) x.push_back(at::randn({n, channels[k], 8, 8}, gen));
  return {std::move(x), at::randint(3, {n}, gen)};
}

/// A tensor's values as doubles, in row-major order.
inline std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kCPU, at::kDouble).contiguous().flatten();
  return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
}

/// True if the two lists have the same length and bitwise equal tensors.
inline bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

/// The tensors' identities (their TensorImpl addresses).
inline std::set<const void*> tensor_ids(const std::vector<at::Tensor>& tensors) {
  std::set<const void*> out;
  for (const auto& t : tensors) out.insert(t.unsafeGetTensorImpl());
  return out;
}

/// `small_net(seed)` as a function of the seed alone (for callers taking Net(*)(uint64_t)).
inline Net two_branch_net(std::uint64_t seed) { return small_net(seed); }

/// An empty directory <tmp>/mmbalance_<group>_<pid>/<name>, made afresh.
inline std::filesystem::path fresh_test_dir(const std::string& group, const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("mmbalance_" + group + "_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

/// The saved state of `from` loaded into `to` (same submodule names and shapes).
template <class From, class To>
void copy_state(const From& from, To& to) {
  std::stringstream saved;
  torch::save(from, saved);
  torch::load(to, saved);
}

/// Copies `from`'s parameters, then its buffers, into `to`'s in order, whatever their
/// names (into the two-branch reference, which reads no "joint" layer).
inline void copy_values_in_order(const torch::nn::Module& from, torch::nn::Module& to) {
  const at::NoGradGuard no_grad;
  const auto pf = from.parameters(), pt = to.parameters();
  const auto bf = from.buffers(), bt = to.buffers();
  TORCH_CHECK(pf.size() == pt.size() && bf.size() == bt.size(), "copy_values_in_order: other modules");
  for (std::size_t i = 0; i < pf.size(); ++i) pt[i].copy_(pf[i]);
  for (std::size_t i = 0; i < bf.size(); ++i) bt[i].copy_(bf[i]);
}

/// True if the two modules' parameters, then their buffers, are bitwise equal in order,
/// whatever their names (the two-branch reference's MMTM calls its joint layer "squeeze").
inline bool same_values_in_order(const torch::nn::Module& a, const torch::nn::Module& b) {
  return all_equal(a.parameters(), b.parameters()) && all_equal(a.buffers(), b.buffers());
}

/// True if every parameter and buffer of the two modules is bitwise equal.
inline bool same_state(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  auto ba = a.named_buffers(), bb = b.named_buffers();
  if (pa.size() != pb.size() || ba.size() != bb.size()) return false;
  for (const auto& p : pa) {
    if (!torch::equal(p.value(), pb[p.key()])) return false;
  }
  for (const auto& x : ba) {
    if (!torch::equal(x.value(), bb[x.key()])) return false;
  }
  return true;
}

}  // namespace mmbalance::testing

namespace mmbalance::testing {

/// Runs steps [first, last) of a deterministic training run: batch i comes from seed i,
/// and an epoch ends every `steps_per_epoch` steps. Returns the step kinds taken.
template <class BalancerT>
std::vector<StepKind> train_steps(Net& net, torch::optim::Optimizer& optimizer,
                                  BalancerT& balancer, int first, int last,
                                  int steps_per_epoch = 4) {
  std::vector<StepKind> kinds;
  for (int i = first; i < last; ++i) {
    auto b = small_batch(8, static_cast<std::uint64_t>(i));
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(b.x0, b.x1, kind), b.target);
    optimizer.zero_grad();
    loss.backward();
    balancer.observe(loss);
    optimizer.step();
    kinds.push_back(kind);
    if ((i + 1) % steps_per_epoch == 0) balancer.end_epoch();
  }
  return kinds;
}

/// One step of the README's loop with the loss formed by the balancer (any policy, two
/// branches); returns the loss.
template <class BalancerT>
at::Tensor balanced_step(Net& net, torch::optim::Optimizer& optimizer, BalancerT& balancer, const MultiModalBatch& b) {
  const StepKind kind = balancer.next_step();
  at::Tensor loss = balancer.loss(net->forward(b.x0, b.x1, kind), b.target);
  optimizer.zero_grad();
  loss.backward();
  balancer.observe(loss);
  optimizer.step();
  return loss;
}

/// `train_steps` for an N-branch network (batches from `n_way_batch`); returns the plans.
template <class NetT, class BalancerT>
std::vector<StepPlan> train_plans(NetT& net, torch::optim::Optimizer& optimizer,
                                  BalancerT& balancer, int first, int last,
                                  int steps_per_epoch = 4) {
  std::vector<StepPlan> plans;
  for (int i = first; i < last; ++i) {
    auto b = n_way_batch(net->num_branches(), 8, static_cast<std::uint64_t>(i));
    const StepPlan plan = balancer.next_plan();
    auto loss = modality_specific_loss(net->forward(b.inputs, plan), b.target);
    optimizer.zero_grad();
    loss.backward();
    balancer.observe(loss);
    optimizer.step();
    plans.push_back(plan);
    if ((i + 1) % steps_per_epoch == 0) balancer.end_epoch();
  }
  return plans;
}

/// A policy told the branch count of a network, as a `Balancer` tells it (for policies
/// used without one).
template <class Policy>
Policy for_branches(Policy policy, std::size_t branches) {
  policy.set_branches(branches);
  return policy;
}

/// What `thing.save(archive)` writes (a balancer, a policy), as bytes: equal bytes, equal
/// state. For optimizers use `optimizer_state`.
template <class T>
std::string saved_bytes(const T& thing) {
  torch::serialize::OutputArchive out;
  thing.save(out);
  std::stringstream s;
  out.save_to(s);
  return s.str();
}

/// Loads `bytes` (from `saved_bytes`, or an archive written by hand) into `thing`.
template <class T>
void load_saved(T& thing, const std::string& bytes) {
  std::istringstream in(bytes);
  torch::serialize::InputArchive archive;
  archive.load_from(in);
  thing.load(archive);
}

/// An optimizer's state as bytes, in parameter order: each group's options, then each
/// parameter's state. Unlike `saved_bytes(optimizer)` it does not depend on the order of
/// LibTorch's state map (keyed by address), which can change when the same state is loaded
/// again.
template <std::derived_from<torch::optim::Optimizer> Optimizer>
std::string optimizer_state(const Optimizer& optimizer) {
  torch::serialize::OutputArchive out;
  std::size_t param = 0;
  for (std::size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    const auto& group = optimizer.param_groups()[g];
    torch::serialize::OutputArchive options;
    group.options().serialize(options);
    out.write("group" + std::to_string(g), options);
    for (const auto& p : group.params()) {
      // LibTorch 1.13 keys the state by the address as a string, 2.x by the address.
      using Key = typename std::decay_t<decltype(optimizer.state())>::key_type;
      Key key;
      if constexpr (std::is_same_v<Key, std::string>) {
        std::ostringstream address;  // what 1.13's c10::guts::to_string writes
        address << static_cast<const void*>(p.unsafeGetTensorImpl());
        key = address.str();
      } else {
        key = p.unsafeGetTensorImpl();
      }
      const auto it = optimizer.state().find(key);
      if (it != optimizer.state().end()) {
        torch::serialize::OutputArchive state;
        it->second->serialize(state);
        out.write("param" + std::to_string(param), state);
      }
      ++param;
    }
  }
  std::stringstream s;
  out.save_to(s);
  return s.str();
}

template <class NetT>
torch::optim::SGD make_sgd(NetT& net) {
  return torch::optim::SGD(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
}

/// One forward pass's logits.
template <class NetT>
NetOutput forward_heads(NetT& net, const std::vector<at::Tensor>& x) {
  return net->forward(x);
}

/// θ_k of every branch.
template <class NetT>
std::vector<std::vector<at::Tensor>> branches_of(const NetT& net) {
  return net->parameter_groups().branch;
}

/// Resume mid-run: run a trains steps [0, 7) (an epoch ends every 3 steps), is checked by
/// `at_save(balancer)` and saved, then trains [7, 14); run b (a fresh `make()`) loads that
/// checkpoint and trains [7, 14) too. `make()` returns (net, optimizer, balancer), the
/// last two as shared pointers; `loss_of(net, balancer, i)` forms step i's loss after
/// `next_plan()`. Returns both runs, for the caller to compare.
template <class Make, class LossOf, class AtSave>
auto runs_resumed_mid_run(const std::string& name, Make make, LossOf loss_of, AtSave at_save) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mmbalance_" + name + "_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "run.pt").string();
  const auto train = [&](auto& run, int first, int last) {
    auto& net = std::get<0>(run);
    auto& opt = *std::get<1>(run);
    auto& bal = *std::get<2>(run);
    for (int i = first; i < last; ++i) {
      bal.next_plan();
      const at::Tensor loss = loss_of(net, bal, i);
      opt.zero_grad();
      loss.backward();
      bal.observe(loss);
      opt.step();
      if ((i + 1) % 3 == 0) bal.end_epoch();
    }
  };
  auto a = make();
  train(a, 0, 7);
  at_save(*std::get<2>(a));
  save_checkpoint(path, std::get<0>(a), *std::get<1>(a), *std::get<2>(a));
  train(a, 7, 14);
  auto b = make();
  load_checkpoint(path, std::get<0>(b), *std::get<1>(b), *std::get<2>(b));
  train(b, 7, 14);
  fs::remove_all(dir);
  return std::pair{a, b};
}

}  // namespace mmbalance::testing
