#include <catch2/catch.hpp>

#include "support.h"

using namespace mmbalance;

TEST_CASE("ConvBranch exposes its stages", "[branch]") {
  ConvBranch branch(ConvBranchOptions(3, 10).channels({32, 64, 128, 128}).strides({1, 2, 2, 2}));
  REQUIRE(branch->num_stages() == 4);
  CHECK(branch->stage_channels(1) == 64);
  auto x = at::randn({2, 3, 28, 28});
  auto h = x;
  std::vector<std::vector<int64_t>> shapes{{2, 32, 28, 28}, {2, 64, 14, 14}, {2, 128, 7, 7},
                                           {2, 128, 4, 4}};
  for (size_t i = 0; i < 4; ++i) {
    h = branch->forward_stage(i, h);
    CHECK(h.sizes().vec() == shapes[i]);
  }
  CHECK(branch->head(h).sizes().vec() == std::vector<int64_t>{2, 10});
  CHECK(torch::allclose(branch->forward(x), branch->head(h)));
}

TEST_CASE("ConvBranch matches the bench model's parameter count", "[branch]") {
  // Two branches (3- and 1-channel input) and three MMTMs: ~633k parameters in 54 tensors.
  ConvMMTMNet net(ConvBranch(ConvBranchOptions(3, 10)), ConvBranch(ConvBranchOptions(1, 10)),
                  {{1, MMTM(64, 64)}, {2, MMTM(128, 128)}, {3, MMTM(128, 128)}});
  int64_t total = 0;
  for (const auto& p : net->parameters()) total += p.numel();
  CHECK(net->parameters().size() == 54);
  CHECK(total > 600000);
  CHECK(total < 660000);
}

TEST_CASE("ConvBranch batch norm is optional", "[branch]") {
  ConvBranch with(ConvBranchOptions(1, 2).channels({4}).strides({1}));
  ConvBranch without(ConvBranchOptions(1, 2).channels({4}).strides({1}).batch_norm(false));
  CHECK(with->stages[0]->size() == 3);
  CHECK(without->stages[0]->size() == 2);
}

TEST_CASE("ConvBranch rejects bad options and inputs", "[branch][bad-input]") {
  CHECK_THROWS_WITH(ConvBranch(ConvBranchOptions(3, 10).channels({4, 8}).strides({1})),
                    Catch::Contains("2 stage channel counts but 1 strides"));
  CHECK_THROWS_WITH(ConvBranch(ConvBranchOptions(3, 10).channels({})),
                    Catch::Contains("at least one stage"));
  CHECK_THROWS_WITH(ConvBranch(ConvBranchOptions(3, 10).kernel_size(2)),
                    Catch::Contains("kernel_size must be odd"));
  ConvBranch branch(ConvBranchOptions(3, 10));
  CHECK_THROWS_WITH(branch->forward_stage(0, at::randn({2, 1, 28, 28})),
                    Catch::Contains("expected input (batch, 3"));
  CHECK_THROWS_WITH(branch->stage_channels(4), Catch::Contains("stage 4 out of range"));
}

TEST_CASE("ConvBranch clone is deep", "[branch]") {
  ConvBranch branch(ConvBranchOptions(1, 2).channels({4}).strides({1}));
  auto copy = std::dynamic_pointer_cast<ConvBranchImpl>(branch->clone());
  REQUIRE(copy);
  auto x = at::randn({2, 1, 6, 6});
  branch->eval();
  copy->eval();
  CHECK(torch::equal(branch->forward(x), copy->forward(x)));
  {
    torch::NoGradGuard ng;
    copy->classifier->weight.add_(1.0);
  }
  CHECK_FALSE(torch::equal(branch->forward(x), copy->forward(x)));
}

TEST_CASE("ConvBranch with spatial_dims(3) runs 3-d convolutions over clips", "[branch]") {
  ConvBranch branch(ConvBranchOptions(1, 5).channels({4, 8}).strides({1, 2}).spatial_dims(3));
  CHECK(branch->stages[0]->size() == 3);
  CHECK(dynamic_cast<torch::nn::Conv3dImpl*>(branch->stages[0]->ptr(0).get()) != nullptr);
  CHECK(dynamic_cast<torch::nn::BatchNorm3dImpl*>(branch->stages[0]->ptr(1).get()) != nullptr);
  auto clip = at::randn({2, 1, 6, 8, 8});  // (batch, channels, time, height, width)
  auto h = branch->forward_stage(0, clip);
  CHECK(h.sizes().vec() == std::vector<int64_t>{2, 4, 6, 8, 8});
  h = branch->forward_stage(1, h);
  CHECK(h.sizes().vec() == std::vector<int64_t>{2, 8, 3, 4, 4});
  // The head pools over time and space.
  CHECK(torch::allclose(branch->head(h), branch->classifier->forward(h.mean({2, 3, 4})), 1e-5, 1e-6));
  CHECK_THROWS_WITH(branch->forward(at::randn({2, 1, 8, 8})),
                    Catch::Contains("expected input (batch, 1, time, height, width)"));
  CHECK_THROWS_WITH(ConvBranch(ConvBranchOptions(1, 5).spatial_dims(1)),
                    Catch::Contains("spatial_dims must be 2 (images) or 3 (clips)"));

  // Clips of two modalities joined by an MMTM, a regular and a re-balancing step.
  auto rgb = ConvBranch(ConvBranchOptions(3, 5).channels({4, 8}).strides({1, 2}).spatial_dims(3));
  ConvMMTMNet net(rgb, branch, {{1, MMTM(8, 8)}});
  auto out = net->forward(at::randn({2, 3, 6, 8, 8}), clip);
  CHECK(out.y.sizes().vec() == std::vector<int64_t>{2, 5});
  CHECK(net->taps[0].module->gate_mean->staged()[-1].item<double>() == 2.0);
  auto rebalanced = net->forward(at::randn({2, 3, 6, 8, 8}), clip, StepKind::rebalance_m1);
  CHECK(rebalanced.y1.sizes().vec() == std::vector<int64_t>{2, 5});
}
