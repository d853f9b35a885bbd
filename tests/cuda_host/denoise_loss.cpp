// csrc/cuda/denoise_loss.cu compiled as host C++ (cuda_host.h), with (build.py's -D flags) a loss
// chunk budget of 16 KiB instead of 64 MiB, so that small inputs run 1 to 3 chunks: rows per chunk are
// max(16384 / (bytes of x_noisy and p per element) / K rounded down to a multiple of 128, 128),
// e.g. for float32 (8 bytes) 256 for K = 7 and 128 for K = 127; and an epilogue aiming at 5
// stripes instead of 512, so that those chunks run 1, 2, 4 and 8 rows per lane (stripes of 8 to
// 64 rows), and a partial last chunk can have more stripes than a full one (40 rows: 5 of 8
// rows, after 128 rows: 4 of 32).
#include "cuda_host.h"

#include "../../csrc/cuda/denoise_loss.cu"

// csrc/philox.h folds a negative word v as ~v, not -v - 1, which overflows at INT32_MIN (undefined
// behaviour). Undefined behaviour makes a constant expression ill-formed, so this fails to compile
// if the overflow comes back.
static_assert(drep::fold_word(0x80000000u) == 0x7FFFFFFF, "fold_word(INT32_MIN) must be INT32_MAX");
static_assert(drep::fold_word(0xFFFFFFFFu) == 0 && drep::fold_word(0x7FFFFFFFu) == 0x7FFFFFFF,
              "fold_word must map -1 to 0 and keep non-negative words");
