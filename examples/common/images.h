#pragma once
// Decoding one image file (PNG, JPEG, ...) with stb_image (Debian's libstb-dev), for the
// example readers. The header's size is checked before any pixel buffer is allocated.

#include <cstdint>
#include <filesystem>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <stb_image.h>

namespace mmbalance::examples {

/// Images larger than this are refused before decoding: a damaged header can claim
/// billions of pixels, and the datasets' images are a few hundred pixels wide.
inline constexpr std::int64_t kMaxImagePixels = std::int64_t{1} << 26;  // 8192 x 8192

/// Decodes `path` as (channels, height, width) uint8 with `channels` channels (1: gray,
/// 3: RGB). Throws naming the file if it cannot be decoded or is absurdly large.
inline at::Tensor decode_image(const std::filesystem::path& path, int channels) {
  int w = 0, h = 0, c = 0;
  TORCH_CHECK(stbi_info(path.c_str(), &w, &h, &c) == 1, "cannot decode image ", path.string(), ": ",
              stbi_failure_reason() ? stbi_failure_reason() : "unknown format");
  TORCH_CHECK(w > 0 && h > 0 && std::int64_t{w} * h <= kMaxImagePixels, "image ", path.string(),
              " claims ", w, "x", h, " pixels; at most ", kMaxImagePixels, " are accepted");
  stbi_uc* pixels = stbi_load(path.c_str(), &w, &h, &c, channels);
  TORCH_CHECK(pixels != nullptr, "cannot decode image ", path.string(), ": ",
              stbi_failure_reason() ? stbi_failure_reason() : "unknown error");
  const at::Tensor img = at::from_blob(pixels, {h, w, channels}, at::kByte).permute({2, 0, 1}).clone();
  stbi_image_free(pixels);
  return img;
}

}  // namespace mmbalance::examples
