#pragma once
// The audio side of the three-modality example: the spoken digit names scripts/make-speech
// writes (one folder per speaker, 0.wav .. 9.wav, listed in speakers.tsv), split by
// speaker (no speaker, one voice/variant/speed/pitch, is in two splits), with white noise at a stated signal-to-noise
// ratio, as fixed-size log-mel spectrograms; and the pairing of each image of a split
// with a clip of its label spoken by one of that split's speakers.

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>

#include "log_mel.h"
#include "wav.h"

namespace mmbalance::examples {

/// Options of the spoken-digit features.
///
/// Example:
/// ```
/// auto clips = load_spoken_digits(dir, speakers.test, SpeechOptions().snr_db(0), seed);
/// ```
struct SpeechOptions {
  /// Signal-to-noise ratio of the added white noise, in dB (power of the word over power
  /// of the noise); +infinity adds none.
  TORCH_ARG(double, snr_db) = 0.0;
  /// Every clip is centred in (or cropped to) this many frames of `hop` samples.
  TORCH_ARG(std::int64_t, frames) = 96;
  /// The sample rate every file must have (espeak-ng writes 22050 Hz).
  TORCH_ARG(std::int64_t, sample_rate) = 22050;
  TORCH_ARG(std::int64_t, n_fft) = 512;
  TORCH_ARG(std::int64_t, hop) = 220;
  TORCH_ARG(std::int64_t, n_mels) = 40;
  TORCH_ARG(double, f_max) = 8000.0;
};

/// Log-mel features of clips: (clips, 1, n_mels, frames), with each clip's digit and
/// speaker (an index into the speaker list it was loaded from).
struct SpokenDigits {
  at::Tensor features, digits, speakers;
};

/// Speakers for training, validation and test, disjoint.
struct SpeakerSplit {
  std::vector<std::string> train, validation, test;
};

/// The speaker names of `dir`/speakers.tsv ('#' lines are comments; the first column of
/// every other line is a folder name of `dir`: letters, digits, '_' or '-').
inline std::vector<std::string> read_speakers(const std::filesystem::path& dir) {
  const auto path = dir / "speakers.tsv";
  std::ifstream in(path);
  TORCH_CHECK(in, "cannot open ", path.string(), ": run scripts/make-speech first");
  std::error_code error;
  const std::uintmax_t bytes = std::filesystem::file_size(path, error);
  TORCH_CHECK(!error && bytes <= (16u << 20), path.string(), ": ",
              error ? "not a regular file" : "larger than the 16 MiB a speaker list may have");
  std::vector<std::string> names;
  std::set<std::string> seen;
  std::string line;
  std::int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    TORCH_CHECK(number <= 100000, path.string(), ": more than 100000 lines");
    if (!line.empty() && line.back() == '\r') line.pop_back();  // written on Windows
    if (line.empty() || line[0] == '#') continue;
    const std::string name = line.substr(0, line.find('\t'));
    const bool valid = !name.empty() && name.size() <= 64 &&
                       std::all_of(name.begin(), name.end(), [](char c) {
                         return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
                       });
    TORCH_CHECK(valid, path.string(), " line ", number, ": '", name.substr(0, 64),
                "' is not a speaker folder name (letters, digits, '_' or '-')");
    TORCH_CHECK(seen.insert(name).second, path.string(), " line ", number, ": speaker ", name,
                " is listed twice");
    names.push_back(name);
  }
  TORCH_CHECK(!names.empty(), path.string(), ": no speakers listed");
  return names;
}

/// A seeded permutation of the speakers, cut into `validation` and `test` speakers and the
/// rest for training.
inline SpeakerSplit split_speakers(const std::vector<std::string>& speakers,
                                   std::int64_t validation, std::int64_t test,
                                   std::uint64_t seed) {
  const auto n = static_cast<std::int64_t>(speakers.size());
  TORCH_CHECK(validation >= 1 && test >= 1 && validation + test < n, "cannot take ", validation,
              " validation and ", test, " test speakers from ", n,
              " and keep some for training");
  auto gen = at::detail::createCPUGenerator(seed);
  const at::Tensor perm = at::randperm(n, gen, at::kLong);
  SpeakerSplit split;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::string& s = speakers[static_cast<std::size_t>(perm[i].item<std::int64_t>())];
    (i < validation ? split.validation : i < validation + test ? split.test : split.train).push_back(s);
  }
  return split;
}

/// `samples` plus white Gaussian noise whose power is the word's mean power divided by
/// 10^(snr_db / 10): `word` is the clip before padding (by default `samples` itself), so
/// the SNR is that of the word whatever the padding. A silent word or an SNR of +infinity
/// gets no noise.
inline at::Tensor add_noise(const at::Tensor& samples, double snr_db, at::Generator& gen,
                            const at::Tensor& word = {}) {
  TORCH_CHECK(!std::isnan(snr_db) && snr_db != -std::numeric_limits<double>::infinity(),
              "SNR must be a number of dB or +infinity, got ", snr_db);
  const double power = (word.defined() ? word : samples).to(at::kDouble).square().mean().item<double>();
  if (std::isinf(snr_db) || power == 0) return samples.clone();
  const double noise_std = std::sqrt(power / std::pow(10.0, snr_db / 10.0));
  return samples + noise_std * at::randn(samples.sizes(), gen, samples.options());
}

