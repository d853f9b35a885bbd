#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace drep {
namespace {

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

}  // namespace

CpuPath cpu_path() {
#ifdef DREP_HAVE_X86_PATHS
  // __builtin_cpu_supports also checks that the OS saves the registers (XGETBV), so a
  // hypervisor that hides the AVX-512 state gives the AVX2 path.
  static const CpuPath path = [] {
    if (env_flag("DREP_CPU_NO_AVX2") || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
      return CpuPath::kBaseline;
    }
    if (env_flag("DREP_CPU_NO_AVX512") || !__builtin_cpu_supports("avx512f")) return CpuPath::kAvx2;
    return CpuPath::kAvx512;
  }();
  return path;
#else
  return CpuPath::kBaseline;
#endif
}

const char* cpu_path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kAvx2: return "avx2";
    case CpuPath::kAvx512: return "avx512";
    case CpuPath::kBaseline: break;
  }
  return "baseline";
}

}  // namespace drep
