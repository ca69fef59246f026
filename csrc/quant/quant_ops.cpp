// Torch glue for quantised matmul (weight-only int8 / int4 / nf4, and W8A8).
// Weight-only and W8A8, CPU and CUDA. Layouts: quant/quant_matmul.h.
#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "common/cpu_gemm_choice.h"
#include "common/op_checks.h"
#include "common/parallel.h"
#include "quant/gemm_choice.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

WeightFormat parse_format(const char* op, const std::string& f) {
  if (f == "int8") return WeightFormat::kInt8;
  if (f == "int4") return WeightFormat::kInt4;
  if (f == "nf4") return WeightFormat::kNf4;
  TORCH_CHECK_VALUE(false, op, ": format must be 'int8', 'int4' or 'nf4', got '", f, "'");
  return WeightFormat::kInt8;  // unreachable
}

// Many rows of x on AVX-512 CPUs: the GEMM that dequantises 8 weight rows
// at a time (weight_only_gemm.cpp), with fp32 FMAs for fp16 / fp32 x and,
// on AVX512_BF16, bf16 dot products for bf16 x (an even k). Zen 4, 2 cores,
// M=256: bf16 at 92-93% of `vdpbf16ps` peak, 1.0x ATen's bf16 GEMM on a
// weight dequantised beforehand, where dense tiles gave 0.8-0.95x; fp16 /
// fp32 at 205-220 GFLOP/s, where dense tiles and MKL's SGEMM gave 145-190
// (1.2-1.6x at M=32 and 256 with the ISA level forced to AVX-512 without
// BF16). bf16 x without AVX512_BF16 keeps dense tiles: ATen's bf16 GEMM is
// the one that knows the CPU (here it ran on Zen 4's BF16 units at 1.9x our
// fp32 GEMM, which an Ice Lake does not have; untimed there).
// cpu_gemm_applies says whether the kernel can run; cpu_gemm also asks the
// once-per-process measurement of gemm_choice.h (AMX CPUs: dense tiles),
// which only callers with many rows should trigger.
// paired: the length of the summed dimension (k forward, n for grad @ W),
// which bf16 words pair up.
bool cpu_gemm_level_applies(at::ScalarType dtype, int64_t paired) {
  if (dtype != at::kBFloat16) return active_cpu_isa() >= CpuIsa::kAvx512;  // fp32 FMAs
  return active_cpu_isa() == CpuIsa::kAvx512Bf16 && paired % 2 == 0;
}
bool cpu_gemm_applies(const at::Tensor& x, const WeightOnlyParams& p) {
  return !x.is_cuda() && cpu_gemm_level_applies(x.scalar_type(), p.k);
}
bool cpu_gemm(const at::Tensor& x, const WeightOnlyParams& p) {
  return cpu_gemm_applies(x, p) && cpu_quant_gemm_wins(x.scalar_type());
}

