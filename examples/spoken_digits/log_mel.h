#pragma once
// Log-mel spectrograms in LibTorch (at::stft and a mel filter bank), the audio modality's
// input: the HTK mel scale and triangular filters as torchaudio's melscale_fbanks
// (norm=None, mel_scale="htk"), a periodic Hann window, power spectra, log(mel + floor).

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>

namespace mmbalance::examples {

/// Options for `log_mel_spectrogram`.
///
/// Example:
/// ```
/// auto features = log_mel_spectrogram(wave.samples, LogMelOptions(16000).n_mels(40));
/// ```
struct LogMelOptions {
  explicit LogMelOptions(std::int64_t sample_rate) : sample_rate_(sample_rate) {}
  TORCH_ARG(std::int64_t, sample_rate);
  /// FFT size and window length, in samples (25 ms at 16 kHz).
  TORCH_ARG(std::int64_t, n_fft) = 400;
  /// Hop between frames, in samples (10 ms at 16 kHz).
  TORCH_ARG(std::int64_t, hop) = 160;
  TORCH_ARG(std::int64_t, n_mels) = 40;
  TORCH_ARG(double, f_min) = 0.0;
  /// Highest filter edge; 0 means sample_rate / 2.
  TORCH_ARG(double, f_max) = 0.0;
  /// Added to the mel energies before the log.
  TORCH_ARG(double, floor) = 1e-6;
};

inline double hz_to_mel(double hz) { return 2595.0 * std::log10(1.0 + hz / 700.0); }
inline double mel_to_hz(double mel) { return 700.0 * (std::pow(10.0, mel / 2595.0) - 1.0); }

/// (n_mels, n_fft / 2 + 1) triangular filters, evenly spaced on the mel scale.
inline at::Tensor mel_filter_bank(const LogMelOptions& o) {
  const double f_max = o.f_max() == 0 ? o.sample_rate() / 2.0 : o.f_max();
  TORCH_CHECK(o.sample_rate() > 0 && o.n_fft() >= 2 && o.hop() >= 1 && o.n_mels() >= 1 &&
                  o.f_min() >= 0 && o.f_min() < f_max && f_max <= o.sample_rate() / 2.0 &&
                  o.floor() > 0,
              "log-mel options: need a positive sample rate, n_fft >= 2, hop >= 1, "
              "n_mels >= 1, 0 <= f_min < f_max <= sample_rate / 2 and floor > 0, got sample "
              "rate ", o.sample_rate(), ", n_fft ", o.n_fft(), ", hop ", o.hop(), ", n_mels ",
              o.n_mels(), ", f_min ", o.f_min(), ", f_max ", f_max, ", floor ", o.floor());
  // Bin k of an n_fft-point DFT is at k * sample_rate / n_fft (odd n_fft too).
  const std::int64_t bins = o.n_fft() / 2 + 1;
  const at::Tensor freqs =
      at::arange(bins, at::kDouble) * (static_cast<double>(o.sample_rate()) / o.n_fft());
  const at::Tensor mels = at::linspace(hz_to_mel(o.f_min()), hz_to_mel(f_max), o.n_mels() + 2,
                                       at::kDouble);
  const at::Tensor edges = 700.0 * (at::pow(10.0, mels / 2595.0) - 1.0);  // Hz
  const at::Tensor lo = edges.narrow(0, 0, o.n_mels()).unsqueeze(1);
  const at::Tensor mid = edges.narrow(0, 1, o.n_mels()).unsqueeze(1);
  const at::Tensor hi = edges.narrow(0, 2, o.n_mels()).unsqueeze(1);
  const at::Tensor f = freqs.unsqueeze(0);
  const at::Tensor rising = (f - lo) / (mid - lo), falling = (hi - f) / (hi - mid);
  return at::clamp_min(at::minimum(rising, falling), 0.0).to(at::kFloat);
}

/// log(mel energies + floor) of a mono waveform (samples), (n_mels, frames): frames of
/// n_fft samples every hop samples (no padding), periodic Hann window, power spectrum.
inline at::Tensor log_mel_spectrogram(const at::Tensor& samples, const LogMelOptions& o) {
  const at::Tensor bank = mel_filter_bank(o).to(samples.device());
  TORCH_CHECK(samples.dim() == 1 && samples.size(0) >= o.n_fft(), "log-mel: need a waveform of ",
              "at least n_fft=", o.n_fft(), " samples, got shape ", samples.sizes());
  const at::Tensor window = at::hann_window(
      o.n_fft(), /*periodic=*/true, at::TensorOptions(at::kFloat).device(samples.device()));
  const at::Tensor spectrum =
      at::stft(samples.to(at::kFloat), o.n_fft(), o.hop(), o.n_fft(), window,
               /*normalized=*/false, /*onesided=*/true, /*return_complex=*/true);
  const at::Tensor power = at::view_as_real(spectrum).square().sum(-1);  // (bins, frames)
  return at::log(at::matmul(bank, power) + o.floor());
}

}  // namespace mmbalance::examples
