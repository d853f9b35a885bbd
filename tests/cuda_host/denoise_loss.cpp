// csrc/cuda/denoise_loss.cu compiled as host C++ (cuda_host.h), with a loss chunk budget of 2048
// elements instead of 2^23, so that small inputs run 1 to 3 chunks: rows per chunk are
// max(2048 / K rounded down to a multiple of 128, 128), e.g. 256 for K = 7 and 128 for K = 127.
#include "cuda_host.h"

#define DREP_LOSS_CHUNK_ELEMS 2048
#include "../../csrc/cuda/denoise_loss.cu"

// csrc/philox.h folds a negative word v as ~v, not -v - 1, which overflows at INT32_MIN (undefined
// behaviour). Undefined behaviour makes a constant expression ill-formed, so this fails to compile
// if the overflow comes back.
static_assert(drep::fold_word(0x80000000u) == 0x7FFFFFFF, "fold_word(INT32_MIN) must be INT32_MAX");
static_assert(drep::fold_word(0xFFFFFFFFu) == 0 && drep::fold_word(0x7FFFFFFFu) == 0x7FFFFFFF,
              "fold_word must map -1 to 0 and keep non-negative words");