// Above this many rows of x the many-rows path takes over from the kernel
// that decodes the weight in registers: on CPU the GEMM above where it
// applies, else dense tiles (the weight dequantised in tiles, to the dtype
// cpu_gemm_choice.h picks, and multiplied by ATen's GEMM); on CUDA the
// tensor-core GEMM (the warp-per-row kernel's limit). CPU crossovers, 2
// cores (4096 x 4096, 4096 -> 11008, 11008 -> 4096). The GEMM pads x to 16,
// 32 or 48 rows a block, so its time is flat from 17 to 32 rows.
//  * Zen 4, bf16 x against the bf16 GEMM: int4 and nf4 with groups of 64 or
//    more (bf16 dot products from 3 rows, see tile_4bit_bf16_scaled) near
//    29 rows (in-register time 0.79-0.85x the GEMM's at 24, 1.06-1.12x at
//    32); int4 with groups of 32 (bf16 dot products per half chunk, see
//    tile_int4_bf16) near 11 (0.92-0.95x at 10, 1.07-1.17x at 12);
//    int8 near 40-48 (0.88-0.95x at 40, 1.06-1.16x at 48).
//  * Zen 4, fp16 and fp32 x against the fp32 GEMM (in-register time over
//    the GEMM's): int4 g128 0.64-1.04 at 12, 0.88-1.41 at 16, 0.84-1.24 at
//    24, 1.15-1.75 at 32; int4 g32 (split bf16 dot products) 0.91-0.97 at
//    12, 1.11-1.27 at 16; nf4 0.82-0.90 at 24, 1.05-1.21 at 32; int8 at
//    most 0.98 up to 48, then fp32 x 0.82-0.98 at 56-64 and 0.97-1.16 at
//    80-256 (the GEMM for its exact products), fp16 x 0.77-0.89 at 128-256
//    (int16-quantised x, see stage_int16; with outliers, exact fp32 and
//    equal; at most 256 rows, as its staging copies all of x).
//  * Zen 5 (AVX512_BF16), dense tiles in bf16 (778 GFLOP/s there), before
//    the scaled-table loop and the bf16 GEMM: int4 near 20-32, int8 near 16,
//    nf4 near 20-24.
//  * AVX2 Zen 3 (EPYC Milan, 2 cores), against dense tiles in fp32 and
//    ATen's AVX2 fp32 GEMM, in-register time over the GEMM's, 3 rounds:
//    16-bit x int4 g128 0.75-0.80 at 24, 0.77-1.15 at 32, 1.03-1.36 at 40;
//    int4 g32 0.84-1.10 at 16, 0.70-1.14 at 20, 1.06-1.31 at 24; nf4
//    0.92-1.30 at 16, 1.13-1.24 at 24; int8 (the int16 panels) 0.82-0.98
//    at 256 (fp16 x 0.70-1.04), 0.89-1.15 at 384, 1.03-1.47 at 512.
//    fp32 x int4 g128 0.63-0.98 at 16, 0.98-1.05 at 20, 1.06-1.23 at 24;
//    int4 g32 0.58-1.10 at 12, 1.01-1.18 at 16; nf4 0.58-1.02 at 10,
//    0.94-1.48 at 12; int8 0.89-1.38 at 24, 1.02-1.11 at 32. The Zen 4
//    forced to AVX2 put these crossovers lower (int8 16-bit x near 32): its
//    ATen GEMM still ran AVX-512, which an AVX2 CPU does not have.
//  * Zen 4 with the ISA level forced to AVX-512 without BF16, fp16 and fp32
//    x against the fp32 GEMM (in-register time over the GEMM's): int4 g128
//    0.82-0.90 at 24, 1.05-1.09 at 32; int4 g32 0.93-1.05 at 12, 1.08-1.16
//    at 24; nf4 0.95-1.02 at 16 (fp16 x at 24: 0.88-1.30, and no faster
//    than dense tiles), 1.25-1.37 at 32-64; int8 0.90-1.00 at 64-96,
//    0.98-1.05 at 128-160. bf16 x there (dense tiles in bf16, on the Zen
//    4's BF16 units): int8 0.85-0.91 at 16, 1.09-1.16 at 24; int4 g128
//    0.73-1.05 at 8, 0.91-1.27 at 12; int4 g32 0.91-0.96 at 6, 1.09-1.20
//    at 8; nf4 0.75-0.91 at 4, 1.02-1.35 at 8.
// Where gemm_choice.h hands the many rows to dense tiles (AMX CPUs) the
// GEMM's thresholds still apply: untimed there, so the probe is not run
// for calls with few rows.
int64_t dense_rows_threshold(const WeightOnlyParams& p, const at::Tensor& x) {
  if (x.is_cuda()) return 8;
  const bool half_chunk_groups = p.group_size % kNibbleChunk != 0;  // 4-bit g32 (g96 ...)
  if (active_cpu_isa() == CpuIsa::kAvx2) {
    const bool x16 = x.scalar_type() != at::kFloat;
    if (p.format == WeightFormat::kNf4) return x16 ? 16 : 10;
    // int8, 16-bit x: the int16 panels stage all of x (6 bytes an element)
    // and stop gaining past 256 rows.
    if (p.format == WeightFormat::kInt8) return x16 ? 256 : 24;
    if (half_chunk_groups) return x16 ? 16 : 12;
    return x16 ? 32 : 20;
  }
  if (cpu_gemm_applies(x, p)) {
    if (x.scalar_type() != at::kBFloat16) {  // the fp32 GEMM
      const bool bf16_isa = active_cpu_isa() == CpuIsa::kAvx512Bf16;
      if (p.format == WeightFormat::kInt8) return !bf16_isa ? 96 : x.scalar_type() == at::kHalf ? 256 : 64;
      if (p.format == WeightFormat::kNf4) return bf16_isa ? 24 : 16;
      if (half_chunk_groups) return 12;
      return bf16_isa ? 16 : 28;
    }
    if (p.format == WeightFormat::kInt8) return 40;
    return !half_chunk_groups ? 28 : p.format == WeightFormat::kInt4 ? 10 : 8;
  }
  // Dense tiles: bf16 x below AVX512_BF16 (or with an odd k), the scalar
  // level. int8 on AVX-512 runs the int16 panels from 5 rows, as fast as
  // dense tiles + ATen's bf16 GEMM up to about 40 (Zen 4 forced to plain
  // AVX-512, the bench shapes: M=32 0.93-1.00x their time, M=40 0.92-1.00,
  // M=48 1.02-1.11).
  if (p.format == WeightFormat::kInt8) return active_cpu_isa() == CpuIsa::kScalar ? 16 : 40;
  if (p.format == WeightFormat::kNf4) return 6;
  return half_chunk_groups ? 6 : 8;
}

