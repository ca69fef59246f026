// Weight-only quantised matmul on CUDA.
//  * Up to kMaxRows rows of x (decode): a warp per output row decodes the
//    packed weight in registers (16-byte loads, 512 contiguous bytes per
//    warp step) and multiplies it with every row of x.
//  * More rows, bf16 / fp16 x (prefill): a tensor-core GEMM. Each block
//    decodes a 64 x 64 weight tile into shared memory as x's dtype (exactly
//    the dequantised values) and multiplies it with a 64 x 64 tile of x by
//    mma.sync; the dense weight never exists in global memory.
//  * fp32 x with many rows: dequantise + cuBLAS in the glue.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/mma.cuh"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;
using cuda::warp_sum;

constexpr int kWarps = 4;  // output rows per block
constexpr int kMaxRows = 8;

__constant__ float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

// The weight of (row, column) from its code, as in the CPU reference:
// (q - zero) * scale, code * scale (nf4) or q * scale (int8).
__device__ __forceinline__ float weight_value(const WeightOnlyParams& p, int64_t row, int64_t col, int code) {
  const int64_t g = col / p.group_size, groups = p.k / p.group_size;
  const float s = p.scales[row * groups + g];
  switch (p.format) {
    case WeightFormat::kInt4:
      return (static_cast<float>(code) - p.zeros[row * groups + g]) * s;
    case WeightFormat::kNf4:
      return kNf4[code] * s;
    default:
      return static_cast<float>(code) * s;
  }
}

// Calls f(column, code) for the (up to two) codes held by byte b of a row.
template <class F>
__device__ __forceinline__ void for_codes(const WeightOnlyParams& p, int64_t b, uint32_t byte, const F& f) {
  if (p.format == WeightFormat::kInt8) {
    if (b < p.k) f(b, static_cast<int>(static_cast<int8_t>(byte)));
    return;
  }
  const int64_t c = b / (kNibbleChunk / 2), j = b % (kNibbleChunk / 2);
  const int64_t lo = c * kNibbleChunk + j, hi = lo + kNibbleChunk / 2;
  if (lo < p.k) f(lo, static_cast<int>(byte & 15u));
  if (hi < p.k) f(hi, static_cast<int>(byte >> 4));
}

// ------------------------------------------------------------ decode GEMV
// A warp per output row; each lane takes 16-byte packets of the row (the
// warp reads 512 contiguous bytes per step) and two packets at a time, so
// two loads are in flight before the first is decoded. A 4-bit packet is
// two runs of 16 columns (low and high nibbles, kNibbleChunk layout), an
// int8 packet one run; a run lies in one group, so its scale (and zero) is
// read once and every code costs a few ALU operations, a multiply and one
// FMA per row of x. Rows and x not 16-byte aligned (int8 with k % 16 != 0,
// a sliced x) take the same path with narrow loads.
constexpr int kRun = 16;  // columns that share one decode of scale and zero

struct Packet {
  uint32_t w[4];
};

// Byte by byte (a row or x not 16-byte aligned, an int8 row's short last
// packet). Not inlined: its dynamically indexed packet lives on the stack,
// which would otherwise take the fast path's packet with it.
__device__ __noinline__ Packet load_packet_narrow(const uint8_t* at, int valid_bytes) {
  Packet pk{};
  for (int i = 0; i < 16 && i < valid_bytes; ++i) pk.w[i / 4] |= static_cast<uint32_t>(at[i]) << (8 * (i % 4));
  return pk;
}

__device__ __forceinline__ Packet load_packet(const uint8_t* at, int valid_bytes, bool vec) {
  if (!vec || valid_bytes < 16) return load_packet_narrow(at, valid_bytes);
  const uint4 v = *reinterpret_cast<const uint4*>(at);
  return Packet{{v.x, v.y, v.z, v.w}};
}

__device__ __forceinline__ uint32_t packet_byte(const Packet& pk, int i) { return (pk.w[i / 4] >> (8 * (i % 4))) & 0xFFu; }

// A code in [0, 255] as a float without an int-to-float conversion (a
// quarter-rate instruction): in the low mantissa bits of 2^23 it reads as
// 2^23 + code exactly.
__device__ __forceinline__ float small_code_to_float(uint32_t code) {
  return __uint_as_float(0x4B000000u | code) - 8388608.0f;
}

