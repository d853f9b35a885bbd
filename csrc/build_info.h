// What the CUDA part of this build was compiled for, asked by drep_kernels._C.build_info()
// (csrc/ops.cpp). Defined in csrc/cuda/build_info.cu, present only when DREP_WITH_CUDA is.
#pragma once

namespace drep {

// nvcc's __CUDA_ARCH_LIST__ for this build, e.g. "800,900": the virtual architectures every
// .cu file was compiled for (one list per build: setup.py passes the same -gencode flags to all).
const char* cuda_arch_list();
// CUDART_VERSION of the toolkit headers the kernels were compiled against, e.g. 13000.
int cuda_runtime_version();

}  // namespace drep