void launch_dequantize(const WeightOnlyParams& p, const at::Tensor& dense) {
#ifdef TORCHKILN_WITH_CUDA
  if (dense.is_cuda()) {
    const c10::DeviceGuard guard(dense.device());
    weight_only_dequantize_cuda(p, dense.data_ptr(), current_cuda_stream(dense));
    return;
  }
#endif
  TK_CPU_DISPATCH(weight_only_dequantize, p, dense.data_ptr());
}

void check_group_matrix(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                        int64_t cols, const at::Tensor& qweight) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kFloat ? "float32" : "uint8",
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be (", rows,
                    ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  check_same_device(t, qweight, op, name, "qweight");
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be (", n, "), got ", bias->sizes());
  check_same_dtype(*bias, x, op, "bias", "x");
  check_same_device(*bias, x, op, "bias", "x");
  TORCH_CHECK_VALUE(bias->is_contiguous(), op, ": bias must be contiguous");
}

// Everything about the packed weight; returns the params with the weight
// fields filled in (k = in_features).
WeightOnlyParams check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, const std::string& format, int64_t group_size,
                              int64_t k) {
  WeightOnlyParams p;
  p.format = parse_format(op, format);
  TORCH_CHECK_VALUE(k > 0, op, ": in_features must be positive, got ", k);
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) > 0, op,
                    ": qweight must be (out_features, packed columns), got ", qweight.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous(), op, ": qweight must be contiguous");
  const int64_t n = qweight.size(0);
  int64_t row_bytes = k;
  if (p.format == WeightFormat::kInt8) {
    TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar, op, ": qweight must be int8 for format int8, got ",
                     qweight.scalar_type());
    TORCH_CHECK_VALUE(group_size == k, op, ": int8 weights have one scale per output row; group_size must be "
                      "in_features (", k, "), got ", group_size);
  } else {
    TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8 (two 4-bit codes per byte) "
                     "for format ", format, ", got ", qweight.scalar_type());
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0, op,
                      ": group_size must be a positive multiple of 32 for 4-bit formats, got ", group_size);
    TORCH_CHECK_VALUE(k % group_size == 0, op, ": in_features (", k, ") must be divisible by group_size (",
                      group_size, ")");
    row_bytes = (k + kNibbleChunk - 1) / kNibbleChunk * (kNibbleChunk / 2);
  }
  TORCH_CHECK_VALUE(qweight.size(1) == row_bytes, op, ": qweight must have ", row_bytes, " columns for ", k,
                    " in_features in format ", format, ", got ", qweight.size(1));
  const int64_t groups = k / group_size;
  check_group_matrix(op, scales, "scales", at::kFloat, n, groups, qweight);
  if (p.format == WeightFormat::kInt4) {
    TORCH_CHECK_VALUE(zeros.has_value(), op, ": zeros are required for format int4");
    check_group_matrix(op, *zeros, "zeros", at::kByte, n, groups, qweight);
    p.zeros = zeros->data_ptr<uint8_t>();
  } else {
    TORCH_CHECK_VALUE(!zeros.has_value(), op, ": zeros must be None for format ", format);
  }
  p.qweight = static_cast<const uint8_t*>(qweight.data_ptr());
  p.qweight_row_stride = row_bytes;
  p.scales = scales.data_ptr<float>();
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  return p;
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (..., in_features)");
  kernel_dtype(x, op, "x");
}

