// RMSNorm CPU kernels (compiled once per ISA; see common/cpu/vec.h).
// Memory-bound: one read of x (+ residual) and one write of the output. A row
// is at most a few tens of KiB, so the second pass over it hits L1/L2.
#include <cmath>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "norm/rms_norm.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

// Rows per task: enough elements that scheduling overhead stays negligible.
int64_t row_grain(int64_t hidden) { return hidden >= 16384 ? 1 : 16384 / hidden; }

// sum(a*b) over n elements, four independent accumulators to hide FMA latency.
template <class A, class B>
float dot(const A* a, const B* b, int64_t n) {
  Vec acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    acc0 = vfma(vload(a + j), vload(b + j), acc0);
    acc1 = vfma(vload(a + j + kW), vload(b + j + kW), acc1);
    acc2 = vfma(vload(a + j + 2 * kW), vload(b + j + 2 * kW), acc2);
    acc3 = vfma(vload(a + j + 3 * kW), vload(b + j + 3 * kW), acc3);
  }
  for (; j + kW <= n; j += kW) acc0 = vfma(vload(a + j), vload(b + j), acc0);
  if (j < n) acc1 = vfma(vload_partial(a + j, n - j), vload_partial(b + j, n - j), acc1);
  return vsum((acc0 + acc1) + (acc2 + acc3));
}

// Widens `n` elements of src to fp32 (done once per task for the weight).
template <class T>
void widen(const T* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vstore(dst + j, vload(src + j));
  if (j < n) vstore_partial(dst + j, vload_partial(src + j, n - j), n - j);
}

template <class T>
void forward_rows(const RmsNormParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t H = p.hidden;
  std::vector<float> wbuf(static_cast<size_t>(H));
  const float* w = wbuf.data();
  widen(static_cast<const T*>(p.weight), wbuf.data(), H);
  const bool stream = p.rows * H * static_cast<int64_t>(sizeof(T)) > kStreamingStoreBytes;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* s = static_cast<const T*>(p.x) + r * p.x_row_stride;
    if (p.residual) {
      const T* x = s;
      const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
      T* sum = static_cast<T*>(p.residual_out) + r * p.residual_out_row_stride;
      int64_t j = 0;
      for (; j + kW <= H; j += kW) vstore(sum + j, vload(x + j) + vload(res + j));
      if (j < H) vstore_partial(sum + j, vload_partial(x + j, H - j) + vload_partial(res + j, H - j), H - j);
      s = sum;  // normalise the sum as stored (rounded to T), like add-then-norm
    }
    const float rstd = 1.0f / std::sqrt(dot(s, s, H) / static_cast<float>(H) + p.eps);
    const Vec vr = vset1(rstd);
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
    // While this row is finished from L1, pull the next one in from DRAM so
    // the memory system never idles between the two passes.
    const bool has_next = r + 1 < row_end;
    const char* next =
        has_next ? reinterpret_cast<const char*>(static_cast<const T*>(p.x) + (r + 1) * p.x_row_stride) : nullptr;
    const int64_t next_bytes = has_next ? H * static_cast<int64_t>(sizeof(T)) : 0;
    int64_t j = 0;
    for (int64_t b = 0; j + kW <= H; j += kW, b += kW * static_cast<int64_t>(sizeof(T))) {
      if (b < next_bytes) __builtin_prefetch(next + b);
      vstore_out(out + j, vload(s + j) * vr * vload(w + j), stream);
    }
    if (j < H) vstore_partial(out + j, vload_partial(s + j, H - j) * vr * vload_partial(w + j, H - j), H - j);
  }
  if (stream) stream_fence();
}

// One slice of rows; dw for the slice accumulates into dwp (fp32, hidden).
template <class T>
void backward_rows(const RmsNormBwdParams& p, int64_t row_begin, int64_t row_end, float* dwp) {
  const int64_t H = p.hidden;
  const T* w = static_cast<const T*>(p.weight);
  const float inv_h = 1.0f / static_cast<float>(H);
  std::vector<float> gw(static_cast<size_t>(H));  // dy * w for the current row
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* dy = static_cast<const T*>(p.grad_out) + r * p.grad_out_row_stride;
    const T* s = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* gres =
        p.grad_residual ? static_cast<const T*>(p.grad_residual) + r * p.grad_residual_row_stride : nullptr;
    T* dx = static_cast<T*>(p.grad_x) + r * H;

    int64_t j = 0;
    for (; j + kW <= H; j += kW) vstore(gw.data() + j, vload(dy + j) * vload(w + j));
    if (j < H) vstore_partial(gw.data() + j, vload_partial(dy + j, H - j) * vload_partial(w + j, H - j), H - j);
    const float rstd = 1.0f / std::sqrt(dot(s, s, H) * inv_h + p.eps);
    const float c = rstd * rstd * rstd * dot(gw.data(), s, H) * inv_h;
    const Vec vr = vset1(rstd), vnc = vset1(-c);

    auto step = [&](int64_t at, int64_t n) {
      const bool full = n == kW;
      Vec sv = full ? vload(s + at) : vload_partial(s + at, n);
      Vec g = full ? vload(gw.data() + at) : vload_partial(gw.data() + at, n);
      Vec dxv = vfma(sv, vnc, g * vr);
      if (gres) dxv = dxv + (full ? vload(gres + at) : vload_partial(gres + at, n));
      Vec dyv = full ? vload(dy + at) : vload_partial(dy + at, n);
      Vec dw = vfma(dyv * sv, vr, full ? vload(dwp + at) : vload_partial(dwp + at, n));
      if (full) {
        vstore(dx + at, dxv);
        vstore(dwp + at, dw);
      } else {
        vstore_partial(dx + at, dxv, n);
        vstore_partial(dwp + at, dw, n);
      }
    };
    for (j = 0; j + kW <= H; j += kW) step(j, kW);
    if (j < H) step(j, H - j);
  }
}

}  // namespace

void rms_norm_fwd(const RmsNormParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, p.rows, row_grain(p.hidden),
                 [&](int64_t lo, int64_t hi) { forward_rows<T>(p, lo, hi); });
  });
}

void rms_norm_bwd(const RmsNormBwdParams& p) {
  const int64_t P = p.num_partials, H = p.hidden, rows = p.rows;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        float* dwp = p.dw_partial + c * H;
        for (int64_t j = 0; j < H; ++j) dwp[j] = 0.0f;
        backward_rows<T>(p, rows * c / P, rows * (c + 1) / P, dwp);
      }
    });
    // dw[j] = sum over partials, in fixed order so results are deterministic.
    T* dw = static_cast<T*>(p.grad_weight);
    parallel_for(0, H, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        float acc = 0.0f;
        for (int64_t c = 0; c < P; ++c) acc += p.dw_partial[c * H + j];
        dw[j] = from_float<T>(acc);
      }
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
