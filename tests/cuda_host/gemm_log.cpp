// drep_cuda_host::_gemm_calls(): the cublasGemmEx calls the host build's kernels made since the
// last call (tests/cuda_host/cublas_host.h), one "key=value ..." line each; reading empties the log.
#include "cuda_host.h"

TORCH_LIBRARY_FRAGMENT(drep_cuda_host, m) { m.def("_gemm_calls() -> str[]", &drep_cuda_host::take_gemm_calls); }
