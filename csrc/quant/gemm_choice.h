// Whether weight_only_gemm (quant/cpu/weight_only_gemm.cpp) or the dense
// route (weight tiles dequantised for ATen's GEMM) should multiply many rows
// of x on this AVX-512 CPU.
//
// Our GEMM runs at the rate of `vdpbf16ps` (bf16 x, AVX512_BF16 only) or
// fp32 FMAs (fp16 / fp32 x). On Zen 4 that matches ATen's GEMM on a dense weight (0.8-1.2x on a
// small probe, 1.0x at M=256), so dequantising as we go wins. On CPUs with
// AMX (Xeon Sapphire Rapids and later) oneDNN's bf16 GEMM runs on tile
// units several times that rate, and the dense route should take over; so
// it is measured, once per process.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace torchkiln {

// For x of `dtype` (bfloat16 probes our GEMM for bf16 x against ATen's bf16
// GEMM; float16 and float32 probe the fp32 GEMM against ATen's fp32 GEMM):
// true unless ATen's GEMM on the dense weight ran more than twice as fast on
// a 192 x 1024 x 512 product (16-24 ms on Zen 4, the first time it is asked
// at each of the two AVX-512 levels). False, without measuring, while the
// active ISA level is below AVX-512, or below AVX512_BF16 for bfloat16.
bool cpu_quant_gemm_wins(at::ScalarType dtype);

// Tests: force the answer for `dtype` at both AVX-512 levels (nullopt:
// measure again on next use).
void override_cpu_quant_gemm_choice(at::ScalarType dtype, std::optional<bool> wins);

}  // namespace torchkiln
