#pragma once
/// \file
/// One-file checkpoints of a model, its optimizer and its balancer, with an architecture
/// check on load.

#include <algorithm>
#include <array>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "mmbalance/detail/check.h"
#include "mmbalance/detail/libtorch_compat.h"

namespace mmbalance {

/// What checkpoints take as a network: a module handle (`MultiModalNet`, or any
/// `TORCH_MODULE` handle).
template <class Net>
concept CheckpointModel = requires(Net& net, const Net& saved, torch::serialize::OutputArchive& out,
                                   torch::serialize::InputArchive& in) {
  saved->save(out);
  net->load(in);
  { *saved } -> std::convertible_to<const torch::nn::Module&>;
  { *net } -> std::convertible_to<torch::nn::Module&>;
};

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

// Where two texts first differ, line by line.
struct LineDifference {
  std::size_t line;
  std::string in_first, in_second;  // "(nothing more)" past the end
  std::size_t lines_first, lines_second;
};

inline LineDifference first_difference(const std::string& first, const std::string& second) {
  const auto a = split_lines(first);
  const auto b = split_lines(second);
  std::size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return {i, i < a.size() ? a[i] : "(nothing more)", i < b.size() ? b[i] : "(nothing more)",
          a.size(), b.size()};
}

// MMTM's joint layer was registered as "squeeze" up to mmbalance 2026-12-06. `line` of a
// saved fingerprint ("param a.b.squeeze.weight:[..]": the entry's module) or module
// description ("    (squeeze): torch::nn::Linear(..)") under today's name; empty where
// the line names no such layer.
inline std::string joint_layer_renamed(const std::string& line, bool description) {
  if (description) {
    const std::size_t at = line.find_first_not_of(' ');
    if (at == std::string::npos || line.compare(at, 11, "(squeeze): ") != 0) return {};
    return line.substr(0, at) + "(joint): " + line.substr(at + 11);
  }
  const std::size_t colon = line.rfind(':');
  const std::size_t dot = colon == std::string::npos || colon == 0 ? std::string::npos : line.rfind('.', colon - 1);
  if (dot == std::string::npos || dot == 0) return {};
  const std::size_t start = line.find_last_of(". ", dot - 1) + 1;  // after "param " or the parent's "."
  if (line.compare(start, dot - start, "squeeze") != 0) return {};
  return line.substr(0, start) + "joint" + line.substr(dot);
}

/// `saved` (a fingerprint, or with `description` a module description; an entry a line)
/// with MMTM's joint layer under today's name where `current` has the renamed line and
/// not the original (a module of the user's own may have a "squeeze"). Linear in the
/// texts' sizes (the saved one comes from a file); the caller then compares exactly.
inline std::string with_joint_layer_renamed(const std::string& saved, const std::string& current,
                                            bool description) {
  if (saved == current) return saved;
  const std::vector<std::string> current_lines = split_lines(current);
  const std::unordered_set<std::string_view> mine(current_lines.begin(), current_lines.end());
  std::string out;
  out.reserve(saved.size());
  for (std::string line : split_lines(saved)) {
    if (!mine.count(line)) {
      std::string renamed = joint_layer_renamed(line, description);
      if (!renamed.empty() && mine.count(renamed)) line = std::move(renamed);
    }
    out += line + "\n";
  }
  if (!saved.empty() && saved.back() != '\n') out.pop_back();
  return out;
}

/// Throws naming the first entry where two fingerprints differ.
inline void check_same_architecture(const std::string& recorded, const std::string& current,
                                    const std::string& source) {
  const std::string saved = with_joint_layer_renamed(recorded, current, /*description=*/false);
  if (saved == current) return;
  const LineDifference d = first_difference(saved, current);
  TORCH_CHECK(false, "checkpoint ", source, " was made for another architecture: entry ", d.line,
              " is '", d.in_first, "' in the checkpoint but '", d.in_second, "' in this model (",
              d.lines_first, " vs ", d.lines_second, " parameters and buffers)");
}

/// A module description written before the two-branch network and MMTM became the N = 2
/// case of the N-branch ones (and the N-branch ones lost their `NWay` names), in today's
/// words: the same modules with the same options.
inline std::string upgraded_module_description(const std::string& text) {
  // One pass, plain comparisons, no regular expressions: the text comes from a file, and
  // libstdc++'s std::regex recurses per character (a crafted line overflows the stack),
  // while replacing in place would make repeated patterns quadratic.
  const auto at = [&](std::size_t i, const char* s) { return text.compare(i, std::strlen(s), s) == 0; };
  // The digits from `i` and where they end (`i` itself when there are none).
  const auto digits = [&](std::size_t i) {
    std::size_t end = i;
    while (end < text.size() && text[end] >= '0' && text[end] <= '9') ++end;
    return std::pair{text.substr(i, end - i), end};
  };
  std::string out;
  out.reserve(text.size() + 64);
  std::size_t i = 0;
  while (i < text.size()) {
    if (at(i, "mmbalance::NWayMultiModalNet(")) {
      out += "mmbalance::MultiModalNet(";
      i += std::strlen("mmbalance::NWayMultiModalNet(");
      continue;
    }
    if (at(i, "mmbalance::NWayMMTM(")) {
      out += "mmbalance::MMTM(";
      i += std::strlen("mmbalance::NWayMMTM(");
      continue;
    }
    if (at(i, "mmbalance::MMTM(dim0=")) {
      const auto [dim0, end0] = digits(i + std::strlen("mmbalance::MMTM(dim0="));
      if (!dim0.empty() && at(end0, ", dim1=")) {
        const auto [dim1, end1] = digits(end0 + std::strlen(", dim1="));
        if (!dim1.empty()) {
          out += "mmbalance::MMTM(dims=[" + dim0 + ", " + dim1 + "]";
          i = end1;
          continue;
        }
      }
    }
    if (at(i, "mmbalance::MultiModalNet(stages=")) {
      const auto [stages, end] = digits(i + std::strlen("mmbalance::MultiModalNet(stages="));
      if (!stages.empty() && at(end, ", taps=[")) {
        std::string taps;  // each tap at the same stage of both branches
        std::size_t next = end + std::strlen(", taps=[");
        for (bool more = true; more;) {
          const auto [stage, after] = digits(next);
          if (stage.empty()) break;
          taps += (taps.empty() ? "(" : ", (") + stage + ", " + stage + ")";
          next = after;
          more = at(next, ", ");
          if (more) next += 2;
        }
        if (at(next, "])")) {
          out += "mmbalance::MultiModalNet(branches=2, taps=[" + taps + "])";
          i = next + 2;
          continue;
        }
      }
    }
    out += text[i++];
  }
  return out;
}

/// Throws naming the first line where two module descriptions differ.
inline void check_same_modules(const std::string& recorded, const std::string& current,
                               const std::string& source) {
  const std::string saved = with_joint_layer_renamed(recorded, current, /*description=*/true);
  if (saved == current) return;
  const LineDifference d = first_difference(saved, current);
  TORCH_CHECK(false, "checkpoint ", source, " was made for modules with other options: line ",
              d.line, " is '", d.in_first, "' in the checkpoint but '", d.in_second,
              "' in this model");
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

/// The modules of `module` with their options, as LibTorch prints them (e.g. an MMTM's
/// ratio and gate_scale, which change what the weights compute but not their shapes).
inline std::string module_description(const torch::nn::Module& module) {
  std::ostringstream out;
  out << module;
  return out.str();
}

namespace detail {

// A checkpoint file: this line, the payload's size and its FNV-1a checksum (8 bytes each,
// little-endian), then the LibTorch archive. Any damage to the file (a flipped bit, a
// truncation, an insertion) is found before LibTorch parses a byte of it.
inline constexpr std::string_view kCheckpointMagic = "mmbalance checkpoint v1\n";
inline constexpr std::size_t kCheckpointHeader = kCheckpointMagic.size() + 16;

inline std::uint64_t fnv1a(std::string_view bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const char c : bytes) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

inline void put_u64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}

inline std::uint64_t get_u64(std::string_view in) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(in[static_cast<std::size_t>(i)]);
  return v;
}

// CRC-32 as zip files use it (IEEE polynomial, reflected).
inline std::uint32_t crc32(std::string_view bytes) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t c = 0xFFFFFFFFu;
  for (const char ch : bytes) c = table[(c ^ static_cast<unsigned char>(ch)) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// Checks the zip structure of a LibTorch archive and every stored (uncompressed) record
// against its CRC-32 before LibTorch parses it: LibTorch's reader trusts both, and a
// damaged record can crash it (a payload re-wrapped behind a valid checksum reaches it).
// Every offset and size is checked against the archive's length before it is used.
inline void check_zip_records(std::string_view zip, const std::string& path) {
  const auto fail = [&](const auto&... what) {
    TORCH_CHECK(false, "checkpoint ", path, " is damaged: ", what...);
  };
  const auto u = [&](std::size_t at, int bytes) {
    std::uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(zip[at + static_cast<std::size_t>(i)]);
    return v;
  };
  const std::size_t size = zip.size();
  // LibTorch writes no archive comment: the end-of-directory record is the last 22 bytes.
  if (size < 22 || u(size - 22, 4) != 0x06054b50) fail("its archive has no zip directory at its end");
  const std::size_t eocd = size - 22;
  std::uint64_t entries = u(eocd + 10, 2), dir_size = u(eocd + 12, 4), dir_offset = u(eocd + 16, 4);
  // Zip64 (LibTorch always writes it): a locator just before names the zip64
  // end-of-directory record, which miniz reads in place of the fields above; they must
  // agree where those are not saturated, so that this walks the directory miniz walks.
  const bool saturated = entries == 0xFFFF || dir_size == 0xFFFFFFFF || dir_offset == 0xFFFFFFFF;
  if (eocd >= 20 && u(eocd - 20, 4) == 0x07064b50) {
    const std::uint64_t record = u(eocd - 20 + 8, 8);
    if (record > eocd || eocd - record < 56 || u(record, 4) != 0x06064b50) {
      fail("its archive's zip64 directory record is missing");
    }
    const std::uint64_t entries64 = u(record + 32, 8), size64 = u(record + 40, 8),
                        offset64 = u(record + 48, 8);
    if ((entries != 0xFFFF && entries != entries64) || (dir_size != 0xFFFFFFFF && dir_size != size64) ||
        (dir_offset != 0xFFFFFFFF && dir_offset != offset64)) {
      fail("its archive's two zip directory records disagree");
    }
    entries = entries64;
    dir_size = size64;
    dir_offset = offset64;
  } else if (saturated) {
    fail("its archive's zip64 locator is missing");
  }
  if (dir_offset > size || dir_size > size - dir_offset || entries > dir_size / 46) {
    fail("its archive's zip directory (", entries, " entries, ", dir_size, " bytes at ",
         dir_offset, ") does not fit in its ", size, " bytes");
  }
  std::size_t pos = dir_offset;
  const std::size_t end = dir_offset + dir_size;
  for (std::uint64_t e = 0; e < entries; ++e) {
    if (end - pos < 46 || u(pos, 4) != 0x02014b50) fail("zip directory entry ", e, " is malformed");
    const std::uint64_t method = u(pos + 10, 2), crc = u(pos + 16, 4);
    std::uint64_t stored = u(pos + 20, 4), length = u(pos + 24, 4), local = u(pos + 42, 4);
    const std::size_t name_length = u(pos + 28, 2), extra_length = u(pos + 30, 2),
                      comment_length = u(pos + 32, 2);
    if (46 + name_length + extra_length + comment_length > end - pos) {
      fail("zip directory entry ", e, " runs past the directory");
    }
    std::string name;  // for messages: printable bytes only
    for (const char c : zip.substr(pos + 46, std::min<std::size_t>(name_length, 80))) {
      name += (c >= 32 && c < 127) ? c : '?';
    }
    // Zip64 sizes and offset, in this order, for the fields saturated above.
    for (std::size_t x = pos + 46 + name_length; x + 4 <= pos + 46 + name_length + extra_length;) {
      const std::size_t id = u(x, 2), data_length = u(x + 2, 2);
      if (x + 4 + data_length > pos + 46 + name_length + extra_length) break;
      if (id == 1) {
        std::size_t field = x + 4;
        for (std::uint64_t* v : {&length, &stored, &local}) {
          if (*v != 0xFFFFFFFF) continue;
          if (field + 8 > x + 4 + data_length) fail("record ", name, " has a short zip64 field");
          *v = u(field, 8);
          field += 8;
        }
      }
      x += 4 + data_length;
    }
    // LibTorch stores tensor records and deflates its TorchScript code. A deflated
    // record's bounds are checked here, not its CRC-32 (that needs inflating it, and
    // LibTorch builds miniz without the check): damage inside one still reaches LibTorch.
    if (method != 0 && method != 8) fail("record ", name, " has compression method ", method);
    if (method == 0 && stored != length) fail("record ", name, " is stored with two sizes");
    if (local > size || size - local < 30 || u(local, 4) != 0x04034b50) {
      fail("record ", name, " has no local header at offset ", local);
    }
    const std::uint64_t data = local + 30 + u(local + 26, 2) + u(local + 28, 2);
    if (data > size || stored > size - data) {
      fail("record ", name, " (", stored, " bytes at ", data, ") runs past the archive's end");
    }
    if (method == 0 && crc32(zip.substr(data, length)) != crc) {
      fail("record ", name, " does not match its CRC-32");
    }
    pos += 46 + name_length + extra_length + comment_length;
  }
}

// The archive inside checkpoint `path`, after checking its header, size and checksum, and
// its zip records.
inline std::string read_checkpoint_payload(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot read checkpoint ", path, ": the file is missing or unreadable");
  const std::string file{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  TORCH_CHECK(!in.bad(), "cannot read checkpoint ", path, ": read error");
  const std::string_view bytes(file);
  TORCH_CHECK(bytes.size() >= kCheckpointHeader && bytes.substr(0, kCheckpointMagic.size()) == kCheckpointMagic,
              "checkpoint ", path, " is not an mmbalance checkpoint (no '",
              kCheckpointMagic.substr(0, kCheckpointMagic.size() - 1), "' header)");
  const std::uint64_t size = get_u64(bytes.substr(kCheckpointMagic.size(), 8));
  const std::uint64_t checksum = get_u64(bytes.substr(kCheckpointMagic.size() + 8, 8));
  const std::string_view payload = bytes.substr(kCheckpointHeader);
  TORCH_CHECK(size == payload.size(), "checkpoint ", path, " is damaged: it holds ",
              payload.size(), " bytes after its header, which promises ", size,
              " (truncated or extended)");
  TORCH_CHECK(fnv1a(payload) == checksum, "checkpoint ", path,
              " is damaged: its contents do not match their checksum");
  check_zip_records(payload, path);
  return std::string(payload);
}

}  // namespace detail

namespace detail {

// Adds the four records restore_states reads (model, optimizer, balancer, which
// parameters have gradients) to `archive` and returns its bytes: the payload of a
// checkpoint, or, alone, the in-memory snapshot load_checkpoint restores on a failure.
template <CheckpointModel Net, class BalancerT>
std::string write_states(torch::serialize::OutputArchive& archive, const Net& net,
                         const torch::optim::Optimizer& optimizer, const BalancerT& balancer) {
  torch::serialize::OutputArchive model, optim, bal;
  net->save(model);
  optimizer.save(optim);
  balancer.save(bal);
  archive.write("model", model);
  archive.write("optimizer", optim);
  archive.write("balancer", bal);
  archive.write("grad_defined", grad_defined(*net));
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

}  // namespace detail

/// Writes the model, the optimizer, the balancer (anything with `save(OutputArchive&)`)
/// and which parameters have gradients to `path`, with a checksum. The file is written to
/// `path + ".tmp"` and renamed, so an interrupted save never leaves a half-written
/// checkpoint under `path`.
template <CheckpointModel Net, class BalancerT>
void save_checkpoint(const std::string& path, const Net& net,
                     const torch::optim::Optimizer& optimizer, const BalancerT& balancer) {
  torch::serialize::OutputArchive archive;
  archive.write("architecture", architecture_fingerprint(*net));
  archive.write("modules", module_description(*net));
  const std::string payload = detail::write_states(archive, net, optimizer, balancer);
  std::string header(detail::kCheckpointMagic);
  detail::put_u64(header, payload.size());
  detail::put_u64(header, detail::fnv1a(payload));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << header << payload;
    out.flush();
    TORCH_CHECK(out.good(), "save_checkpoint: cannot write ", tmp);
  }
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "save_checkpoint: cannot rename ",
              tmp, " to ", path);
}

namespace detail {

// The one device all the model's parameters and buffers are on; none when they are spread
// over several devices (or there are none).
inline c10::optional<at::Device> model_device(const torch::nn::Module& net) {
  c10::optional<at::Device> device;
  for (const auto& tensors : {net.parameters(), net.buffers()}) {
    for (const at::Tensor& t : tensors) {
      if (!device) device = t.device();
      if (*device != t.device()) return c10::nullopt;
    }
  }
  return device;
}

// Whether this LibTorch keys optimizer state by the parameter's address (2.x) rather than
// by a text (1.x).
inline constexpr bool kOptimizerStateKeyedByAddress = std::is_same_v<
    typename std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>::key_type, void*>;

// LibTorch 1.x's optimizers write each parameter's state under its address in hexadecimal
// ("0x55d0..."); a LibTorch that keys state by address reads the keys back with
// std::stoull, which turns every such key into 0: the first parameter would get the state
// read last and the others an empty (moved-from) one, which the next step trips over.
// Refused instead, as is any key that is not a distinct decimal number.
inline void check_optimizer_keys_readable(torch::serialize::InputArchive& optim) {
  if constexpr (kOptimizerStateKeyedByAddress) {
    torch::serialize::InputArchive groups;
    at::Tensor group_count;
    // Not LibTorch's layout: its own reader reports what is wrong.
    if (!optim.try_read("param_groups", groups) || !groups.try_read("param_groups/size", group_count) ||
        group_count.numel() != 1) {
      return;
    }
    for (std::int64_t g = 0; g < group_count.item<std::int64_t>(); ++g) {
      std::set<std::string> seen;
      torch::serialize::InputArchive group;
      at::Tensor size;
      if (!groups.try_read("param_groups/" + std::to_string(g), group) || !group.try_read("params/size", size) ||
          size.numel() != 1) {
        return;
      }
      for (std::int64_t i = 0; i < size.item<std::int64_t>(); ++i) {
        c10::IValue key;
        if (!group.try_read("params/" + std::to_string(i), key) || !key.isString()) return;
        const std::string& k = key.toStringRef();
        TORCH_CHECK(k.rfind("0x", 0) != 0,
                    "its optimizer state was written by LibTorch 1.x, which keys parameters by "
                    "hexadecimal address ('", k, "'): LibTorch ", TORCH_VERSION,
                    " would read every key as 0 and leave the parameters without their state. "
                    "Resume it with LibTorch 1.x");
        TORCH_CHECK(!k.empty() && std::all_of(k.begin(), k.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
                        seen.insert(k).second,
                    "its optimizer record keys a parameter by '", k, "', not a decimal address distinct within its group");
      }
    }
  } else {
    (void)optim;
  }
}

// Loads the four records of `archive` (a checkpoint or a snapshot) into the three states.
template <CheckpointModel Net, class BalancerT>
void restore_states(torch::serialize::InputArchive& archive, Net& net,
                    torch::optim::Optimizer& optimizer, BalancerT& balancer) {
  torch::serialize::InputArchive model, optim, bal;
  at::Tensor grad_defined;
  TORCH_CHECK(archive.try_read("model", model) && archive.try_read("optimizer", optim) &&
                  archive.try_read("balancer", bal) && archive.try_read("grad_defined", grad_defined),
              "a model, optimizer, balancer or gradient record is missing");
  check_optimizer_keys_readable(optim);
  balancer.load(bal);  // first: it checks everything before it changes anything
  net->load(model);
  optimizer.load(optim);
  restore_grad_definedness(*net, grad_defined);
}

}  // namespace detail

/// Restores what `save_checkpoint` wrote; tensors go to the model's device (a model spread
/// over several devices: each where it was saved). Everything is
/// checked before anything is kept: a file that is not a checkpoint, another architecture
/// or module options (e.g. gate_scale), another policy (`checkpoint_identity`) or balancer options, an
/// optimizer of another type, or a damaged record gives a c10::Error naming the file and
/// what differs, with the model, the optimizer and the balancer as they were.
template <CheckpointModel Net, class BalancerT>
void load_checkpoint(const std::string& path, Net& net, torch::optim::Optimizer& optimizer,
                     BalancerT& balancer) {
  torch::serialize::InputArchive archive;
  {
    std::istringstream payload(detail::read_checkpoint_payload(path));
    try {
      // Onto the model's device: LibTorch's reader would otherwise move each parameter to
      // the device it was saved from (a GPU checkpoint made a CPU model a GPU one, and
      // could not be read at all without CUDA). A model spread over several devices gets
      // each tensor back where it was saved, as LibTorch does.
      archive.load_from(payload, detail::model_device(*net));
    } catch (const std::exception& e) {  // LibTorch's reader throws TorchScript errors too
      TORCH_CHECK(false, "cannot read checkpoint ", path, ": ", detail::error_text(e));
    }
  }
  c10::IValue saved;
  TORCH_CHECK(archive.try_read("architecture", saved) && saved.isString(),
              "checkpoint ", path, " has no architecture record; it was not written by "
              "mmbalance::save_checkpoint");
  detail::check_same_architecture(saved.toStringRef(), architecture_fingerprint(*net), path);
  c10::IValue modules;
  TORCH_CHECK(archive.try_read("modules", modules) && modules.isString(), "checkpoint ", path,
              " has no module description");
  detail::check_same_modules(detail::upgraded_module_description(modules.toStringRef()),
                             module_description(*net), path);
  torch::serialize::OutputArchive snapshot;
  const std::string backup = detail::write_states(snapshot, net, optimizer, balancer);
  try {
    detail::restore_states(archive, net, optimizer, balancer);
  } catch (const std::exception& e) {
    // LibTorch's optimizer load replaces the per-parameter state it reads and keeps the
    // rest: forget what the failed load added before the snapshot puts back what was.
    optimizer.state().clear();
    std::istringstream in(backup);
    torch::serialize::InputArchive undo;
    undo.load_from(in);
    detail::restore_states(undo, net, optimizer, balancer);
    TORCH_CHECK(false, "cannot restore checkpoint ", path, ": ", detail::error_text(e),
                " (the model, optimizer and balancer are unchanged)");
  }
}

}  // namespace mmbalance
