#include <catch2/catch.hpp>

#include "support.h"

using namespace mmbalance;

TEST_CASE("ResNetBranch has ResNet18's layout and parameter count", "[branch]") {
  torch::manual_seed(0);
  ResNetBranch branch(ResNetBranchOptions(3, 40));
  int64_t total = 0;
  for (const auto& p : branch->parameters()) total += p.numel();
  // torchvision's resnet18 has 11,689,512 parameters with a 1000-class head; with 40
  // classes the head has 512*40 + 40 instead of 512*1000 + 1000.
  CHECK(total == 11689512 - 513000 + 20520);
  REQUIRE(branch->num_stages() == 4);
  auto h = at::randn({2, 3, 64, 64});
  const std::vector<std::vector<int64_t>> shapes{{2, 64, 16, 16}, {2, 128, 8, 8}, {2, 256, 4, 4},
                                                 {2, 512, 2, 2}};
  for (size_t i = 0; i < 4; ++i) {
    h = branch->forward_stage(i, h);
    CHECK(h.sizes().vec() == shapes[i]);
    CHECK(branch->stage_channels(i) == shapes[i][1]);
  }
  CHECK(branch->head(h).sizes().vec() == std::vector<int64_t>{2, 40});
}

TEST_CASE("ResNetBranch with a small stem joins MMTMs in its last stages", "[branch]") {
  torch::manual_seed(1);
  auto opts = [](int64_t in) {
    return ResNetBranchOptions(in, 5).blocks({1, 1, 1}).widths({8, 16, 32}).imagenet_stem(false);
  };
  ResNetMMTMNet net(ResNetBranch(opts(3)), ResNetBranch(opts(1)),
                    {{1, MMTM(16, 16)}, {2, MMTM(32, 32)}});
  auto x0 = at::randn({4, 3, 16, 16}), x1 = at::randn({4, 1, 16, 16});
  auto target = at::randint(5, {4});
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0)), BalancerOptions().warmup_epochs(0));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  for (int i = 0; i < 3; ++i) {
    const StepKind kind = balancer.next_step();
    auto loss = modality_specific_loss(net->forward(x0, x1, kind), target);
    opt.zero_grad();
    loss.backward();
    balancer.observe(loss);
    opt.step();
  }
  CHECK(balancer.total_step_counts()[0] == 1);  // alpha 0: one regular step, then a window
  CHECK(std::isfinite(balancer.last_d_speed()));
  auto copy = net.clone();
  CHECK(mmbalance::testing::same_state(*net, *copy));
}

TEST_CASE("ResNetBranch rejects bad options and inputs", "[branch][bad-input]") {
  CHECK_THROWS_WITH(ResNetBranch(ResNetBranchOptions(3, 10).blocks({2, 2}).widths({64})),
                    Catch::Contains("2 stage block counts but 1 widths"));
  ResNetBranch branch(ResNetBranchOptions(3, 10).blocks({1}).widths({8}).imagenet_stem(false));
  CHECK_THROWS_WITH(branch->forward_stage(0, at::randn({1, 1, 8, 8})),
                    Catch::Contains("expected input (batch, 3"));
  CHECK_THROWS_WITH(branch->stage_channels(1), Catch::Contains("stage 1 out of range"));
}
