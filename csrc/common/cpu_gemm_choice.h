// Which precision ATen's CPU GEMM should run in when torchkiln has the choice
// (a weight it dequantises itself, multiplied by 16-bit activations).
//
// The answer depends on the machine and on the torch build, not on the ISA
// alone: on an AVX2 Zen 3, ATen's bf16 GEMM ran 22 GFLOP/s against fp32's
// 137; on an AVX-512 Xeon 161 against 229; on a Zen 5 with AVX512_BF16 (its
// vdpbf16ps at twice the fp32 FMA rate, and MKL's fp32 SGEMM not taking the
// AVX-512 path on AMD) 778 against 152. So it is measured, once per process.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace torchkiln {

// True when an fp32 GEMM (operands widened from `dtype`, bf16 or fp16) beats
// ATen's GEMM in `dtype` itself on this CPU. Times both on a 128 x 1024 x
// 1024 product with torch's current thread count the first time it is asked
// for a dtype (a few to ~30 ms), then returns the cached answer.
bool cpu_gemm_prefers_fp32(at::ScalarType dtype);

// Tests: force the answer for `dtype` (nullopt: measure again on next use).
void override_cpu_gemm_choice(at::ScalarType dtype, std::optional<bool> prefers_fp32);

}  // namespace torchkiln
