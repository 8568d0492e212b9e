// Every reader of outside data and of saved state, fed seeded mutations of valid files:
// bit flips, truncations, insertions and huge sizes written over header fields. Each
// mutated file either loads or gives a c10::Error naming the file; never another
// exception, a crash (the sanitizer run, scripts/sanitize, watches for those), a hang or
// an allocation sized by an unchecked field.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>

#include <stb_image_write.h>
#include <unistd.h>

#include "colored_mnist/mnist_readers.h"
#include "modelnet40/mvcnn.h"
#include "nvgesture/nvgesture_clips.h"
#include "support.h"

using namespace mmbalance::examples;
namespace fs = std::filesystem;

namespace {

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// One random damage to `good`; `header` is how many leading bytes hold size fields.
std::string mutate(const std::string& good, std::size_t header, std::mt19937_64& rng) {
  std::string s = good;
  auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % std::max<std::size_t>(n, 1)); };
  switch (rng() % 5) {
    case 0: {  // a few bit flips anywhere
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int i = 0; i < flips; ++i) {
        const std::size_t at = pick(s.size());
        s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8)));
      }
      break;
    }
    case 1:  // truncation
      s.resize(pick(s.size()));
      break;
    case 2: {  // random bytes inserted
      std::string junk(1 + pick(64), '\0');
      for (auto& c : junk) c = static_cast<char>(rng());
      s.insert(pick(s.size() + 1), junk);
      break;
    }
    case 3: {  // a huge value over a 4-byte field of the header
      const std::size_t at = pick(header > 4 ? header - 3 : 1);
      const char huge[4] = {'\x7f', '\xff', '\xff', '\xff'};
      for (int i = 0; i < 4 && at + i < s.size(); ++i) s[at + i] = huge[i];
      break;
    }
    default: {  // a byte overwritten inside the header
      if (!s.empty()) s[pick(std::min(header, s.size()))] = static_cast<char>(rng());
      break;
    }
  }
  if (s == good) s += '\n';  // every case must damage something
  return s;
}

struct Outcome {
  int loaded = 0, refused = 0;
};

// Writes `mutations` damaged versions of `good` to `target` and runs `load` on each.
Outcome fuzz(const std::string& good, std::size_t header, const fs::path& target, int mutations,
             std::uint64_t seed, const std::function<void()>& load, const std::string& must_name) {
  std::mt19937_64 rng(seed);
  Outcome o;
  for (int i = 0; i < mutations; ++i) {
    write_bytes(target, mutate(good, header, rng));
    try {
      load();
      ++o.loaded;
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      INFO("mutation " << i << ": " << what);
      CHECK(what.find(must_name) != std::string::npos);
      ++o.refused;
    }
    // Anything else (std::bad_alloc, a parser's own exception) escapes and fails the test.
  }
  write_bytes(target, good);
  return o;
}

std::string idx_bytes(std::vector<std::uint32_t> dims, std::uint8_t value) {
  std::string s{'\0', '\0', '\x08', static_cast<char>(dims.size())};
  std::size_t count = 1;
  for (auto d : dims) {
    for (int shift : {24, 16, 8, 0}) s += static_cast<char>((d >> shift) & 0xff);
    count *= d;
  }
  for (std::size_t i = 0; i < count; ++i) s += static_cast<char>(value + i % 3);
  return s;
}

std::string png_bytes(int w, int h, int channels, int seed) {
  std::vector<unsigned char> pixels(static_cast<std::size_t>(w * h * channels));
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<unsigned char>((i * 37 + seed) % 251);
  const fs::path tmp = mmbalance::testing::fresh_test_dir("corrupt", "png") / "image.png";
  REQUIRE(stbi_write_png(tmp.c_str(), w, h, channels, pixels.data(), w * channels) != 0);
  return read_bytes(tmp);
}

}  // namespace

TEST_CASE("IDX files: mutations load or are refused naming the file", "[corrupt]") {
  const fs::path dir = mmbalance::testing::fresh_test_dir("corrupt", "idx");
  const fs::path images = dir / "train-images-idx3-ubyte", labels = dir / "train-labels-idx1-ubyte";
  const std::string good_images = idx_bytes({5, 28, 28}, 7), good_labels = idx_bytes({5}, 1);
  write_bytes(images, good_images);
  write_bytes(labels, good_labels);
  REQUIRE_NOTHROW(load_idx_pair(images, labels));
  const auto a = fuzz(good_images, 16, images, 800, 1, [&] { load_idx_pair(images, labels); }, images.string());
  const auto b = fuzz(good_labels, 8, labels, 400, 2, [&] { load_idx_pair(images, labels); },
                      labels.string());
  CHECK(a.refused > 0);
  CHECK(b.refused > 0);
}

TEST_CASE("The digits' JSON files: mutations load or are refused naming the file", "[corrupt]") {
  const fs::path dir = mmbalance::testing::fresh_test_dir("corrupt", "json");
  std::string one_digit = "{\"data\": [";
  for (int i = 0; i < 784; ++i) one_digit += std::string(i ? "," : "") + (i % 5 ? "0" : "0.75");
  one_digit += "]}";
  for (int d = 0; d < 10; ++d) write_bytes(dir / (std::to_string(d) + ".json"), one_digit);
  REQUIRE_NOTHROW(load_mnist_json(dir));
  const fs::path target = dir / "3.json";
  const auto o = fuzz(one_digit, 12, target, 500, 3, [&] { load_mnist_json(dir); }, target.string());
  CHECK(o.refused > 0);
}