// Columns [c0, c0 + 16) of row `row` of x as fp32; columns past k read 0.
template <class T>
__device__ __forceinline__ void load_x_run(const WeightOnlyParams& p, int64_t row, int64_t c0, bool vec,
                                           float (&xv)[kRun]) {
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + c0;
  if (vec && c0 + kRun <= p.k) {
    uint4 raw[kRun * sizeof(T) / 16];
#pragma unroll
    for (int i = 0; i < kRun * static_cast<int>(sizeof(T)) / 16; ++i) raw[i] = reinterpret_cast<const uint4*>(x)[i];
    const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < kRun; ++i) xv[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kRun; ++i) xv[i] = c0 + i < p.k ? to_float(x[i]) : 0.0f;
  }
}

// acc[m] += sum_i w[i] * x[m, c0 + i] for every row m of x.
template <class T, int M>
__device__ __forceinline__ void run_dot(const WeightOnlyParams& p, int64_t c0, bool vec, const float (&w)[kRun],
                                        float (&acc)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= p.m) break;
    float xv[kRun];
    load_x_run<T>(p, m, c0, vec, xv);
#pragma unroll
    for (int i = 0; i < kRun; ++i) acc[m] = fmaf(w[i], xv[i], acc[m]);
  }
}

// Decodes the 16 weights of one run: the nibbles at `shift` (0: low, 4:
// high) of a 4-bit packet, or the bytes of an int8 packet, as the CPU
// reference does: (q - zero) * scale, code * scale (nf4), q * scale (int8).
__device__ __forceinline__ void decode_run(const WeightOnlyParams& p, const Packet& pk, int shift, float scale,
                                           float zero, const float* nf4_table, float (&w)[kRun]) {
  switch (p.format) {
    case WeightFormat::kInt4:
#pragma unroll
      for (int i = 0; i < kRun; ++i) w[i] = (small_code_to_float((packet_byte(pk, i) >> shift) & 15u) - zero) * scale;
      break;
    case WeightFormat::kNf4:
#pragma unroll
      for (int i = 0; i < kRun; ++i) w[i] = nf4_table[(packet_byte(pk, i) >> shift) & 15u] * scale;
      break;
    default:  // int8: flipping the sign bit maps [-128, 127] onto [0, 255]
#pragma unroll
      for (int i = 0; i < kRun; ++i) w[i] = (small_code_to_float(packet_byte(pk, i) ^ 0x80u) - 128.0f) * scale;
      break;
  }
}

template <class T, int M>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(WeightOnlyParams p, bool vec) {
  // The NF4 code values in shared memory: a lookup there is conflict-free
  // (16 words, 16 banks), unlike divergent reads of __constant__ memory.
  TK_DYNAMIC_SMEM(smem);
  float* nf4_table = reinterpret_cast<float*>(smem);
  if (threadIdx.x < 16) nf4_table[threadIdx.x] = kNf4[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const uint8_t* wrow = p.qweight + row * p.qweight_row_stride;
  const bool four_bit = p.format != WeightFormat::kInt8;
  const int64_t row_bytes = four_bit ? p.qweight_row_stride : p.k;
  const int64_t packets = (row_bytes + 15) / 16;
  const uint32_t group = static_cast<uint32_t>(p.group_size);
  const int64_t groups = p.k / p.group_size;
  const float* scales = p.scales + row * groups;
  const float* zeros = p.zeros ? p.zeros + row * groups : nullptr;

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;

  auto process = [&](int64_t q, const Packet& pk) {
    float w[kRun];
    if (!four_bit) {
      decode_run(p, pk, 0, scales[0], 0.0f, nf4_table, w);
      run_dot<T, M>(p, q * 16, vec, w, acc);
      return;
    }
    // Packet q holds columns [c0, c0 + 16) (low nibbles) and [c0 + 32,
    // c0 + 48) (high); k is a multiple of 32, so each run is all in or all
    // padding.
    const int64_t c0 = (q / 2) * kNibbleChunk + (q % 2) * kRun;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t c = c0 + half * (kNibbleChunk / 2);
      if (c >= p.k) break;
      const uint32_t g = static_cast<uint32_t>(c) / group;
      decode_run(p, pk, 4 * half, scales[g], zeros ? zeros[g] : 0.0f, nf4_table, w);
      run_dot<T, M>(p, c, vec, w, acc);
    }
  };
  // Bytes of packet q inside the row (16 but for an int8 row's last packet).
  const auto valid = [&](int64_t q) { return static_cast<int>(row_bytes - q * 16 < 16 ? row_bytes - q * 16 : 16); };
  for (int64_t q = lane; q < packets; q += 64) {
    const bool second = q + 32 < packets;
    const Packet a = load_packet(wrow + q * 16, valid(q), vec);
    const Packet b = second ? load_packet(wrow + (q + 32) * 16, valid(q + 32), vec) : Packet{};
    process(q, a);
    if (second) process(q + 32, b);
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < p.m) out[m * p.out_row_stride + row] = from_float<T>(v + (bias ? to_float(bias[row]) : 0.0f));
  }
}

