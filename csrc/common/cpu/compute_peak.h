// Arithmetic ceilings of one core, measured: what the benchmarks put
// compute-bound kernels against (a figure from a data sheet, or from another
// host, misleads: this Zen 4 issues one 512-bit FMA a cycle, so fp32 peaks
// at 32 FLOPs a cycle, and vdpbf16ps at the same rate does twice the FLOPs).
#pragma once

#include "common/cpu_isa.h"

namespace torchkiln {

// FLOP/s of one thread running independent chains of the widest fp32 FMA of
// the active ISA, and of bf16 dot products (vdpbf16ps: 2 multiply-adds a
// lane); 0 where the ISA has none (scalar code: no fused multiply-add loop
// is timed, fp32_fma stays 0).
struct ComputePeak {
  double fp32_fma = 0.0, bf16_dot = 0.0;
};

TK_DECLARE_CPU_KERNEL(void, measure_compute_peak, double seconds, ComputePeak* out)

}  // namespace torchkiln
