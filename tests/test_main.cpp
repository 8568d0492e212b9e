#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <csignal>

#include <ATen/Parallel.h>

int main(int argc, char* argv[]) {
  at::set_num_threads(1);  // the same reduction order on every machine
  // Gloo may write to a socket whose peer rank has gone (the tests make ranks die on
  // purpose): the write must fail with EPIPE, which becomes a named error, not kill the
  // process with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  return Catch::Session().run(argc, argv);
}