/// The waveform centred in `length` samples: zero-padded on both sides, or its middle
/// `length` samples.
inline at::Tensor centre(const at::Tensor& samples, std::int64_t length) {
  const std::int64_t n = samples.size(0);
  if (n >= length) return samples.narrow(0, (n - length) / 2, length);
  const std::int64_t left = (length - n) / 2;
  return at::constant_pad_nd(samples, {left, length - n - left}, 0.0);
}

/// The noise generator's seed of one clip: from the run's seed, the speaker's name and the
/// digit (not the clip's position in a list: no two clips share noise, whichever lists
/// they are loaded in).
inline std::uint64_t clip_seed(std::uint64_t seed, const std::string& speaker, std::int64_t digit) {
  std::uint64_t h = 0xcbf29ce484222325ULL ^ seed;  // FNV-1a over the name, then the digit
  for (const char c : speaker + "/" + std::to_string(digit)) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

/// Features of every digit 0..9 of `speakers` (folders of `dir`): each WAV centred in
/// `frames` frames, noise at `snr_db` (relative to the word) added, drawn from
/// `clip_seed(seed, speaker, digit)` so a rerun gets the same, log-mel. Every file must
/// have `sample_rate`.
inline SpokenDigits load_spoken_digits(const std::filesystem::path& dir,
                                       const std::vector<std::string>& speakers,
                                       const SpeechOptions& o, std::uint64_t seed) {
  TORCH_CHECK(!speakers.empty(), "load_spoken_digits: no speakers");
  TORCH_CHECK(o.frames() >= 1 && o.frames() <= 10000 && o.hop() >= 1 && o.hop() <= 65536 &&
                  o.n_fft() >= 2 && o.n_fft() <= 65536,
              "SpeechOptions: frames must be in 1..10000, hop in 1..65536 and n_fft in 2..65536, "
              "got ", o.frames(), ", ", o.hop(), ", ", o.n_fft());
  const LogMelOptions mel = LogMelOptions(o.sample_rate()).n_fft(o.n_fft()).hop(o.hop())
                                .n_mels(o.n_mels()).f_max(o.f_max());
  mel_filter_bank(mel);  // checks the remaining options before any file is read
  const std::int64_t length = o.hop() * (o.frames() - 1) + o.n_fft();
  std::vector<at::Tensor> features;
  std::vector<std::int64_t> digits, owners;
  for (std::size_t s = 0; s < speakers.size(); ++s) {
    for (std::int64_t digit = 0; digit < 10; ++digit) {
      const auto path = dir / speakers[s] / (std::to_string(digit) + ".wav");
      const Wave wave = read_wav(path);
      TORCH_CHECK(wave.sample_rate == o.sample_rate(), "WAV file ", path.string(), ": sample rate ",
                  wave.sample_rate, ", expected ", o.sample_rate());
      auto gen = at::detail::createCPUGenerator(clip_seed(seed, speakers[s], digit));
      const at::Tensor noisy = add_noise(centre(wave.samples, length), o.snr_db(), gen, wave.samples);
      features.push_back(log_mel_spectrogram(noisy, mel).unsqueeze(0));
      digits.push_back(digit);
      owners.push_back(static_cast<std::int64_t>(s));
    }
  }
  return {at::stack(features), at::tensor(digits, at::kLong), at::tensor(owners, at::kLong)};
}

/// For every label, the index of a clip of that digit, drawn uniformly among `clips`'
/// clips of the digit from `gen`.
inline at::Tensor pair_with_clips(const at::Tensor& labels, const SpokenDigits& clips,
                                  at::Generator& gen) {
  std::vector<at::Tensor> of_digit;
  for (std::int64_t d = 0; d < 10; ++d) {
    of_digit.push_back(at::nonzero(clips.digits.eq(d)).flatten());
    TORCH_CHECK(of_digit.back().numel() > 0, "pair_with_clips: no clip of digit ", d);
  }
  const at::Tensor l = labels.to(at::kLong).contiguous();
  TORCH_CHECK(l.dim() == 1 && (l.numel() == 0 || (l.min().item<std::int64_t>() >= 0 &&
                                                  l.max().item<std::int64_t>() <= 9)),
              "pair_with_clips: labels must be digits 0..9");
  const at::Tensor draws = at::rand({l.numel()}, gen, at::kDouble);
  std::vector<std::int64_t> out(static_cast<std::size_t>(l.numel()));
  for (std::int64_t i = 0; i < l.numel(); ++i) {
    const at::Tensor& candidates = of_digit[static_cast<std::size_t>(l[i].item<std::int64_t>())];
    const auto pick = std::min<std::int64_t>(
        static_cast<std::int64_t>(draws[i].item<double>() * static_cast<double>(candidates.numel())),
        candidates.numel() - 1);
    out[static_cast<std::size_t>(i)] = candidates[pick].item<std::int64_t>();
  }
  return at::tensor(out, at::kLong);
}

}  // namespace mmbalance::examples