template <class T>
__global__ void dequantize_kernel(WeightOnlyParams p, T* dense) {
  const int64_t total = p.n * p.qweight_row_stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.qweight_row_stride, b = i % p.qweight_row_stride;
    for_codes(p, b, p.qweight[i], [&](int64_t col, int code) {
      dense[row * p.k + col] = from_float<T>(weight_value(p, row, col, code));
    });
  }
}


// ------------------------------------------------------------ tensor-core GEMM
constexpr int kGemmTile = 64;             // rows of x, output features and columns of k per block step
constexpr int kGemmLd = kGemmTile + 8;    // padded shared rows: conflict-free ldmatrix
constexpr int kGemmThreads = 128;         // 4 warps, each a 32 x 32 block of the output tile
constexpr size_t kGemmSmemBytes = 2 * kGemmTile * kGemmLd * sizeof(uint16_t);

// Decodes weight rows [n0, n0 + 64) x columns [k0, k0 + 64) into sW as T.
// Thread t owns row t / 2 and half t % 2 of the row's bytes for this tile:
// 4-bit formats store 64 columns in 32 bytes (byte j: column j low nibble,
// 32 + j high), so a half is 16 bytes = two runs of 16 columns; int8 stores
// one column per byte, so a half is 32 columns. Each run lies in one group.
template <class T>
__device__ void decode_weight_tile(const WeightOnlyParams& p, int64_t n0, int64_t k0, T* sW) {
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t row = n0 + r;
  T* dst = sW + r * kGemmLd;
  const bool four_bit = p.format != WeightFormat::kInt8;
  const int runs = four_bit ? 2 : 1, run_len = four_bit ? 16 : 32;
  for (int run = 0; run < runs; ++run) {
    // Tile columns of this run, and where their codes sit in the row.
    const int c0 = four_bit ? run * 32 + half * 16 : half * 32;
    const int64_t byte0 = four_bit ? k0 / 2 + half * 16 : k0 + half * 32;
    const int64_t col0 = k0 + c0;
    if (row >= p.n || col0 >= p.k) {
      for (int j = 0; j < run_len; ++j) dst[c0 + j] = from_float<T>(0.0f);
      continue;
    }
    const int64_t g = col0 / p.group_size, groups = p.k / p.group_size;
    const float scale = p.scales[row * groups + g];
    const float zero = p.format == WeightFormat::kInt4 ? p.zeros[row * groups + g] : 0.0f;
    const uint8_t* w = p.qweight + row * p.qweight_row_stride + byte0;
    for (int j = 0; j < run_len; ++j) {
      float v = 0.0f;
      if (col0 + j < p.k) {  // padding columns of the last chunk decode to 0, not (0 - zero) * scale
        const uint32_t byte = w[j];
        switch (p.format) {
          case WeightFormat::kInt4:
            v = (static_cast<float>(run == 0 ? (byte & 15u) : (byte >> 4)) - zero) * scale;
            break;
          case WeightFormat::kNf4:
            v = kNf4[run == 0 ? (byte & 15u) : (byte >> 4)] * scale;
            break;
          default:
            v = static_cast<float>(static_cast<int8_t>(byte)) * scale;
            break;
        }
      }
      dst[c0 + j] = from_float<T>(v);  // rounded once, as the dequantised weight
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const WeightOnlyParams p) {
  using Mma = cuda::MmaType<T>;
  TK_DYNAMIC_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sW = sX + kGemmTile * kGemmLd;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemmTile, m0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const T* x = static_cast<const T*>(p.x);
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmTile) {
    __syncthreads();  // the previous tiles are no longer read
    for (int c = threadIdx.x; c < kGemmTile * kGemmTile; c += kGemmThreads) {
      const int r = c / kGemmTile, col = c % kGemmTile;
      const bool in = m0 + r < p.m && k0 + col < p.k;
      sX[r * kGemmLd + col] = in ? x[(m0 + r) * p.x_row_stride + k0 + col] : from_float<T>(0.0f);
    }
    decode_weight_tile(p, n0, k0, sW);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmTile / 16; ++kk) {
      uint32_t a[2][4];
      cuda::load_a(a[0], sX, kGemmLd, wm, kk * 16, lane);
      cuda::load_a(a[1], sX, kGemmLd, wm + 16, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t b[4];
        cuda::load_b_nk(b, sW, kGemmLd, wn + 16 * j, kk * 16, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          Mma::mma(acc[i][2 * j], a[i], b[0], b[1]);
          Mma::mma(acc[i][2 * j + 1], a[i], b[2], b[3]);
        }
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm + 16 * i + g + 8 * (e >> 1), col = n0 + wn + 8 * j + 2 * t + (e & 1);
        if (row < p.m && col < p.n)
          out[row * p.out_row_stride + col] = from_float<T>(acc[i][j][e] + (bias ? to_float(bias[col]) : 0.0f));
      }
}

}  // namespace

void weight_only_matmul_cuda(const WeightOnlyParams& p, CUstream_st* stream) {
  if (p.m > kMaxRows) throw std::invalid_argument("weight_only_matmul_cuda: at most 8 rows of x per call");
  if (p.k >= (int64_t{1} << 31)) throw std::invalid_argument("weight_only_matmul_cuda: in_features must be < 2^31");
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kWarps)));
  const size_t smem = 16 * sizeof(float);  // the NF4 table
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // 16-byte loads need every weight row and x row to start 16-byte aligned.
    const auto aligned = [](const void* ptr, int64_t stride_bytes) {
      return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride_bytes % 16 == 0;
    };
    const bool vec = aligned(p.qweight, p.qweight_row_stride) &&
                     aligned(p.x, (p.m > 1 ? p.x_row_stride : 0) * static_cast<int64_t>(sizeof(T)));
    if (p.m <= 1)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, smem, stream, gemv_kernel<T, 1>)(p, vec);
    else if (p.m <= 4)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, smem, stream, gemv_kernel<T, 4>)(p, vec);
    else
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, smem, stream, gemv_kernel<T, kMaxRows>)(p, vec);
  });
  cuda::check_launch("weight_only_matmul");
}

void weight_only_gemm_cuda(const WeightOnlyParams& p, CUstream_st* stream) {
  if (p.dtype == DType::kFloat32) throw std::invalid_argument("weight_only_gemm_cuda: x must be bf16 or fp16");
  if (p.m <= 0) return;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kGemmTile)),
                  static_cast<unsigned>(cuda::ceil_div(p.m, kGemmTile)));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>)
      TK_KERNEL_LAUNCH(grid, kGemmThreads, kGemmSmemBytes, stream, gemm_kernel<T>)(p);
  });
  cuda::check_launch("weight_only_gemm");
}

void weight_only_dequantize_cuda(const WeightOnlyParams& p, void* dense, CUstream_st* stream) {
  const int64_t total = p.n * p.qweight_row_stride;
  const int blocks = static_cast<int>(std::min<int64_t>(4096, cuda::ceil_div(total, 256)));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(blocks, 256, 0, stream, dequantize_kernel<T>)(p, static_cast<T*>(dense));
  });
  cuda::check_launch("weight_only_dequantize");
}

}  // namespace torchkiln
