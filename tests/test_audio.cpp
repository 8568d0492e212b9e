#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "spoken_digits/log_mel.h"
#include "spoken_digits/wav.h"
#include "support.h"

using namespace mmbalance::examples;

namespace {

// A WAV file's bytes written by hand: RIFF header, `extra` chunks, fmt, data.
std::string wav_bytes(const std::vector<std::int16_t>& samples, std::uint32_t rate = 16000,
                      std::uint16_t format = 1, std::uint16_t channels = 1,
                      std::uint16_t bits = 16, const std::string& extra = "") {
  auto u32 = [](std::uint32_t v) {
    return std::string{char(v & 0xff), char((v >> 8) & 0xff), char((v >> 16) & 0xff), char(v >> 24)};
  };
  auto u16 = [](std::uint16_t v) { return std::string{char(v & 0xff), char(v >> 8)}; };
  std::string fmt = "fmt " + u32(16) + u16(format) + u16(channels) + u32(rate) +
                    u32(rate * channels * bits / 8) + u16(static_cast<std::uint16_t>(channels * bits / 8)) + u16(bits);
  std::string data = "data" + u32(static_cast<std::uint32_t>(2 * samples.size()));
  for (std::int16_t s : samples) data += u16(static_cast<std::uint16_t>(s));
  const std::string body = "WAVE" + extra + fmt + data;
  return "RIFF" + u32(static_cast<std::uint32_t>(body.size())) + body;
}

}  // namespace

TEST_CASE("WAV reader: 16-bit PCM mono, chunks skipped with their padding", "[audio]") {
  // A 3-byte LIST chunk (padded to 4) before the format: skipped.
  const std::string list = std::string("LIST") + std::string{3, 0, 0, 0} + "abc" + std::string(1, '\0');
  const Wave w = parse_wav(wav_bytes({0, 16384, -32768, 32767, -1}, 22050, 1, 1, 16, list), "x.wav");
  CHECK(w.sample_rate == 22050);
  REQUIRE(w.samples.numel() == 5);
  const std::vector<float> expect{0.0f, 0.5f, -1.0f, 32767.0f / 32768.0f, -1.0f / 32768.0f};
  for (int i = 0; i < 5; ++i) CHECK(w.samples[i].item<float>() == expect[static_cast<size_t>(i)]);
}

TEST_CASE("WAV reader refuses what it cannot read, naming the file", "[audio][bad-input]") {
  const std::string good = wav_bytes({1, 2, 3, 4});
  CHECK_THROWS_WITH(parse_wav("RIFX" + good.substr(4), "a.wav"), Catch::Contains("a.wav: not a RIFF/WAVE"));
  CHECK_THROWS_WITH(parse_wav(good.substr(0, good.size() - 2), "b.wav"),
                    Catch::Contains("b.wav: chunk 'data' promises 8 bytes, 6 are left"));
  CHECK_THROWS_WITH(parse_wav(wav_bytes({1, 2}, 16000, 1, 2), "c.wav"),
                    Catch::Contains("expected 16-bit PCM mono") && Catch::Contains("2 channels"));
  CHECK_THROWS_WITH(parse_wav(wav_bytes({1, 2}, 16000, 3), "d.wav"), Catch::Contains("format 3"));
  CHECK_THROWS_WITH(parse_wav(wav_bytes({1, 2}, 50), "e.wav"), Catch::Contains("sample rate 50"));
  CHECK_THROWS_WITH(parse_wav(wav_bytes({}), "f.wav"), Catch::Contains("data chunk of 0 bytes"));
  CHECK_THROWS_WITH(parse_wav(good.substr(0, 36), "g.wav"), Catch::Contains("g.wav: no data chunk"));
  std::string huge = good;
  huge[40] = huge[41] = huge[42] = huge[43] = '\xff';  // data size 4 GiB
  CHECK_THROWS_WITH(parse_wav(huge, "h.wav"), Catch::Contains("promises 4294967295 bytes"));
  CHECK_THROWS_WITH(read_wav("/nonexistent/x.wav"), Catch::Contains("cannot open /nonexistent/x.wav"));
}

