#pragma once
/// \file
/// One-file checkpoints of a model, its optimizer and its balancer, with an architecture
/// check on load.

#include <cstdio>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/detail/check.h"

namespace mmbalance {

/// "name:[shape]" of every parameter and buffer of `module`, one per line.
inline std::string architecture_fingerprint(const torch::nn::Module& module) {
  std::string out;
  for (const auto& p : module.named_parameters()) {
    out += "param " + p.key() + ":" + detail::shape_string(p.value()) + "\n";
  }
  for (const auto& b : module.named_buffers()) {
    out += "buffer " + b.key() + ":" + detail::shape_string(b.value()) + "\n";
  }
  return out;
}

namespace detail {

inline std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < s.size()) {
    const std::size_t end = s.find('\n', start);
    lines.push_back(s.substr(start, end - start));
    start = end == std::string::npos ? s.size() : end + 1;
  }
  return lines;
}

/// Throws naming the first entry where two fingerprints differ.
inline void check_same_architecture(const std::string& saved, const std::string& current,
                                    const std::string& source) {
  if (saved == current) return;
  const auto a = split_lines(saved);
  const auto b = split_lines(current);
  std::size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  const std::string in_file = i < a.size() ? a[i] : "(nothing more)";
  const std::string in_model = i < b.size() ? b[i] : "(nothing more)";
  TORCH_CHECK(false, "checkpoint ", source, " was made for another architecture: entry ", i,
              " is '", in_file, "' in the checkpoint but '", in_model, "' in this model (",
              a.size(), " vs ", b.size(), " parameters and buffers)");
}

// Which parameters have a gradient tensor. LibTorch's optimizers skip a parameter whose
// gradient is undefined but still apply momentum to one whose gradient is zero; the
// re-balancing steps leave one side's excitation without a gradient, so an exact resume
// must restore which parameters have one.
inline at::Tensor grad_defined(const torch::nn::Module& module) {
  std::vector<std::uint8_t> flags;
  for (const auto& p : module.parameters()) flags.push_back(p.grad().defined() ? 1 : 0);
  return at::tensor(at::ArrayRef<std::uint8_t>(flags), at::kByte);
}

inline void restore_grad_definedness(torch::nn::Module& module, const at::Tensor& flags) {
  auto params = module.parameters();
  TORCH_CHECK(flags.numel() == static_cast<std::int64_t>(params.size()),
              "checkpoint: gradient record has ", flags.numel(), " entries for ", params.size(),
              " parameters");
  const at::Tensor f = flags.to(at::kCPU).contiguous();
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto& p = params[i];
    if (f.data_ptr<std::uint8_t>()[i] != 0) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    } else {
      p.mutable_grad() = at::Tensor();
    }
  }
}

}  // namespace detail

/// Writes the model, the optimizer, the balancer (anything with `save(OutputArchive&)`)
/// and which parameters have gradients to `path`. The file is written to `path + ".tmp"` and renamed, so an interrupted save
/// never leaves a half-written checkpoint under `path`.
template <class Net, class BalancerT>
void save_checkpoint(const std::string& path, const Net& net,
                     const torch::optim::Optimizer& optimizer, const BalancerT& balancer) {
  torch::serialize::OutputArchive archive, model, optim, bal;
  archive.write("architecture", architecture_fingerprint(*net));
  archive.write("grad_defined", detail::grad_defined(*net));
  net->save(model);
  optimizer.save(optim);
  balancer.save(bal);
  archive.write("model", model);
  archive.write("optimizer", optim);
  archive.write("balancer", bal);
  const std::string tmp = path + ".tmp";
  archive.save_to(tmp);
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "save_checkpoint: cannot rename ",
              tmp, " to ", path);
}

/// Restores what `save_checkpoint` wrote. Throws before changing anything if the file
/// is not a checkpoint of this architecture; tensors go to the model's device.
template <class Net, class BalancerT>
void load_checkpoint(const std::string& path, Net& net, torch::optim::Optimizer& optimizer,
                     BalancerT& balancer) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "cannot read checkpoint ", path, ": ", e.what_without_backtrace());
  }
  c10::IValue saved;
  TORCH_CHECK(archive.try_read("architecture", saved) && saved.isString(),
              "checkpoint ", path, " has no architecture record; it was not written by "
              "mmbalance::save_checkpoint");
  detail::check_same_architecture(saved.toStringRef(), architecture_fingerprint(*net), path);
  torch::serialize::InputArchive model, optim, bal;
  archive.read("model", model);
  archive.read("optimizer", optim);
  archive.read("balancer", bal);
  at::Tensor grad_defined;
  archive.read("grad_defined", grad_defined);
  net->load(model);
  optimizer.load(optim);
  balancer.load(bal);
  detail::restore_grad_definedness(*net, grad_defined);
}

}  // namespace mmbalance
