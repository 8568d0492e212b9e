// Builds a MultiModalNet from the installed headers and takes one guided step through
// DataParallel on a 1-rank Gloo group (mmbalance::distributed).
#include <cstdio>
#include <iostream>
#include <string>

#include <unistd.h>

#include <mmbalance/distributed.h>
#include <torch/optim/sgd.h>

int main() {
  using namespace mmbalance;
  auto branch = [](std::int64_t in) {
    return ConvBranch(ConvBranchOptions(in, 4).channels({4, 8}).strides({1, 2}));
  };
  ConvMMTMNet net(branch(3), branch(1), {{1, MMTM(8, 8)}});
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.01));
  GuidedBalancer balancer(net);
  const std::string store = "/tmp/mmbalance-consumer-store-" + std::to_string(::getpid());
  std::remove(store.c_str());
  DataParallel dp(net, make_process_group(ProcessGroupOptions("file://" + store, 0, 1)));
  const StepKind kind = balancer.next_step();
  auto out = net->forward(at::randn({2, 3, 8, 8}), at::randn({2, 1, 8, 8}), kind);
  auto loss = modality_specific_loss(out, at::tensor({1, 3}, at::kLong));
  optimizer.zero_grad();
  loss.backward();
  balancer.observe(dp.synchronize(loss));
  optimizer.step();
  std::cout << "consumer: " << to_string(kind) << " step, d_speed " << balancer.last_d_speed()
            << "\n";
  std::remove(store.c_str());
  return 0;
}
