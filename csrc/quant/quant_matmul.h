// Quantised matmul: out = x @ W^T (+ bias) with W stored in 8 or 4 bits and
// never materialised on the small-batch path.
//
// Weight layouts (the Python side packs them once, see
// python/torchkiln/quant/layout.py):
//   kInt8  (n, k) int8 codes, row-major.            W[n,k] = scale[n] * q
//   kInt4  (n, kp/2) uint8, kp = k rounded up to 64. In each 64-wide chunk c
//          of a row, byte j holds the code of column 64c+j in its low nibble
//          and of column 64c+32+j in its high nibble, so one unpack gives 32
//          consecutive columns per nibble and x needs no shuffling.
//                                                   W[n,k] = scale[n,g] * (q - zero[n,g])
//   kNf4   same nibble layout.                      W[n,k] = scale[n,g] * kNf4Codebook[q]
//   with g = k / group_size; scales are fp32 (n, k / group_size), zeros
//   the same shape in uint8 (every scheme's zero point is a whole number, so
//   one byte holds it exactly: int4 g128 then streams 69 bytes a group, not 72).
//   W8A8   (n16/16, k4/4, 16, 4) int8: panels of 16 output rows, each k-quad
//          of the panel one 64-byte line (16 rows x 4 columns), which is one
//          VNNI `vpdpbusd` operand. n16 = n rounded up to 16, k4 = k rounded
//          up to 4, padding zero. W[n,k] = scale[n] * q.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

enum class WeightFormat : int32_t { kInt8 = 0, kInt4 = 1, kNf4 = 2 };

constexpr int64_t kNibbleChunk = 64;  // columns per 32-byte chunk of a 4-bit row
constexpr int64_t kPanelRows = 16;    // output rows per W8A8 panel