at::Tensor quant_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, const std::string& format, int64_t group_size,
                            int64_t in_features, at::ScalarType dtype) {
  const char* op = "quant_dequantize";
  WeightOnlyParams p = check_weight(op, qweight, scales, zeros, format, group_size, in_features);
  at::Tensor dense = at::empty({p.n, p.k}, qweight.options().dtype(dtype));
  p.dtype = kernel_dtype(dense, op, "dtype");
  launch_dequantize(p, dense);
  return dense;
}

// A dense CPU weight (n, k) quantised into the kernel layouts, as
// torchkiln.quantize defines each scheme (see quantize_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_quantize(const at::Tensor& weight, const std::string& format,
                                                              int64_t group_size, bool symmetric) {
  const char* op = "quant_quantize";
  QuantizeParams p;
  p.format = parse_format(op, format);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.numel() > 0, op,
                    ": weight must be a non-empty 2-D tensor (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be on the CPU, got ", weight.device());
  const at::Tensor w = weight.contiguous();
  p.dtype = kernel_dtype(w, op, "weight");
  p.n = w.size(0);
  p.k = w.size(1);
  p.group_size = group_size;
  p.symmetric = symmetric;
  int64_t row_bytes = p.k;
  if (p.format == WeightFormat::kInt8) {
    TORCH_CHECK_VALUE(group_size == p.k, op, ": int8 has one scale per output row; group_size must be in_features (",
                      p.k, "), got ", group_size);
  } else {
    TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0 && p.k % group_size == 0, op,
                      ": group_size must be a positive multiple of 32 dividing in_features (", p.k, "), got ",
                      group_size);
    row_bytes = (p.k + kNibbleChunk - 1) / kNibbleChunk * (kNibbleChunk / 2);
  }
  const int64_t groups = p.k / group_size;
  const auto f32 = w.options().dtype(at::kFloat);
  at::Tensor qweight =
      at::empty({p.n, row_bytes}, w.options().dtype(p.format == WeightFormat::kInt8 ? at::kChar : at::kByte));
  at::Tensor scales = at::empty({p.n, groups}, f32);
  at::Tensor zeros = at::empty({p.format == WeightFormat::kInt4 ? p.n : 0, groups}, w.options().dtype(at::kByte));
  p.w = w.data_ptr();
  p.w_row_stride = p.k;
  p.qweight = static_cast<uint8_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr<float>();
  p.zeros = p.format == WeightFormat::kInt4 ? zeros.data_ptr<uint8_t>() : nullptr;
  bool non_finite = false;
  p.non_finite = &non_finite;
  TK_CPU_DISPATCH(quantize_weight, p);
  TORCH_CHECK_VALUE(!non_finite, op, ": weight contains inf or nan");
  return {qweight, scales, zeros};
}

// Many rows of x: dequantise weight rows a tile at a time into a reused
// buffer (small enough to stay in cache and to come from the heap rather than
// fresh, page-faulting mmap memory) and multiply each tile with ATen's GEMM
// straight into its columns of out.
constexpr int64_t kDenseTileBytes = 4 << 20;

// One tile: weight rows [n0, n0 + nb) dequantised into buf, then out[:, n0:n0+nb].
void dense_tile_matmul(const WeightOnlyParams& p, const at::Tensor& x2, at::Tensor& out2,
                       const std::optional<at::Tensor>& bias, const at::Tensor& buf, int64_t n0, int64_t nb) {
  const int64_t groups = p.k / p.group_size;
  WeightOnlyParams tp = p;
  tp.qweight = p.qweight + n0 * p.qweight_row_stride;
  tp.scales = p.scales + n0 * groups;
  tp.zeros = p.zeros ? p.zeros + n0 * groups : nullptr;
  tp.n = nb;
  launch_dequantize(tp, buf);
  at::Tensor slice = out2.narrow(1, n0, nb);
  if (bias)
    at::addmm_out(slice, bias->narrow(0, n0, nb), x2, buf.narrow(0, 0, nb).t());
  else
    at::mm_out(slice, x2, buf.narrow(0, 0, nb).t());
}

