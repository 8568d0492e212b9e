#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include <unistd.h>

#include "colored_mnist/colored_mnist_data.h"
#include "colored_mnist/mnist_readers.h"

#include "support.h"

using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

std::string idx(std::vector<std::uint32_t> dims, std::size_t data_bytes, std::uint8_t value = 7,
                std::uint8_t type = 0x08) {
  std::string s{'\0', '\0', static_cast<char>(type), static_cast<char>(dims.size())};
  for (auto d : dims) {
    for (int shift : {24, 16, 8, 0}) s += static_cast<char>((d >> shift) & 0xff);
  }
  s += std::string(data_bytes, static_cast<char>(value));
  return s;
}

void write_digits(const fs::path& dir, int per_class) {
  for (int d = 0; d < 10; ++d) {
    std::string data = "{\"data\": [";
    for (int i = 0; i < per_class * 784; ++i) {
      if (i > 0) data += ',';
      data += i % 7 ? "0" : "0.5";
    }
    write(dir / (std::to_string(d) + ".json"), data + "]}");
  }
}

}  // namespace

TEST_CASE("MNIST JSON digits load with labels from the file name", "[data]") {
  auto dir = mmbalance::testing::fresh_test_dir("data", "json_ok");
  write_digits(dir, 2);
  const auto d = load_mnist_json(dir);
  CHECK(d.images.sizes().vec() == std::vector<int64_t>{20, 1, 28, 28});
  CHECK(d.labels[0].item<int64_t>() == 0);
  CHECK(d.labels[19].item<int64_t>() == 9);
  CHECK(d.images.max().item<float>() == 0.5f);
}

TEST_CASE("MNIST JSON: missing, corrupt or malformed files are named", "[data][bad-input]") {
  CHECK_THROWS_WITH(load_mnist_json("/nonexistent/digits"),
                    Catch::Contains("/nonexistent/digits does not exist"));
  auto dir = mmbalance::testing::fresh_test_dir("data", "json_bad");
  CHECK_THROWS_WITH(load_mnist_json(dir), Catch::Contains("0.json") && Catch::Contains("missing"));
  write_digits(dir, 1);
  write(dir / "3.json", "{\"data\": [0, 0.5,");
  CHECK_THROWS_WITH(load_mnist_json(dir), Catch::Contains("3.json is not valid JSON"));
  write(dir / "3.json", "{\"pixels\": []}");
  CHECK_THROWS_WITH(load_mnist_json(dir), Catch::Contains("3.json: expected an object with a \"data\" array"));
  write(dir / "3.json", "{\"data\": [0, 0.5, 1]}");
  CHECK_THROWS_WITH(load_mnist_json(dir), Catch::Contains("3 values, expected a non-zero multiple of 784"));
  std::string big = "{\"data\": [2";
  for (int i = 1; i < 784; ++i) big += ",0";
  write(dir / "3.json", big + "]}");
  CHECK_THROWS_WITH(load_mnist_json(dir), Catch::Contains("value 0 = 2 is outside [0, 1]"));
}

TEST_CASE("IDX files load and are checked strictly", "[data][bad-input]") {
  auto dir = mmbalance::testing::fresh_test_dir("data", "idx");
  write(dir / "images", idx({3, 28, 28}, 3 * 784, 255));
  write(dir / "labels", idx({3}, 3, 4));
  const auto d = load_idx_pair(dir / "images", dir / "labels");
  CHECK(d.images.sizes().vec() == std::vector<int64_t>{3, 1, 28, 28});
  CHECK(d.images.max().item<float>() == 1.0f);
  CHECK(d.labels[2].item<int64_t>() == 4);

  CHECK_THROWS_WITH(load_idx_ubyte(dir / "missing", 3), Catch::Contains("missing or unreadable"));
  write(dir / "short", "\0\0");
  CHECK_THROWS_WITH(load_idx_ubyte(dir / "short", 1), Catch::Contains("too short for an IDX header"));
  write(dir / "magic", idx({3}, 3, 0, 0x0d));
  CHECK_THROWS_WITH(load_idx_ubyte(dir / "magic", 1),
                    Catch::Contains("IDX magic is 0,0,13,1, expected 0,0,8,1"));
  CHECK_THROWS_WITH(load_idx_ubyte(dir / "labels", 3), Catch::Contains("expected 0,0,8,3"));
  write(dir / "truncated", idx({3, 28, 28}, 3 * 784 - 5));
  CHECK_THROWS_WITH(load_idx_ubyte(dir / "truncated", 3),
                    Catch::Contains("2347 data bytes, the header promises 2352"));
  write(dir / "small", idx({3, 14, 14}, 3 * 196));
  CHECK_THROWS_WITH(load_idx_pair(dir / "small", dir / "labels"),
                    Catch::Contains("images are 14x14, expected 28x28"));
  write(dir / "labels2", idx({2}, 2));
  CHECK_THROWS_WITH(load_idx_pair(dir / "images", dir / "labels2"),
                    Catch::Contains("has 3 images but") && Catch::Contains("has 2 labels"));
  write(dir / "labels_bad", idx({3}, 3, 12));
  CHECK_THROWS_WITH(load_idx_pair(dir / "images", dir / "labels_bad"),
                    Catch::Contains("label 12 is outside 0..9"));
}

TEST_CASE("Colored splits: colour follows the label in training only", "[data]") {
  auto gen = at::detail::createCPUGenerator(0);
  LabelledImages gray{at::rand({400, 1, 28, 28}, gen) + 0.1, at::arange(400, at::kLong) % 10};
  LabelledImages test{at::rand({200, 1, 28, 28}, gen) + 0.1, at::arange(200, at::kLong) % 10};
  const auto s = make_colored_splits(gray, test, 300, 100, 0.0, 5);
  CHECK(s.train.size() == 300);
  CHECK(s.validation.size() == 100);
  CHECK(s.test.size() == 200);
  CHECK(s.train.x[0].sizes().vec() == std::vector<int64_t>{300, 3, 28, 28});
  // Without noise a training colour is exactly the label's palette colour.
  const auto colour = (s.train.x[0] / s.train.x[1]).mean({2, 3});
  CHECK(torch::allclose(colour, palette().index_select(0, s.train.y), 1e-4, 1e-5));
  // In test the colour is independent of the label: it matches the label's colour
  // about one time in ten.
  const auto test_colour = (s.test.x[0] / s.test.x[1]).mean({2, 3});
  const auto same = (test_colour - palette().index_select(0, s.test.y)).abs().amax(1).lt(1e-4);
  CHECK(same.sum().item<int64_t>() < 50);
  CHECK_THROWS_WITH(make_colored_splits(gray, test, 300, 200, 0.0, 5),
                    Catch::Contains("cannot take 300 training and 200 validation digits from 400"));
}
