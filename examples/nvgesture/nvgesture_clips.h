#pragma once
// NVGesture (Molchanov et al. 2016) from extracted frame folders, prepared as the paper
// does (App. A.4): 64 consecutive frames of a gesture (zero-padded on both sides when
// shorter), frames resized to 256 x 256 and cropped to 224 x 224 at one location for all
// frames and both modalities; training draws the window, the crop and a horizontal flip,
// evaluation takes the centre. Modality 0 is RGB (sk_color), modality 1 depth (sk_depth).
//
// Layout: NVGesture's own list files, whose lines read
//   path:./Video_data/class_01/subject13_r0 depth:sk_depth:138:218 color:sk_color:138:218 ... label:1
// and per clip the frames of each video extracted into <clip>/sk_color_all/ and
// <clip>/sk_depth_all/ (e.g. ffmpeg -i sk_color.avi sk_color_all/%05d.jpg), one image per
// frame in name order. The gesture is frames [start, end) of the colour entry, used for
// both modalities, as the paper does.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/images.h"
#include "common/splits.h"

namespace mmbalance::examples {

struct GestureClip {
  std::int64_t label = 0;  ///< 0-based (the list's label - 1)
  std::vector<std::filesystem::path> rgb, depth;  ///< the gesture's frames [start, end)
};

/// How clips become tensors.
struct ClipShape {
  std::int64_t frames = 64, resize = 256, crop = 224;
};

/// Reads a list file and indexes each clip's frames. Throws naming the file and line for
/// a malformed line, a missing frame folder, or a folder with fewer frames than the
/// line's end frame.
inline std::vector<GestureClip> index_nvgesture(const std::filesystem::path& root,
                                                const std::filesystem::path& list) {
  namespace fs = std::filesystem;
  std::ifstream in(list);
  TORCH_CHECK(in, "cannot open NVGesture list ", list.string());
  auto frames_of = [](const fs::path& dir, const std::string& where) {
    TORCH_CHECK(fs::is_directory(dir), where, ": missing frame folder ", dir.string(),
                " (extract each video's frames into <clip>/<video>_all/)");
    std::vector<fs::path> files;
    for (const auto& f : fs::directory_iterator(dir)) {
      const auto ext = f.path().extension();
      if (f.is_regular_file() && (ext == ".jpg" || ext == ".jpeg" || ext == ".png")) files.push_back(f.path());
    }
    std::sort(files.begin(), files.end());
    return files;
  };
  std::vector<GestureClip> clips;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = list.string() + ":" + std::to_string(number);
    std::istringstream fields(line);
    std::string field, path, color_video, depth_video;
    long start = -1, end = -1, label = -1;
    while (fields >> field) {
      if (field.rfind("path:", 0) == 0) {
        path = field.substr(5);
      } else if (field.rfind("color:", 0) == 0 || field.rfind("depth:", 0) == 0) {
        // kind:video:start:end
        std::istringstream parts(field);
        std::string kind, video, s, e;
        std::getline(parts, kind, ':');
        std::getline(parts, video, ':');
        std::getline(parts, s, ':');
        std::getline(parts, e, ':');
        TORCH_CHECK(!video.empty() && !s.empty() && !e.empty(), where, ": malformed entry '", field,
                    "' (expected ", kind, ":VIDEO:START:END)");
        if (kind == "color") {
          color_video = video;
          try {
            start = std::stol(s);
            end = std::stol(e);
          } catch (const std::exception&) {
            TORCH_CHECK(false, where, ": START and END of '", field, "' must be integers");
          }
        } else {
          depth_video = video;
        }
      } else if (field.rfind("label:", 0) == 0) {
        try {
          label = std::stol(field.substr(6));
        } catch (const std::exception&) {
          label = -1;
        }
      }
    }
    TORCH_CHECK(!path.empty() && !color_video.empty() && !depth_video.empty(), where,
                ": expected path:, color: and depth: entries, got '", line, "'");
    TORCH_CHECK(label >= 1, where, ": expected label:N with N >= 1, got '", line, "'");
    TORCH_CHECK(start >= 0 && end > start, where, ": the colour entry's frames [", start, ", ",
                end, ") are empty");
    const fs::path clip = (root / path).lexically_normal();
    GestureClip c;
    c.label = label - 1;
    for (const auto& [video, out] : {std::pair{color_video, &c.rgb}, std::pair{depth_video, &c.depth}}) {
      const fs::path dir = clip / (video + "_all");
      const auto files = frames_of(dir, where);
      TORCH_CHECK(static_cast<long>(files.size()) >= end, where, ": ", dir.string(), " has ",
                  files.size(), " frames, the gesture ends at frame ", end);
      out->assign(files.begin() + start, files.begin() + end);
    }
    clips.push_back(std::move(c));
  }
  TORCH_CHECK(!clips.empty(), "NVGesture list ", list.string(), " lists no clips");
  return clips;
}