at::Tensor dense_tiles_matmul(WeightOnlyParams p, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const int64_t n = p.n, k = p.k, m = x.numel() / k;
  at::Tensor out = at::empty(output_shape(x, n), x.options());
  // On CPU, 16-bit x multiplies in whichever of fp32 and x's dtype ATen's
  // GEMM runs faster on this machine (cpu_gemm_choice.h: 5x apart either way
  // on some CPUs). In fp32 the weight is dequantised to fp32 and the sums
  // round once at the end, as the GEMV path does.
  const bool fp32_gemm = !x.is_cuda() && x.scalar_type() != at::kFloat && cpu_gemm_prefers_fp32(x.scalar_type());
  const at::Tensor x2 = fp32_gemm ? x.reshape({m, k}).to(at::kFloat) : x.reshape({m, k});
  const std::optional<at::Tensor> bias2 = bias && fp32_gemm ? std::optional<at::Tensor>(bias->to(at::kFloat)) : bias;
  at::Tensor out2 = fp32_gemm ? at::empty({m, n}, x2.options()) : out.view({m, n});
  p.dtype = kernel_dtype(x2, "quant_matmul_weight_only", "x");
  const int64_t max_rows = std::max<int64_t>(32, kDenseTileBytes / (k * x2.element_size()) / 32 * 32);
  const int64_t threads = num_threads();
  if (x.is_cuda() || n < 64 * threads) {
    // One tile after another, each GEMM using every thread (cuBLAS on CUDA).
    const int64_t tile = std::min(n, max_rows);
    at::Tensor buf = at::empty({tile, k}, x2.options());
    for (int64_t n0 = 0; n0 < n; n0 += tile) dense_tile_matmul(p, x2, out2, bias2, buf, n0, std::min(tile, n - n0));
    if (fp32_gemm) out.view({m, n}).copy_(out2);
    return out;
  }
  // CPU: each thread dequantises its own tiles into its own buffer and runs a
  // one-thread GEMM on them, so no cache line of a buffer moves between cores.
  // The shared-buffer scheme above (dequantise with all threads, then one GEMM
  // with all) was bimodal here: in some processes its dequantise phase took
  // 16 ms per call instead of 3 and its GEMMs 61 instead of 55 (int4 M=256,
  // 11008 -> 4096: 76 ms against 58); per-thread tiles measure 57-60 ms in
  // every run. Tiles are a multiple of 32 columns wide, so where out's rows
  // start on a cache line neighbouring tiles share none.
  int64_t tiles = (n + max_rows - 1) / max_rows;
  tiles = (tiles + threads - 1) / threads * threads;
  const int64_t tile = ((n + tiles - 1) / tiles + 31) / 32 * 32;
  // (torchkiln::parallel_for: at::parallel_for in a file built without
  // -fopenmp would run serially; see parallel.h.) Pool threads start without
  // the caller's thread-local state, which the GEMMs need: under
  // torch.inference_mode, out is an inference tensor that only code inside
  // the mode may write; with grad mode on, addmm_out refuses a bias that
  // requires grad (the caller runs below autograd).
  const at::ThreadLocalState caller_state;
  parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor buf = at::empty({tile, k}, x2.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * tile;
      if (n0 < n) dense_tile_matmul(p, x2, out2, bias2, buf, n0, std::min(tile, n - n0));
    }
  });
  if (fp32_gemm) out.view({m, n}).copy_(out2);
  return out;
}

