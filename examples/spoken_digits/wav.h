#pragma once
// A strict reader of the WAV files scripts/make-speech writes (what espeak-ng writes):
// RIFF/WAVE, PCM, 16-bit, one channel. Every failure names the file and what was
// expected; no size read from the file is trusted before it is checked against the
// file's length.

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace mmbalance::examples {

static_assert(std::endian::native == std::endian::little,
              "wav.h copies little-endian PCM samples as they are");

/// The largest WAV file read_wav accepts (a spoken word is ~40 KB).
inline constexpr std::uintmax_t kMaxWavBytes = 64u << 20;

/// Samples in [-1, 1] (float) and their rate.
struct Wave {
  at::Tensor samples;
  std::int64_t sample_rate = 0;
};

namespace detail {
inline std::uint32_t le32(std::string_view b, std::size_t at) {
  return static_cast<std::uint32_t>(static_cast<unsigned char>(b[at])) |
         static_cast<std::uint32_t>(static_cast<unsigned char>(b[at + 1])) << 8 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(b[at + 2])) << 16 |
         static_cast<std::uint32_t>(static_cast<unsigned char>(b[at + 3])) << 24;
}
inline std::uint16_t le16(std::string_view b, std::size_t at) {
  return static_cast<std::uint16_t>(static_cast<unsigned char>(b[at]) |
                                    static_cast<unsigned char>(b[at + 1]) << 8);
}
}  // namespace detail

/// Parses the bytes of a WAV file; `name` is used in error messages.
inline Wave parse_wav(std::string_view bytes, const std::string& name) {
  TORCH_CHECK(bytes.size() >= 12 && bytes.substr(0, 4) == "RIFF" && bytes.substr(8, 4) == "WAVE",
              "WAV file ", name, ": not a RIFF/WAVE file");
  std::size_t pos = 12;
  bool have_format = false;
  Wave wave;
  while (pos + 8 <= bytes.size()) {
    const std::string_view id = bytes.substr(pos, 4);
    std::string printable;  // the chunk id for messages, control bytes as '?'
    for (char c : id) printable += (c >= 32 && c < 127) ? c : '?';
    const std::uint64_t size = detail::le32(bytes, pos + 4);
    pos += 8;
    TORCH_CHECK(size <= bytes.size() - pos, "WAV file ", name, ": chunk '", printable,
                "' promises ", size, " bytes, ", bytes.size() - pos, " are left (truncated?)");
    const std::string_view body = bytes.substr(pos, size);
    if (id == "fmt ") {
      TORCH_CHECK(size >= 16, "WAV file ", name, ": format chunk of ", size, " bytes, need 16");
      const std::uint16_t format = detail::le16(body, 0), channels = detail::le16(body, 2),
                          bits = detail::le16(body, 14);
      wave.sample_rate = detail::le32(body, 4);
      TORCH_CHECK(format == 1 && channels == 1 && bits == 16, "WAV file ", name,
                  ": expected 16-bit PCM mono, got format ", format, ", ", channels,
                  " channels, ", bits, " bits");
      TORCH_CHECK(wave.sample_rate >= 1000 && wave.sample_rate <= 192000, "WAV file ", name,
                  ": sample rate ", wave.sample_rate, " is outside 1000..192000");
      have_format = true;
    } else if (id == "data") {
      TORCH_CHECK(have_format, "WAV file ", name, ": data chunk before the format chunk");
      TORCH_CHECK(size % 2 == 0 && size > 0, "WAV file ", name, ": data chunk of ", size,
                  " bytes is not a whole number of 16-bit samples");
      const auto n = static_cast<std::int64_t>(size / 2);
      at::Tensor pcm = at::empty({n}, at::kShort);
      std::memcpy(pcm.data_ptr<std::int16_t>(), body.data(), size);  // little-endian host
      wave.samples = pcm.to(at::kFloat) / 32768.0;
      return wave;
    }
    pos += size + (size % 2);  // chunks are padded to even sizes
  }
  TORCH_CHECK(false, "WAV file ", name, ": no data chunk");
  return wave;
}

/// Reads and parses `path`.
inline Wave read_wav(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot open ", path.string(), ": file is missing or unreadable");
  std::error_code error;
  const std::uintmax_t length = std::filesystem::file_size(path, error);
  TORCH_CHECK(!error && length <= kMaxWavBytes, "WAV file ", path.string(), ": ",
              error ? "not a regular file" : "larger than the 64 MiB a WAV file may have");
  const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return parse_wav(bytes, path.string());
}

}  // namespace mmbalance::examples
