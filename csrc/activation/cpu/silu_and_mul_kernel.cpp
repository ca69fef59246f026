// SwiGLU gate CPU kernels (compiled once per ISA; see common/cpu/vec.h).
// Work is split over (row, column block) so that a handful of long rows
// (decode) still uses every thread.
#include "activation/silu_and_mul.h"
#include "common/cpu/vec.h"
#include "common/parallel.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kColBlock = 2048;

template <class F>
void for_each_block(int64_t rows, int64_t d, const F& f) {
  const int64_t blocks_per_row = (d + kColBlock - 1) / kColBlock;
  parallel_for(0, rows * blocks_per_row, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r = t / blocks_per_row, c0 = (t % blocks_per_row) * kColBlock;
      f(r, c0, d - c0 < kColBlock ? d - c0 : kColBlock);
    }
  });
}

template <class T>
void forward(const SiluAndMulParams& p) {
  const bool stream = p.rows * p.d * static_cast<int64_t>(sizeof(T)) > kStreamingStoreBytes;
  for_each_block(p.rows, p.d, [&](int64_t r, int64_t c0, int64_t n) {
    const T* a = static_cast<const T*>(p.x) + r * p.x_row_stride + c0;
    const T* b = a + p.d;
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride + c0;
    int64_t j = 0;
    for (; j + kW <= n; j += kW) {
      Vec av = vload(a + j);
      vstore_out(out + j, av * vsigmoid(av) * vload(b + j), stream);
    }
    if (j < n) {
      Vec av = vload_partial(a + j, n - j);
      vstore_partial(out + j, av * vsigmoid(av) * vload_partial(b + j, n - j), n - j);
    }
    if (stream) stream_fence();
  });
}

template <class T>
void backward(const SiluAndMulBwdParams& p) {
  const bool stream = 2 * p.rows * p.d * static_cast<int64_t>(sizeof(T)) > kStreamingStoreBytes;
  for_each_block(p.rows, p.d, [&](int64_t r, int64_t c0, int64_t n) {
    const T* a = static_cast<const T*>(p.x) + r * p.x_row_stride + c0;
    const T* b = a + p.d;
    const T* dy = static_cast<const T*>(p.grad_out) + r * p.grad_out_row_stride + c0;
    T* da = static_cast<T*>(p.grad_x) + r * p.grad_x_row_stride + c0;
    T* db = da + p.d;
    const Vec one = vset1(1.0f);
    auto step = [&](int64_t j, int64_t m) {
      const bool full = m == kW;
      Vec av = full ? vload(a + j) : vload_partial(a + j, m);
      Vec bv = full ? vload(b + j) : vload_partial(b + j, m);
      Vec g = full ? vload(dy + j) : vload_partial(dy + j, m);
      Vec sg = vsigmoid(av);
      Vec silu = av * sg;
      Vec dav = g * bv * sg * vfma(av, one - sg, one);  // sg * (1 + a(1 - sg))
      Vec dbv = g * silu;
      if (full) {
        vstore_out(da + j, dav, stream);
        vstore_out(db + j, dbv, stream);
      } else {
        vstore_partial(da + j, dav, m);
        vstore_partial(db + j, dbv, m);
      }
    };
    int64_t j = 0;
    for (; j + kW <= n; j += kW) step(j, kW);
    if (j < n) step(j, n - j);
    if (stream) stream_fence();
  });
}

}  // namespace

void silu_and_mul_fwd(const SiluAndMulParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}

void silu_and_mul_bwd(const SiluAndMulBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { backward<decltype(tag)>(p); });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