at::Tensor quant_matmul_weight_only(const at::Tensor& x_arg, const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                                    const std::string& format, int64_t group_size) {
  const char* op = "quant_matmul_weight_only";
  check_x(op, x_arg);
  const at::Tensor x = with_flat_rows(x_arg);  // any layout, as F.linear
  const int64_t k = x.size(-1);
  WeightOnlyParams p = check_weight(op, qweight, scales, zeros, format, group_size, k);
  check_bias(op, bias, x, p.n);
  const int64_t m = x.numel() / k;
  check_same_device(x, qweight, op, "x", "qweight");
  // Many rows: CUDA multiplies 16-bit x on tensor cores straight from the
  // packed weight; on CPU x takes weight_only_gemm where the ISA has it,
  // else dense tiles and ATen's GEMM (fp32 x on CUDA too).
  // (The GEMM's grid has at most 65535 tiles of 64 rows; more rows take the tile path.)
  const bool cuda_gemm = x.is_cuda() && x.scalar_type() != at::kFloat && m <= int64_t{65535} * 64;
  const bool many_rows = m > dense_rows_threshold(p, x);
  if (many_rows && !cuda_gemm && !cpu_gemm(x, p)) return dense_tiles_matmul(p, x, bias);
  at::Tensor out = at::empty(output_shape(x, p.n), x.options());
  if (m == 0) return out;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_row_stride = p.n;
  p.m = m;
  p.dtype = kernel_dtype(x, op, "x");
  if (many_rows && !x.is_cuda()) {
    TK_CPU_DISPATCH(weight_only_gemm, p);
    return out;
  }
#ifdef TORCHKILN_WITH_CUDA
  if (x.is_cuda()) {
    const c10::DeviceGuard guard(x.device());
    if (const int64_t splits = gemv_4bit_cuda_splits(p); splits > 0) {  // int4 / nf4, up to 16 rows of 16-bit x
      at::Tensor workspace;
      if (splits > 1) workspace = at::empty({splits, m, p.n}, x.options().dtype(at::kFloat));
      gemv_4bit_cuda(p, splits, splits > 1 ? workspace.data_ptr<float>() : nullptr, current_cuda_stream(x));
      return out;
    }
  }
  if (cuda_gemm && m > dense_rows_threshold(p, x)) {
    const c10::DeviceGuard guard(x.device());
    const int64_t splits = weight_only_gemm_cuda_splits(p);
    at::Tensor workspace;
    if (splits > 1) workspace = at::empty({splits, m, p.n}, x.options().dtype(at::kFloat));
    weight_only_gemm_cuda(p, splits, splits > 1 ? workspace.data_ptr<float>() : nullptr, current_cuda_stream(x));
    return out;
  }
#endif
  TK_LAUNCH(x, weight_only_matmul, p);
  return out;
}

// grad @ W, the input gradient of quant_matmul_weight_only (the weight is
// frozen). On AVX-512 CPUs weight_only_gemm_grad, which dequantises 128
// columns of W at a time (fp16 / fp32 grad in fp32 FMAs: Zen 4, M=256,
// 180-210 GFLOP/s against 105-125 for the dense route; with AVX512_BF16,
// bf16 grad with an even out_features in bf16 dot products). Elsewhere
// the dense W, in fp32 on CPU where ATen's fp32 GEMM is the faster one for
// 16-bit grad (cpu_gemm_choice.h), else in grad's dtype, and ATen's GEMM.
at::Tensor quant_matmul_weight_only_grad_input(const at::Tensor& grad_arg, const at::Tensor& qweight,
                                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                               const std::string& format, int64_t group_size, int64_t in_features) {
  const char* op = "quant_matmul_weight_only_grad_input";
  TORCH_CHECK_VALUE(grad_arg.dim() >= 1, op, ": grad must have at least one dimension (..., out_features)");
  kernel_dtype(grad_arg, op, "grad");
  WeightOnlyParams p = check_weight(op, qweight, scales, zeros, format, group_size, in_features);
  TORCH_CHECK_VALUE(grad_arg.size(-1) == p.n, op, ": grad must be (..., ", p.n,
                    ") to match qweight's out_features, got ", grad_arg.sizes());
  check_same_device(grad_arg, qweight, op, "grad", "qweight");
  const at::Tensor grad = with_flat_rows(grad_arg);
  const int64_t m = grad.numel() / p.n;
  const std::vector<int64_t> shape = output_shape(grad, p.k);
  if (!grad.is_cuda() && cpu_gemm_level_applies(grad.scalar_type(), p.n) &&
      cpu_quant_gemm_wins(grad.scalar_type())) {
    at::Tensor out = at::empty(shape, grad.options());
    if (m == 0) return out;
    p.x = grad.data_ptr();
    p.x_row_stride = row_stride(grad, op, "grad");
    p.out = out.data_ptr();
    p.out_row_stride = p.k;
    p.m = m;
    p.dtype = kernel_dtype(grad, op, "grad");
    TK_CPU_DISPATCH(weight_only_gemm_grad, p);
    return out;
  }
  const bool fp32_gemm =
      !grad.is_cuda() && grad.scalar_type() != at::kFloat && cpu_gemm_prefers_fp32(grad.scalar_type());
  at::Tensor dense = at::empty({p.n, p.k}, qweight.options().dtype(fp32_gemm ? at::kFloat : grad.scalar_type()));
  p.dtype = kernel_dtype(dense, op, "grad");
  launch_dequantize(p, dense);
  const at::Tensor g2 = grad.reshape({m, p.n});
  return at::mm(fp32_gemm ? g2.to(at::kFloat) : g2, dense).to(grad.scalar_type()).view(shape);
}

