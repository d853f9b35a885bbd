// Which vector code paths the CPU kernels take on this machine. The build is for the
// baseline ISA (any compiler flags): the AVX2 and AVX-512 functions carry their own
// __attribute__((target(...))) and are called only where the running CPU has those
// instructions, decided once per process.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DREP_HAVE_X86_PATHS 1
#endif

namespace drep {

enum class CpuPath {
  kBaseline,  // portable C++ (what machines without AVX2 + FMA run)
  kAvx2,      // AVX2 + FMA, 8 float lanes
  kAvx512,    // AVX-512F, 16 float lanes (the noise); elementwise passes stay on AVX2
};

// The widest path the CPU has, narrowed by the environment: DREP_CPU_NO_AVX512=1 stops at
// AVX2, DREP_CPU_NO_AVX2=1 at the baseline (set to anything but "" or "0"). That is how the
// tests reach every path on one machine. Read once: later changes of the variables are ignored.
CpuPath cpu_path();

// "baseline", "avx2" or "avx512".
const char* cpu_path_name(CpuPath path);

}  // namespace drep