/// Decodes one frame with `channels` channels as (channels, height, width) uint8.
inline at::Tensor load_frame(const std::filesystem::path& path, int channels) {
  return decode_image(path, channels);
}

/// One clip as (channels, frames, crop, crop) uint8: window [offset, offset + frames) of the
/// gesture (zero frames outside it), each frame resized to resize x resize, cropped at
/// (top, left), flipped if asked.
inline at::Tensor load_clip(const std::vector<std::filesystem::path>& files, int channels,
                            const ClipShape& shape, std::int64_t offset, std::int64_t top,
                            std::int64_t left, bool flip) {
  at::Tensor out = at::zeros({channels, shape.frames, shape.crop, shape.crop}, at::kByte);
  std::int64_t height = -1, width = -1;
  for (std::int64_t t = 0; t < shape.frames; ++t) {
    const std::int64_t f = offset + t;
    if (f < 0 || f >= static_cast<std::int64_t>(files.size())) continue;  // zero padding
    const auto& path = files[static_cast<std::size_t>(f)];
    at::Tensor frame = load_frame(path, channels);
    if (height < 0) {
      height = frame.size(1);
      width = frame.size(2);
    }
    TORCH_CHECK(frame.size(1) == height && frame.size(2) == width, "frame ", path.string(), " is ",
                frame.size(2), "x", frame.size(1), " pixels; the clip's other frames are ", width,
                "x", height);
    at::Tensor resized =
        at::upsample_bilinear2d(frame.unsqueeze(0).to(at::kFloat), {shape.resize, shape.resize}, false)
            .squeeze(0)
            .narrow(1, top, shape.crop)
            .narrow(2, left, shape.crop);
    if (flip) resized = resized.flip({2});
    out.select(1, t).copy_(resized.round().clamp(0, 255).to(at::kByte));
  }
  return out;
}

/// The loader of a list's clips: RGB (N, 3, T, crop, crop) and depth (N, 1, T, crop,
/// crop). With an augmentation seed each clip draws its window, crop and flip from
/// (seed, clip id); without one it takes the centre.
inline InputLoader nvgesture_loader(std::vector<GestureClip> clips, ClipShape shape) {
  TORCH_CHECK(shape.frames > 0 && shape.resize > 0 && shape.crop > 0 && shape.crop <= shape.resize,
              "clip shape: frames, resize and crop must be positive and crop <= resize, got ",
              shape.frames, ", ", shape.resize, ", ", shape.crop);
  return [clips = std::move(clips), shape](const at::Tensor& ids, std::optional<std::uint64_t> augment) {
    const std::int64_t n = ids.size(0);
    at::Tensor rgb = at::empty({n, 3, shape.frames, shape.crop, shape.crop}, at::kByte);
    at::Tensor depth = at::empty({n, 1, shape.frames, shape.crop, shape.crop}, at::kByte);
    const at::Tensor id = ids.to(at::kLong).contiguous();
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t k = id.data_ptr<std::int64_t>()[i];
      const GestureClip& c = clips.at(static_cast<std::size_t>(k));
      const auto length = static_cast<std::int64_t>(c.rgb.size());
      const std::int64_t slack = length - shape.frames, margin = shape.resize - shape.crop;
      // Too short: centred with zeros on both sides (offset < 0).
      std::int64_t offset = slack / 2, top = margin / 2, left = margin / 2;
      bool flip = false;
      if (augment) {
        std::mt19937_64 gen(*augment * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(k));
        auto uniform = [&](std::int64_t hi) {  // 0..hi
          return static_cast<std::int64_t>(gen() % static_cast<std::uint64_t>(hi + 1));
        };
        if (slack > 0) offset = uniform(slack);
        top = uniform(margin);
        left = uniform(margin);
        flip = uniform(1) == 1;
      }
      rgb[i].copy_(load_clip(c.rgb, 3, shape, offset, top, left, flip));
      depth[i].copy_(load_clip(c.depth, 1, shape, offset, top, left, flip));
    }
    return std::vector{rgb, depth};
  };
}

/// The labels of `clips` as a tensor.
inline at::Tensor gesture_labels(const std::vector<GestureClip>& clips) {
  std::vector<std::int64_t> labels;
  for (const auto& c : clips) labels.push_back(c.label);
  return at::tensor(labels, at::kLong);
}

}  // namespace mmbalance::examples