TEST_CASE("MVCNN view PNGs and trees: mutations load or are refused naming the file",
          "[corrupt]") {
  const fs::path root = mmbalance::testing::fresh_test_dir("corrupt", "mvcnn");
  for (const char* cls : {"chair", "lamp"}) {
    for (const char* split : {"train", "test"}) {
      fs::create_directories(root / cls / split);
      for (int v : {1, 7}) {
        write_bytes(root / cls / split / (std::string(cls) + "_0001.obj.shaded_" + view_name(v) + ".png"),
                    png_bytes(16, 16, 1, v));
      }
    }
  }
  auto load = [&] {
    const auto index = index_mvcnn(root, 1, 7);
    load_mvcnn_views(index.train, 0);
  };
  REQUIRE_NOTHROW(load());
  const fs::path target = root / "lamp" / "train" / "lamp_0001.obj.shaded_v007.png";
  // The PNG header's width and height sit at bytes 16..23.
  const auto o = fuzz(read_bytes(target), 33, target, 600, 4, load, target.string());
  CHECK(o.refused > 0);
}

TEST_CASE("NVGesture list files and frames: mutations load or are refused naming the file",
          "[corrupt]") {
  const fs::path root = mmbalance::testing::fresh_test_dir("corrupt", "nvgesture");
  const fs::path clip = root / "Video_data" / "class_01" / "subject1_r0";
  for (const char* video : {"sk_color_all", "sk_depth_all"}) {
    fs::create_directories(clip / video);
    for (int f = 0; f < 6; ++f) {
      char name[16];
      std::snprintf(name, sizeof name, "%05d.png", f);
      write_bytes(clip / video / name, png_bytes(12, 10, std::string(video) == "sk_color_all" ? 3 : 1, f));
    }
  }
  const std::string good_list =
      "path:./Video_data/class_01/subject1_r0 depth:sk_depth:1:5 color:sk_color:1:5 "
      "duo_left:duo_left:1:5 label:1\n";
  const fs::path list = root / "nvgesture_train.lst";
  write_bytes(list, good_list);
  const ClipShape shape{4, 8, 6};
  auto load = [&] {
    const auto clips = index_nvgesture(root, list);
    for (const auto& c : clips) {
      load_clip(c.rgb, 3, shape, 0, 1, 1, false);
      load_clip(c.depth, 1, shape, 0, 1, 1, false);
    }
  };
  REQUIRE_NOTHROW(load());
  const auto a = fuzz(good_list, good_list.size(), list, 600, 5, load, list.string());
  const fs::path frame = clip / "sk_color_all" / "00002.png";
  const auto b = fuzz(read_bytes(frame), 33, frame, 400, 6, load, frame.string());
  CHECK(a.refused > 0);
  CHECK(b.refused > 0);
}

TEST_CASE("Checkpoints: mutations are refused naming the file, nothing changed", "[corrupt][libtorch_leak]") {
  using namespace mmbalance;
  using namespace mmbalance::testing;
  auto net = small_net(40);
  auto opt = make_sgd(net);
  GuidedBalancer balancer(net, GuidedPolicy(GuidedOptions().alpha(0.0).Q(2)));
  train_steps(net, opt, balancer, 0, 5, 4);
  const fs::path path = mmbalance::testing::fresh_test_dir("corrupt", "checkpoint") / "run.pt";
  save_checkpoint(path.string(), net, opt, balancer);
  const auto before = net.clone();
  const std::string good = read_bytes(path);
  const auto o = fuzz(good, mmbalance::detail::kCheckpointHeader, path, 600, 7,
                      [&] { load_checkpoint(path.string(), net, opt, balancer); }, path.string());
  CHECK(o.loaded == 0);  // every damage is caught by the header or the checksum
  CHECK(same_state(*net, *before));

  // A hostile payload behind a valid header and checksum reaches LibTorch's reader and the
  // balancer's checks: damage to the archive itself, re-wrapped.
  const std::size_t header = mmbalance::detail::kCheckpointHeader;
  const std::string payload = good.substr(header);
  std::mt19937_64 rng(8);
  int refused = 0;
  for (int i = 0; i < 300; ++i) {
    const std::string damaged = mutate(payload, 64, rng);
    std::string file(mmbalance::detail::kCheckpointMagic);
    for (const std::uint64_t v : {static_cast<std::uint64_t>(damaged.size()), mmbalance::detail::fnv1a(damaged)}) {
      for (int b = 0; b < 8; ++b) file += static_cast<char>((v >> (8 * b)) & 0xff);
    }
    write_bytes(path, file + damaged);
    const auto state = net.clone();  // a damaged archive that loads changes the model
    try {
      load_checkpoint(path.string(), net, opt, balancer);
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      INFO("re-wrapped mutation " << i << ": " << what);
      CHECK(what.find(path.string()) != std::string::npos);
      ++refused;
      CHECK(same_state(*net, *state));  // a refused one changes nothing
    }
  }
  CHECK(refused > 0);
}