TEST_CASE("WAV reader: seeded mutations load or are refused naming the file",
          "[audio][corrupt]") {
  std::vector<std::int16_t> samples;
  for (int i = 0; i < 64; ++i) samples.push_back(static_cast<std::int16_t>(1000 * std::sin(i * 0.3)));
  const std::string good = wav_bytes(samples, 16000, 1, 1, 16, std::string("LIST") + std::string{2, 0, 0, 0} + "ab");
  std::mt19937_64 gen(7);
  int refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bad = good;
    switch (trial % 4) {
      case 0: bad[gen() % bad.size()] ^= static_cast<char>(1 << (gen() % 8)); break;
      case 1: bad.resize(gen() % bad.size()); break;
      case 2: bad.insert(gen() % bad.size(), std::string(1 + gen() % 5, static_cast<char>(gen()))); break;
      default: {  // a huge or odd size in one of the size fields
        // the RIFF size, the LIST size, the fmt size and the data size (after the
        // 10-byte LIST chunk)
        const std::size_t at = std::vector<std::size_t>{4, 16, 26, 50}[gen() % 4];
        for (int b = 0; b < 4 && at + b < bad.size(); ++b) bad[at + b] = static_cast<char>(gen());
      }
    }
    try {
      const Wave w = parse_wav(bad, "m.wav");
      CHECK(w.samples.numel() > 0);
    } catch (const c10::Error& e) {
      ++refused;
      REQUIRE_THAT(e.what_without_backtrace(), Catch::Contains("m.wav"));
    }
  }
  CHECK(refused > 500);
}

TEST_CASE("Mel filter bank equals the triangle formula on the HTK mel scale", "[audio]") {
  const LogMelOptions o = LogMelOptions(8000).n_fft(64).n_mels(6).f_min(100).f_max(3500);
  const at::Tensor bank = mel_filter_bank(o);
  REQUIRE(bank.sizes() == at::IntArrayRef({6, 33}));
  auto mel = [](double hz) { return 2595.0 * std::log10(1.0 + hz / 700.0); };
  auto hz = [](double m) { return 700.0 * (std::pow(10.0, m / 2595.0) - 1.0); };
  for (int m = 0; m < 6; ++m) {
    const double step = (mel(3500) - mel(100)) / 7.0;
    const double lo = hz(mel(100) + m * step), mid = hz(mel(100) + (m + 1) * step),
                 hi = hz(mel(100) + (m + 2) * step);
    for (int k = 0; k < 33; ++k) {
      const double f = 4000.0 * k / 32.0;
      const double w = f <= lo || f >= hi ? 0.0 : f <= mid ? (f - lo) / (mid - lo) : (hi - f) / (hi - mid);
      CHECK(bank[m][k].item<float>() == Approx(w).margin(1e-6));
    }
  }
  CHECK_THROWS_WITH(mel_filter_bank(LogMelOptions(8000).f_max(5000)), Catch::Contains("f_max 5000"));
}

TEST_CASE("Log-mel spectrogram equals a naive DFT of Hann-windowed frames", "[audio]") {
  const LogMelOptions o = LogMelOptions(8000).n_fft(32).hop(12).n_mels(5).floor(1e-4);
  const int n = 100;
  std::vector<double> x(n);
  for (int i = 0; i < n; ++i) x[i] = std::sin(0.002 * i * i) + 0.3 * std::cos(1.1 * i);
  at::Tensor samples = at::empty({n}, at::kFloat);
  for (int i = 0; i < n; ++i) samples[i] = static_cast<float>(x[i]);
  const at::Tensor got = log_mel_spectrogram(samples, o);
  const int frames = 1 + (n - 32) / 12;
  REQUIRE(got.sizes() == at::IntArrayRef({5, frames}));
  const at::Tensor bank = mel_filter_bank(o).to(at::kDouble);
  const double pi = std::acos(-1.0);
  for (int t = 0; t < frames; ++t) {
    std::vector<double> power(17);
    for (int k = 0; k < 17; ++k) {
      double re = 0, im = 0;
      for (int j = 0; j < 32; ++j) {
        const double w = 0.5 - 0.5 * std::cos(2 * pi * j / 32.0);  // periodic Hann
        re += w * x[t * 12 + j] * std::cos(2 * pi * k * j / 32.0);
        im -= w * x[t * 12 + j] * std::sin(2 * pi * k * j / 32.0);
      }
      power[k] = re * re + im * im;
    }
    for (int m = 0; m < 5; ++m) {
      double e = 0;
      for (int k = 0; k < 17; ++k) e += bank[m][k].item<double>() * power[k];
      CHECK(got[m][t].item<float>() == Approx(std::log(e + 1e-4)).epsilon(1e-4).margin(1e-4));
    }
  }
  CHECK_THROWS_WITH(log_mel_spectrogram(at::zeros({10}), o), Catch::Contains("at least n_fft=32"));
}
