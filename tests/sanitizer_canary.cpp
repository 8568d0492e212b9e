// Known defects for scripts/sanitize to find: proof that its suppressions (which name
// LibTorch's uninstrumented libraries) still let reports about our own code through.
//   race: two threads assign one at::Tensor handle without synchronisation (what a
//         prefetch thread sharing a batch without its future would do);
//   leak: an object of ours that holds a tensor is never freed.
// The program's output is ignored; scripts/sanitize requires the report.
#include <cstring>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "race") == 0) {
    at::Tensor shared = at::zeros({4});
    std::thread writer([&] {
      for (int i = 0; i < 100; ++i) shared = at::ones({4});
    });
    for (int i = 0; i < 100; ++i) shared = at::full({4}, 2.0);
    writer.join();
    return 0;
  }
  if (argc == 2 && std::strcmp(argv[1], "leak") == 0) {
    // volatile: the allocation and the lost pointer happen as written.
    std::vector<at::Tensor>* volatile leaked = new std::vector<at::Tensor>{at::ones({256})};
    leaked = nullptr;
    return 0;
  }
  return 2;
}
