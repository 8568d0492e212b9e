#pragma once
// ModelNet40 as MVCNN renders it (Su et al. 2015): 12 gray views per object,
//   <root>/<class>/<train|test>/<object>_vVVV.png   (e.g. airplane_0001.obj.shaded_v001.png)
// Two views of each object (the paper's front and rear: v001 and v007) are the two
// modalities. The index checks the layout strictly; images are decoded with stb_image
// (Debian's libstb-dev) and kept as uint8.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/images.h"
#include "common/splits.h"

namespace mmbalance::examples {

struct MvcnnObject {
  std::int64_t label = 0;
  std::filesystem::path view0, view1;
};

struct MvcnnIndex {
  std::vector<std::string> classes;  ///< sorted folder names; label = position
  std::vector<MvcnnObject> train, test;
};

inline std::string view_name(int view) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "v%03d", view);
  return buf;
}

/// Lists the objects of `root` with their views `view0` and `view1`. Throws naming the
/// folder or file when the layout is not MVCNN's: no class folders, a class without a
/// train or test folder, a folder without views, a PNG whose name has no _vNNN suffix, an
/// object lacking one of the two views.
inline MvcnnIndex index_mvcnn(const std::filesystem::path& root, int view0, int view1) {
  namespace fs = std::filesystem;
  TORCH_CHECK(fs::is_directory(root), "ModelNet40 folder ", root.string(),
              " does not exist (expected <root>/<class>/<train|test>/<object>_vNNN.png)");
  TORCH_CHECK(view0 != view1, "the two views must differ, got v", view0, " twice");
  MvcnnIndex index;
  for (const auto& e : fs::directory_iterator(root)) {
    if (e.is_directory()) index.classes.push_back(e.path().filename().string());
  }
  std::sort(index.classes.begin(), index.classes.end());
  TORCH_CHECK(index.classes.size() >= 2, "ModelNet40 folder ", root.string(), " has ",
              index.classes.size(), " class folders; expected one per class (40)");
  static const std::regex view_file(R"((.+)_v(\d{3})\.png)");
  for (std::size_t label = 0; label < index.classes.size(); ++label) {
    for (const char* split : {"train", "test"}) {
      const fs::path dir = root / index.classes[label] / split;
      TORCH_CHECK(fs::is_directory(dir), "missing folder ", dir.string());
      std::map<std::string, std::map<int, fs::path>> objects;  // sorted: a stable order
      for (const auto& f : fs::directory_iterator(dir)) {
        if (!f.is_regular_file() || f.path().extension() != ".png") continue;
        std::smatch m;
        const std::string name = f.path().filename().string();
        TORCH_CHECK(std::regex_match(name, m, view_file), "unexpected file ", f.path().string(),
                    ": view images are named <object>_vNNN.png");
        objects[m[1].str()][std::stoi(m[2].str())] = f.path();
      }
      TORCH_CHECK(!objects.empty(), "no views (<object>_vNNN.png) in ", dir.string());
      auto& out = std::string(split) == "train" ? index.train : index.test;
      for (const auto& [object, views] : objects) {
        for (int v : {view0, view1}) {
          TORCH_CHECK(views.count(v), "object ", (dir / object).string(), " has no view ",
                      view_name(v), " (", views.size(), " views found)");
        }
        out.push_back({static_cast<std::int64_t>(label), views.at(view0), views.at(view1)});
      }
    }
  }
  return index;
}

/// Decodes a PNG as one gray channel. Throws naming the file if it cannot be decoded or is
/// not `height` x `width` (0: any size).
inline at::Tensor load_gray_png(const std::filesystem::path& path, int height, int width) {
  const at::Tensor img = decode_image(path, 1);
  const auto h = img.size(1), w = img.size(2);
  TORCH_CHECK((height == 0 || h == height) && (width == 0 || w == width), "image ", path.string(),
              " is ", w, "x", h, " pixels; the other views are ", width, "x", height);
  return img;
}

/// Both views of `objects` as uint8 tensors (N, 1, size, size) and their labels. All images
/// must have the size of the first one; they are resized (bilinear) when `size` differs
/// from it (0: keep it).
inline Split load_mvcnn_views(const std::vector<MvcnnObject>& objects, int size) {
  TORCH_CHECK(!objects.empty(), "no objects to load");
  const at::Tensor first = load_gray_png(objects.front().view0, 0, 0);
  const int height = static_cast<int>(first.size(1)), width = static_cast<int>(first.size(2));
  const int out = size > 0 ? size : height;
  const auto n = static_cast<std::int64_t>(objects.size());
  Split s{{at::empty({n, 1, out, out}, at::kByte), at::empty({n, 1, out, out}, at::kByte)},
          at::empty({n}, at::kLong)};
  auto fit = [&](const at::Tensor& img) {
    if (height == out && width == out) return img;
    const at::Tensor f = img.unsqueeze(0).to(at::kFloat);
    return at::upsample_bilinear2d(f, {out, out}, /*align_corners=*/false)
        .round_().clamp_(0, 255).to(at::kByte).squeeze(0);
  };
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& o = objects[static_cast<std::size_t>(i)];
    s.x[0][i].copy_(fit(load_gray_png(o.view0, height, width)));
    s.x[1][i].copy_(fit(load_gray_png(o.view1, height, width)));
    s.y[i] = o.label;
  }
  return s;
}

}  // namespace mmbalance::examples
