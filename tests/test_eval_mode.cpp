#include <catch2/catch.hpp>

#include <stdexcept>

#include "support.h"

using namespace mmbalance;
using namespace mmbalance::testing;

namespace {
// Each submodule's training flag, in modules() order.
std::vector<bool> modes(const Net& net) {
  std::vector<bool> out;
  for (const auto& m : net->modules(/*include_self=*/true)) out.push_back(m->is_training());
  return out;
}
}  // namespace

TEST_CASE("EvalModeGuard: eval mode without gradients inside, every submodule's own mode after",
          "[model][eval-mode]") {
  Net net = small_net(71);
  // A network in training with one BatchNorm kept in eval mode (frozen statistics).
  std::shared_ptr<torch::nn::Module> frozen;
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (dynamic_cast<torch::nn::BatchNorm2dImpl*>(m.get()) != nullptr) {
      frozen = m;
      break;
    }
  }
  REQUIRE(frozen != nullptr);
  frozen->eval();
  const std::vector<bool> before = modes(net);
  REQUIRE(std::count(before.begin(), before.end(), false) == 1);
  {
    const EvalModeGuard<Net> guard(net);
    for (const bool training : modes(net)) CHECK_FALSE(training);
    CHECK_FALSE(at::GradMode::is_enabled());
  }
  CHECK(modes(net) == before);
  CHECK(at::GradMode::is_enabled());
  // Left by an exception: the same.
  CHECK_THROWS_WITH(([&] {
                      const EvalModeGuard<Net> guard(net);
                      throw std::runtime_error("evaluation failed");
                    }()),
                    Catch::Contains("evaluation failed"));
  CHECK(modes(net) == before);
  // And through the library's evaluation passes.
  const std::vector<MultiModalBatch> data = {small_batch(8, 72)};
  head_losses(net, data);
  probe_utilization(net, data, data);
  CHECK(modes(net) == before);
  // A network in eval mode stays in eval mode.
  net->eval();
  { const EvalModeGuard<Net> guard(net); }
  for (const bool training : modes(net)) CHECK_FALSE(training);
}
