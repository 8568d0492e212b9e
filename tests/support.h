#pragma once
// Small models and data shared by the tests.

#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

/// Options of a 3-class ConvBranch with the given stages.
inline ConvBranchOptions branch_options(std::int64_t in, std::vector<std::int64_t> channels,
                                        std::vector<std::int64_t> strides) {
  return ConvBranchOptions(in, 3).channels(std::move(channels)).strides(std::move(strides));
}

using TwoWay = NWayMultiModalNet<NWayMMTM, ConvBranch, ConvBranch>;
using ThreeWay = NWayMultiModalNet<NWayMMTM, ConvBranch, ConvBranch, ConvBranch>;

/// The two-branch N-way twin of `small_net`: same shapes, same submodule names, so it
/// loads a `small_net`'s saved state.
inline TwoWay small_two_way() {
  return TwoWay(std::tuple{ConvBranch(branch_options(3, {4, 8}, {1, 2})),
                           ConvBranch(branch_options(1, {4, 8}, {1, 2}))},
                {{{0, 0}, NWayMMTM(NWayMMTMOptions({4, 4}))},
                 {{1, 1}, NWayMMTM(NWayMMTMOptions({8, 8}))}});
}

/// Three branches with different stage counts, for 8x8 inputs: colour (3 stages), gray
/// (2), a third 2-channel modality (2). Tap 0 reads stages (1, 0, 0), tap 1 (2, 1, 1).
inline ThreeWay small_three_way(std::uint64_t seed) {
  torch::manual_seed(seed);
  return ThreeWay(std::tuple{ConvBranch(branch_options(3, {4, 6, 8}, {1, 2, 1})),
                             ConvBranch(branch_options(1, {5, 8}, {2, 1})),
                             ConvBranch(branch_options(2, {3, 4}, {1, 2}))},
                  {{{1, 0, 0}, NWayMMTM(NWayMMTMOptions({6, 5, 3}).ratio(2))},
                   {{2, 1, 1}, NWayMMTM(NWayMMTMOptions({8, 8, 4}).ratio(2))}});
}

/// A fixed batch: colour image, gray image, labels.
inline MultiModalBatch small_batch(std::int64_t n, std::uint64_t seed, std::int64_t classes = 3) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::randn({n, 3, 8, 8}, gen), at::randn({n, 1, 8, 8}, gen),
          at::randint(classes, {n}, gen)};
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

/// An optimizer's state as bytes, in parameter order: each group's options, then each
/// parameter's state. Unlike `saved_bytes(optimizer)` it does not depend on the order of
/// LibTorch's state map (keyed by address), which can change when the same state is loaded
/// again.
inline std::string optimizer_state(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive out;
  std::size_t param = 0;
  for (std::size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    const auto& group = optimizer.param_groups()[g];
    torch::serialize::OutputArchive options;
    group.options().serialize(options);
    out.write("group" + std::to_string(g), options);
    for (const auto& p : group.params()) {
      const auto it = optimizer.state().find(p.unsafeGetTensorImpl());
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

inline torch::optim::SGD make_sgd(Net& net) {
  return torch::optim::SGD(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
}

}  // namespace mmbalance::testing
