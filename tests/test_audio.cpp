#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include <unistd.h>

#include "spoken_digits/log_mel.h"
#include "spoken_digits/spoken_digits_data.h"
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

namespace fs = std::filesystem;

// A speech folder as scripts/make-speech writes it, with tones in place of words: speaker
// k says digit d as a sine of 300 + 150 d Hz (0.3 s at 22050 Hz, amplitude 0.2 + 0.1 k).
fs::path speech_fixture(const std::string& name, int speakers, std::uint32_t rate = 22050) {
  const fs::path dir = fs::temp_directory_path() / ("mmbalance_speech_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream tsv(dir / "speakers.tsv");
  tsv << "# eSpeak NG text-to-speech: fixture\n# speaker\tvoice\tvariant\tspeed\tpitch\n";
  for (int k = 0; k < speakers; ++k) {
    const std::string speaker = "s00" + std::to_string(k);
    tsv << speaker << "\ten-us\tm3\t150\t50\n";
    fs::create_directories(dir / speaker);
    for (int d = 0; d < 10; ++d) {
      std::vector<std::int16_t> samples(6615);
      for (std::size_t i = 0; i < samples.size(); ++i) {
        samples[i] = static_cast<std::int16_t>(32767 * (0.2 + 0.1 * k) *
                                               std::sin(2 * std::acos(-1.0) * (300.0 + 150.0 * d) * i / 22050.0));
      }
      std::ofstream(dir / speaker / (std::to_string(d) + ".wav"), std::ios::binary) << wav_bytes(samples, rate);
    }
  }
  return dir;
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

TEST_CASE("Speakers are split disjointly, reproducibly from the seed", "[audio][speech]") {
  std::vector<std::string> speakers;
  for (int i = 0; i < 12; ++i) {
    std::string name = "s";  // not "s" + to_string(...): GCC 12 warns falsely on that
    speakers.push_back(name += std::to_string(100 + i));
  }
  const SpeakerSplit a = split_speakers(speakers, 2, 3, 7), b = split_speakers(speakers, 2, 3, 7);
  CHECK(a.validation.size() == 2);
  CHECK(a.test.size() == 3);
  CHECK(a.train.size() == 7);
  std::set<std::string> all(a.train.begin(), a.train.end());
  all.insert(a.validation.begin(), a.validation.end());
  all.insert(a.test.begin(), a.test.end());
  CHECK(all.size() == 12);  // disjoint and complete
  CHECK((a.train == b.train && a.validation == b.validation && a.test == b.test));
  bool differs = false;  // another seed, another split (some seed of three differs)
  for (std::uint64_t seed : {8, 9, 10}) differs = differs || split_speakers(speakers, 2, 3, seed).test != a.test;
  CHECK(differs);
  CHECK_THROWS_WITH(split_speakers(speakers, 6, 6, 1), Catch::Contains("cannot take 6 validation and 6 test speakers from 12"));
}

TEST_CASE("Noise is added at the stated SNR, from the generator", "[audio][speech]") {
  at::Tensor clean = at::sin(at::arange(200000, at::kFloat) * 0.05) * 0.5;  // power 0.125
  auto gen = at::detail::createCPUGenerator(3);
  const at::Tensor noisy = add_noise(clean, 10.0, gen);
  const double noise_power = (noisy - clean).to(at::kDouble).square().mean().item<double>();
  CHECK(noise_power == Approx(0.0125).epsilon(0.02));  // 0.125 / 10^(10/10)
  auto gen_again = at::detail::createCPUGenerator(3);
  CHECK(torch::equal(add_noise(clean, 10.0, gen_again), noisy));
  CHECK(torch::equal(add_noise(clean, std::numeric_limits<double>::infinity(), gen), clean));
  const at::Tensor loud = add_noise(clean, -6.0, gen);  // noise 4x the signal's power
  CHECK((loud - clean).square().mean().item<double>() == Approx(0.125 * std::pow(10.0, 0.6)).epsilon(0.02));
  // Padded with as many zeros again: the SNR is still the word's, not the padded clip's.
  const at::Tensor padded = at::cat({clean, at::zeros_like(clean)});
  const at::Tensor noisy_padded = add_noise(padded, 10.0, gen, clean);
  CHECK((noisy_padded - padded).to(at::kDouble).square().mean().item<double>() == Approx(0.0125).epsilon(0.02));
  CHECK_THROWS_WITH(add_noise(clean, -std::numeric_limits<double>::infinity(), gen),
                    Catch::Contains("SNR must be a number of dB or +infinity"));
}

TEST_CASE("Clips are centred: padded with zeros or cropped to their middle", "[audio][speech]") {
  const at::Tensor three = at::tensor({1.0f, 2.0f, 3.0f});
  CHECK(torch::equal(centre(three, 7), at::tensor({0.0f, 0.0f, 1.0f, 2.0f, 3.0f, 0.0f, 0.0f})));
  CHECK(torch::equal(centre(three, 4), at::tensor({1.0f, 2.0f, 3.0f, 0.0f})));
  CHECK(torch::equal(centre(at::arange(1, 8, at::kFloat), 3), at::tensor({3.0f, 4.0f, 5.0f})));
}

TEST_CASE("Spoken digits load as log-mel features of every speaker's ten words", "[audio][speech]") {
  const fs::path dir = speech_fixture("ok", 3);
  const auto speakers = read_speakers(dir);
  REQUIRE(speakers == std::vector<std::string>{"s000", "s001", "s002"});
  const SpeechOptions clean = SpeechOptions().snr_db(std::numeric_limits<double>::infinity()).frames(40);
  const SpokenDigits d = load_spoken_digits(dir, {"s002", "s000"}, clean, 1);
  REQUIRE(d.features.sizes() == at::IntArrayRef({20, 1, 40, 40}));
  for (int i = 0; i < 20; ++i) {
    CHECK(d.digits[i].item<std::int64_t>() == i % 10);
    CHECK(d.speakers[i].item<std::int64_t>() == i / 10);
  }
  // Tone frequency rises with the digit, so the loudest mel band does too.
  std::int64_t last_band = -1;
  for (int digit = 0; digit < 10; ++digit) {
    const std::int64_t band = d.features[digit][0].mean(1).argmax().item<std::int64_t>();
    CHECK(band >= last_band);
    last_band = band;
  }
  CHECK(last_band > d.features[0][0].mean(1).argmax().item<std::int64_t>());
  // Noise: reproducible from the seed, other with another seed, and it fills the silence.
  const SpeechOptions noisy = SpeechOptions().snr_db(0).frames(40);
  const SpokenDigits n1 = load_spoken_digits(dir, {"s000"}, noisy, 5);
  CHECK(torch::equal(n1.features, load_spoken_digits(dir, {"s000"}, noisy, 5).features));
  CHECK_FALSE(torch::equal(n1.features, load_spoken_digits(dir, {"s000"}, noisy, 6).features));
  const SpokenDigits c1 = load_spoken_digits(dir, {"s000"}, clean, 5);
  CHECK(n1.features.select(3, 0).mean().item<double>() > c1.features.select(3, 0).mean().item<double>() + 5);
  // A clip's noise follows its speaker, not its position in the list: s000 loaded second
  // gets the same features; s001, at s000's position, other noise (not the same noise
  // scaled, which would shift the silent first frame's log-mel by one constant).
  const SpokenDigits n2 = load_spoken_digits(dir, {"s001", "s000"}, noisy, 5);
  CHECK(torch::equal(n2.features.narrow(0, 10, 10), n1.features));
  const at::Tensor shift = n2.features[0][0].select(1, 0) - n1.features[0][0].select(1, 0);
  CHECK(shift.std().item<double>() > 0.1);
  fs::remove_all(dir);
}

TEST_CASE("Each image is paired with a clip of its label, drawn over the split's clips",
          "[audio][speech]") {
  const fs::path dir = speech_fixture("pairs", 3);
  const SpokenDigits clips = load_spoken_digits(dir, {"s000", "s001", "s002"}, SpeechOptions().frames(8), 1);
  auto gen = at::detail::createCPUGenerator(2);
  const at::Tensor labels = at::randint(10, {600}, gen, at::kLong);
  const at::Tensor picks = pair_with_clips(labels, clips, gen);
  CHECK(torch::equal(clips.digits.index_select(0, picks), labels));
  const at::Tensor per_speaker = at::bincount(clips.speakers.index_select(0, picks), {}, 3);
  for (int s = 0; s < 3; ++s) CHECK(per_speaker[s].item<std::int64_t>() > 150);  // ~200 each
  CHECK_THROWS_WITH(pair_with_clips(at::tensor({3, 10}, at::kLong), clips, gen),
                    Catch::Contains("labels must be digits 0..9"));
  fs::remove_all(dir);
}

TEST_CASE("Speech folders that are damaged are refused, naming the file", "[audio][speech][bad-input]") {
  const fs::path dir = speech_fixture("bad", 2);
  const std::string tsv = (dir / "speakers.tsv").string();
  const auto write_tsv = [&](const std::string& text) { std::ofstream(tsv) << text; };
  write_tsv("# v\n../../etc\tx\n");
  CHECK_THROWS_WITH(read_speakers(dir), Catch::Contains(tsv + " line 2: '../../etc' is not a speaker folder name"));
  write_tsv("s000\tx\ns000\ty\n");
  CHECK_THROWS_WITH(read_speakers(dir), Catch::Contains(tsv + " line 2: speaker s000 is listed twice"));
  write_tsv("# only comments\n");
  CHECK_THROWS_WITH(read_speakers(dir), Catch::Contains(tsv + ": no speakers listed"));
  fs::remove(tsv);
  CHECK_THROWS_WITH(read_speakers(dir), Catch::Contains("cannot open " + tsv));

  fs::remove(dir / "s001" / "7.wav");
  CHECK_THROWS_WITH(load_spoken_digits(dir, {"s000", "s001"}, SpeechOptions(), 1),
                    Catch::Contains("cannot open " + (dir / "s001" / "7.wav").string()));
  const fs::path other_rate = speech_fixture("rate", 1, 16000);
  CHECK_THROWS_WITH(load_spoken_digits(other_rate, {"s000"}, SpeechOptions(), 1),
                    Catch::Contains((other_rate / "s000" / "0.wav").string() + ": sample rate 16000, expected 22050"));
  const std::string truncated("RIFF\x10\0\0\0WAVEfmt ", 16);  // a format chunk cut off
  std::ofstream(dir / "s000" / "3.wav", std::ios::binary).write(truncated.data(), 16);
  CHECK_THROWS_WITH(load_spoken_digits(dir, {"s000"}, SpeechOptions(), 1),
                    Catch::Contains("WAV file " + (dir / "s000" / "3.wav").string() + ": no data chunk"));
  CHECK_THROWS_WITH(load_spoken_digits(dir, {"s000"}, SpeechOptions().hop(1 << 30), 1),
                    Catch::Contains("hop in 1..65536"));
  fs::remove_all(dir);
  fs::remove_all(other_rate);
}