at::Tensor quant_matmul_w8a8(const at::Tensor& x_arg, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& weight_sums, const std::optional<at::Tensor>& bias) {
  const char* op = "quant_matmul_w8a8";
  check_x(op, x_arg);
  const at::Tensor x = with_flat_rows(x_arg);  // any layout, as F.linear
  const int64_t k = x.size(-1);
  // |q| <= 127 on both sides and x shifted to 0..255: int32 sums stay exact
  // up to 65536 columns.
  TORCH_CHECK_VALUE(k > 0 && k <= 65536, op, ": in_features must be in [1, 65536], got ", k);
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) > 0 && scales.is_contiguous(), op,
                    ": scales must be a contiguous (out_features) vector, got ", scales.sizes());
  check_same_device(scales, x, op, "scales", "x");
  const int64_t n = scales.size(0);
  const int64_t n16 = (n + kPanelRows - 1) / kPanelRows * kPanelRows, k4 = (k + 3) / 4 * 4;
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 4 && qweight.size(0) == n16 / kPanelRows && qweight.size(1) == k4 / 4 &&
                        qweight.size(2) == kPanelRows && qweight.size(3) == 4,
                    op, ": qweight must be the panel layout (", n16 / kPanelRows, ", ", k4 / 4, ", 16, 4) for ", n,
                    " out_features and ", k, " in_features, got ", qweight.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous(), op, ": qweight must be contiguous");
  check_same_device(qweight, x, op, "qweight", "x");
  TORCH_CHECK_TYPE(weight_sums.scalar_type() == at::kInt, op, ": weight_sums must be int32, got ",
                   weight_sums.scalar_type());
  TORCH_CHECK_VALUE(weight_sums.dim() == 1 && weight_sums.size(0) == n16 && weight_sums.is_contiguous(), op,
                    ": weight_sums must be a contiguous (", n16, ") vector, got ", weight_sums.sizes());
  check_same_device(weight_sums, x, op, "weight_sums", "x");
  check_bias(op, bias, x, n);
  at::Tensor out = at::empty(output_shape(x, n), x.options());
  const int64_t m = x.numel() / k;
  if (m == 0) return out;
  W8A8Params p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.qweight = qweight.data_ptr<int8_t>();
  p.scales = scales.data_ptr<float>();
  p.weight_sums = weight_sums.data_ptr<int32_t>();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_row_stride = n;
  p.m = m;
  p.n = n;
  p.k = k;
  p.dtype = kernel_dtype(x, op, "x");
#ifdef TORCHKILN_WITH_CUDA
  if (x.is_cuda()) {
    const c10::DeviceGuard guard(x.device());
    at::Tensor xq = at::empty({m, w8a8_cuda_x_stride(k)}, x.options().dtype(at::kChar));
    at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
    const int64_t splits = w8a8_cuda_splits(p);
    at::Tensor workspace;
    if (splits > 1) workspace = at::empty({splits, m, n}, x.options().dtype(at::kInt));
    w8a8_matmul_cuda(p, xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(), splits,
                     splits > 1 ? workspace.data_ptr<int32_t>() : nullptr, current_cuda_stream(x));
    return out;
  }
#endif
  TK_CPU_DISPATCH(w8a8_matmul, p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchkiln, CPU, m) {
  m.impl("quant_quantize", &quant_quantize);
  m.impl("quant_matmul_weight_only", &quant_matmul_weight_only);
  m.impl("quant_matmul_weight_only_grad_input", &quant_matmul_weight_only_grad_input);
  m.impl("quant_dequantize", &quant_dequantize);
  m.impl("quant_matmul_w8a8", &quant_matmul_w8a8);
}

#ifdef TORCHKILN_WITH_CUDA
TORCH_LIBRARY_IMPL(torchkiln, CUDA, m) {
  m.impl("quant_matmul_weight_only", &quant_matmul_weight_only);
  m.impl("quant_matmul_weight_only_grad_input", &quant_matmul_weight_only_grad_input);
  m.impl("quant_dequantize", &quant_dequantize);
  m.impl("quant_matmul_w8a8", &quant_matmul_w8a8);
}
#endif

}  // namespace torchkiln
