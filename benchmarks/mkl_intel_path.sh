#!/usr/bin/env bash
# Runs a command with torch's MKL on the AVX-512 GEMM kernels it takes on Intel CPUs. MKL picks
# its kernels by vendor: on an AMD CPU it runs its AVX2 ones even where the CPU has AVX-512.
# A preloaded stand-in for MKL's CPU check (mkl_serv_cpu_detect, exported by torch's MKL)
# answers "AVX-512 Intel CPU", so an AMD CPU with AVX-512 gets the GEMM floor an Intel one has.
#
#   benchmarks/mkl_intel_path.sh pytest benchmarks/test_denoise_loss.py --benchmark-only --drep-threads=1
#
# Needs a C compiler (cc, or $CC) and a CPU with AVX-512; tests/test_cpu_kernels.py checks that
# it switches MKL's path (a plain GEMM's result then depends on the thread count, as on Intel).
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "$0: this CPU has no AVX-512 (avx512f in /proc/cpuinfo): MKL has no AVX-512 path to take here" >&2
  exit 2
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo 'int mkl_serv_cpu_detect(void) { return 7; }  /* 7: Intel with AVX-512 */' > "$dir/mkl_intel_path.c"
"${CC:-cc}" -shared -fPIC -o "$dir/mkl_intel_path.so" "$dir/mkl_intel_path.c"
LD_PRELOAD="$dir/mkl_intel_path.so${LD_PRELOAD:+:$LD_PRELOAD}" "$@"
