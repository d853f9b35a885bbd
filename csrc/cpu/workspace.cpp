// csrc/cpu/workspace.h: one grow-only buffer per calling thread.
#include "workspace.h"

#include <c10/core/impl/alloc_cpu.h>

#include <memory>

namespace drep {
namespace {

struct FreeCpu {
  void operator()(void* p) const { c10::free_cpu(p); }
};

struct Workspace {
  std::unique_ptr<void, FreeCpu> data;
  size_t bytes = 0;
};

thread_local Workspace workspace;

// Sizes are rounded up to 2 MiB (a huge page), so that a sequence of slightly growing shapes
// does not reallocate on every call.
constexpr size_t kGranule = size_t{1} << 21;

}  // namespace

void* cpu_workspace(size_t bytes) {
  if (bytes > workspace.bytes) {
    const size_t grown = (bytes + kGranule - 1) / kGranule * kGranule;
    workspace.data.reset();  // free before allocating: never hold both
    workspace.bytes = 0;
    workspace.data.reset(c10::alloc_cpu(grown));
    workspace.bytes = grown;
  }
  return workspace.data.get();
}

size_t cpu_workspace_bytes() { return workspace.bytes; }

void release_cpu_workspace() {
  workspace.data.reset();
  workspace.bytes = 0;
}

}  // namespace drep
