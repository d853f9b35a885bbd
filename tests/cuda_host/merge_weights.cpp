// csrc/cuda/merge_weights.cu compiled as host C++ (cuda_host.h).
#include "cuda_host.h"

#include "../../csrc/cuda/merge_weights.cu"