// QLoRA's NormalFloat4 code values (quantiles of N(0, 1) scaled to [-1, 1]).
constexpr float kNf4Codebook[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

struct WeightOnlyParams {
  const void* __restrict__ x = nullptr;  // (m, k), rows contiguous
  int64_t x_row_stride = 0;
  const uint8_t* __restrict__ qweight = nullptr;  // layout above, rows contiguous
  int64_t qweight_row_stride = 0;                 // bytes
  const float* __restrict__ scales = nullptr;     // (n, k / group_size) contiguous
  const uint8_t* __restrict__ zeros = nullptr;    // same shape; kInt4 only
  const void* __restrict__ bias = nullptr;        // (n) in dtype, or null
  void* __restrict__ out = nullptr;               // (m, n), rows contiguous
  int64_t out_row_stride = 0;
  int64_t m = 0, n = 0, k = 0;
  int64_t group_size = 0;  // k for kInt8
  WeightFormat format = WeightFormat::kInt4;
  DType dtype = DType::kFloat32;  // of x, bias, out
};

struct W8A8Params {
  const void* __restrict__ x = nullptr;  // (m, k), rows contiguous
  int64_t x_row_stride = 0;
  const int8_t* __restrict__ qweight = nullptr;     // panel layout above
  const float* __restrict__ scales = nullptr;       // (n)
  const int32_t* __restrict__ weight_sums = nullptr;  // (n16) 128 * sum_k q[n, k]
  const void* __restrict__ bias = nullptr;          // (n) in dtype, or null
  void* __restrict__ out = nullptr;                 // (m, n), rows contiguous
  int64_t out_row_stride = 0;
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::kFloat32;
};

// Quantisation of a dense weight (n, k) into the layouts above, with the
// formulas python/torchkiln/quant/quantize.py defines (same fp32 operations,
// so the same codes, scales and zeros bit for bit).
struct QuantizeParams {
  const void* __restrict__ w = nullptr;  // (n, k) in dtype
  int64_t w_row_stride = 0;              // elements
  DType dtype = DType::kFloat32;
  int64_t n = 0, k = 0;
  int64_t group_size = 0;  // k for kInt8
  WeightFormat format = WeightFormat::kInt4;
  bool symmetric = false;                  // kInt4 only
  uint8_t* __restrict__ qweight = nullptr;  // kInt8: (n, k) int8; 4-bit: (n, kp / 2)
  float* __restrict__ scales = nullptr;     // (n, k / group_size)
  uint8_t* __restrict__ zeros = nullptr;    // same shape; kInt4 only
  bool* non_finite = nullptr;               // set when a weight is inf or nan
};

// out = x @ W^T + bias, decoding the weight in registers (few rows of x).
TK_DECLARE_CPU_KERNEL(void, weight_only_matmul, const WeightOnlyParams&)
// Writes the dense W (n, k) in p.dtype to `dense` (row stride k); x, bias,
// out and m are ignored. Each element is (q - zero) * scale rounded once.
TK_DECLARE_CPU_KERNEL(void, weight_only_dequantize, const WeightOnlyParams&, void* dense)
// The same for weight rows [row0, row0 + rows) on the calling thread, row r
// to dense + r * dense_row_stride (elements).
TK_DECLARE_CPU_KERNEL(void, weight_only_dequantize_rows, const WeightOnlyParams&, int64_t row0, int64_t rows,
                      void* dense, int64_t dense_row_stride)
// out = x @ W^T + bias on AVX-512 CPUs (lower ISA levels throw): a GEMM
// that dequantises the weight 8 rows at a time (weight_only_gemm.cpp), in
// fp32 FMAs for fp16 / fp32 x and in bf16 dot products for bf16 x (which
// needs AVX512_BF16 and an even k). For many rows of x.
TK_DECLARE_CPU_KERNEL(void, weight_only_gemm, const WeightOnlyParams&)
// The input gradient out = x @ W with x (m, n) the output's gradient, out
// (m, k), no bias; as above (bf16 x needs AVX512_BF16 and an even n).
TK_DECLARE_CPU_KERNEL(void, weight_only_gemm_grad, const WeightOnlyParams&)
// Fills qweight, scales and zeros from w (see QuantizeParams); sets
// *non_finite when w holds an inf or nan (the outputs are then meaningless).
TK_DECLARE_CPU_KERNEL(void, quantize_weight, const QuantizeParams&)
// Quantises each row of x to int8 (scale max|x| / 127, round half to even),
// multiplies with int8 dot products and int32 accumulation, then scales.
TK_DECLARE_CPU_KERNEL(void, w8a8_matmul, const W8A8Params&)

// CUDA: the in-register path takes at most 8 rows of x; the glue sends more
// rows of bf16 / fp16 x to the tensor-core GEMM and fp32 x through
// weight_only_dequantize_cuda + cuBLAS.
void weight_only_matmul_cuda(const WeightOnlyParams& p, CUstream_st* stream);
// int4 (group size a multiple of 32) or nf4 (a multiple of 64) weights and
// 1-16 rows of bf16 / fp16 x: a GEMV on tensor cores that decodes the packed
// weight into mma operands (the decode path; see gemv_4bit.cu).
// gemv_4bit_cuda_splits(p) is 0 when p does not suit it (int8, fp32 x, more
// rows, a group too long to stage) and otherwise the number of parts k is
// split into; with more than one the caller passes a workspace of
// splits * m * n floats.
int64_t gemv_4bit_cuda_splits(const WeightOnlyParams& p);
void gemv_4bit_cuda(const WeightOnlyParams& p, int64_t splits, float* workspace, CUstream_st* stream);
// Any number of rows of bf16 / fp16 x: tensor-core GEMM over weight tiles
// decoded into shared memory (the dense weight is never written out).
// Few rows split k over blocks: weight_only_gemm_cuda_splits(p) says into
// how many; with more than one the caller passes a workspace of
// splits * m * n floats.
int64_t weight_only_gemm_cuda_splits(const WeightOnlyParams& p);
void weight_only_gemm_cuda(const WeightOnlyParams& p, int64_t splits, float* workspace, CUstream_st* stream);
void weight_only_dequantize_cuda(const WeightOnlyParams& p, void* dense, CUstream_st* stream);
// W8A8 on CUDA (weight_sums unused): quantises x into the caller's scratch
// xq (m, w8a8_cuda_x_stride(k)) int8 and x_scale (m) fp32, then an int8
// tensor-core GEMM, k split into w8a8_cuda_splits(p) parts (more than one:
// the caller passes a workspace of splits * m * n int32).
int64_t w8a8_cuda_x_stride(int64_t k);
int64_t w8a8_cuda_splits(const W8A8Params& p);
void w8a8_matmul_cuda(const W8A8Params& p, int8_t* xq, float* x_scale, int64_t splits, int32_t* workspace,
                      CUstream_st* stream);

}  // namespace torchkiln
