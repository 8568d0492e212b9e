#pragma once
// A one-line progress bar on stderr, redrawn in place when stderr is a terminal and
// printed once at the end of the epoch otherwise (logs stay readable).

#include <chrono>
#include <cstdio>
#include <string>

#include <unistd.h>

namespace mmbalance::examples {

class ProgressBar {
 public:
  ProgressBar(std::string title, std::int64_t total)
      : title_(std::move(title)), total_(total), start_(std::chrono::steady_clock::now()),
        tty_(isatty(fileno(stderr)) != 0) {}

  /// `done` steps of `total`; `status` is shown after the bar.
  void update(std::int64_t done, const std::string& status) {
    if (!tty_ && done < total_) return;
    const double seconds = elapsed();
    const int width = 24;
    const int filled = static_cast<int>(width * done / std::max<std::int64_t>(total_, 1));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "%s%s [%s] %lld/%lld %.1f steps/s %s%s", tty_ ? "\r\033[K" : "",
                 title_.c_str(), bar.c_str(), static_cast<long long>(done),
                 static_cast<long long>(total_), seconds > 0 ? done / seconds : 0.0,
                 status.c_str(), done >= total_ ? "\n" : "");
    std::fflush(stderr);
  }

  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::string title_;
  std::int64_t total_;
  std::chrono::steady_clock::time_point start_;
  bool tty_;
};

}  // namespace mmbalance::examples
