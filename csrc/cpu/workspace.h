// Scratch memory of the CPU loss kernel, kept by the calling thread and reused across calls.
//
// Why: the kernel's tile buffers are megabytes (denoise_loss.cpp states the bound). Freed
// after every call, glibc hands memory of that size back to the kernel (munmap, or a trim of
// the heap top), and the next call takes a page fault, with a page cleared, per 4 KiB it
// touches: measured at M = 1576, 1 thread, 600 to 1150 faults per call at K = 384 and 4700 at
// K = 1536 (how many depends on the heap's state). Kept, the second call of a shape faults
// nothing.
//
// Lifetime: one buffer per calling thread, grown to the largest size asked of it (never
// shrunk) and freed when that thread exits or release_cpu_workspace() is called on it. The
// kernel's worker threads only use the caller's buffer, through pointers the caller hands out.
#pragma once
#include <cstddef>

namespace drep {

// At least `bytes` bytes, 64-byte aligned, owned by the calling thread. Valid until the same
// thread's next cpu_workspace() or release_cpu_workspace() call; contents are unspecified
// (whatever the previous call left), so every user writes before it reads.
void* cpu_workspace(size_t bytes);

// Bytes the calling thread holds, and a way to hand them back (_C.cpu_workspace, csrc/ops.cpp).
size_t cpu_workspace_bytes();
void release_cpu_workspace();

}  // namespace drep
