// The compiler's own record of what this build targets (see csrc/build_info.h): read from the
// macros nvcc defines, so it describes the binary that was built, not the build's settings.
#include <cuda_runtime_api.h>

#include "../build_info.h"

// __CUDA_ARCH_LIST__ (nvcc >= 11.5) is a comma-separated list: stringify it whole.
#define DREP_STRINGIFY_ALL(...) #__VA_ARGS__
#define DREP_STRINGIFY(...) DREP_STRINGIFY_ALL(__VA_ARGS__)

namespace drep {

const char* cuda_arch_list() { return DREP_STRINGIFY(__CUDA_ARCH_LIST__); }

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace drep
