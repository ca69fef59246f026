// Tile-config sweep for the CUDA flash attention kernels, without torch: times
// the forward and the backward (b8 h16 s4096 d128 bf16, causal and full)
// under several warp counts, key tiles and blocks-per-SM bounds, and checks
// every variant's output against the shipped config's. Build and run on a GPU
// machine from the repository root:
//   nvcc -std=c++17 -O3 --use_fast_math -arch=sm_90a -Icsrc bench/cuda/flash_tile_configs.cu -o /tmp/ftc && /tmp/ftc
// The configs in flash_fwd.cuh / flash_bwd.cuh were picked with it (H200, 2026-12-01).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <cstdio>
#include <random>
#include <vector>

#include "attention/cuda/flash_bwd.cuh"
#include "attention/cuda/flash_fwd.cuh"

using namespace torchkiln;
using namespace torchkiln::flash;

template <int W, int N, int MB>
struct Cfg {
  static constexpr int kWarps = W, kBlockM = 16 * W, kBlockN = N, kLd = 128 + 8, kThreads = 32 * W, kMinBlocks = MB;
  static constexpr size_t kSmemBytes(size_t elem) { return (kBlockM + 2 * kBlockN) * kLd * elem; }
};

template <int A, int B>
struct BC : BwdConfig<128> {
  static constexpr int kDkdvMinBlocks = A, kDqMinBlocks = B;
};

constexpr int B = 8, H = 16, S = 4096, D = 128;
constexpr size_t kElems = size_t(B) * S * H * D;

// Median milliseconds of `launch` over `repeat` runs after `warmup`.
template <class F>
float median_ms(const F& launch, int warmup, int repeat) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < warmup; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < repeat; ++i) {
    cudaEventRecord(a);
    launch();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// The bf16 tensors at `ptrs` copied to the host, one after another.
std::vector<uint16_t> to_host(std::initializer_list<const void*> ptrs) {
  std::vector<uint16_t> out(ptrs.size() * kElems);
  size_t at = 0;
  for (const void* p : ptrs) {
    cudaMemcpy(out.data() + at, p, kElems * 2, cudaMemcpyDeviceToHost);
    at += kElems;
  }
  return out;
}

float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

double max_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (double)std::fabs(bf16_value(a[i]) - bf16_value(b[i])));
  return m;
}

// Prints one config's time; the first printed (ref still empty) becomes the reference.
void report(const char* what, const char* name, bool causal, float ms, double flops,
            const std::vector<uint16_t>& out, std::vector<uint16_t>& ref) {
  const bool first = ref.empty();
  if (first) ref = out;
  printf("%-4s %-18s %-7s %8.3f ms %7.1f TFLOP/s  max diff vs shipped %.3g  %s\n", what, name,
         causal ? "causal" : "full", ms, flops / ms / 1e9, first ? 0.0 : max_diff(out, ref),
         cudaGetErrorString(cudaGetLastError()));
}

template <class C>
void run_fwd(const char* name, FlashAttnParams p, bool causal, std::vector<uint16_t>& ref) {
  p.window_right = causal ? 0 : -1;
  const float ms = median_ms([&] { run_flash_fwd<__nv_bfloat16, D, C>(p, 0); }, 3, 10);
  const double flops = 4.0 * B * H * (double)S * S * D * (causal ? 0.5 : 1.0);
  report("fwd", name, causal, ms, flops, to_host({p.out.ptr}), ref);
}

template <class C>
void run_bwd(const char* name, FlashAttnBwdParams bp, bool causal, std::vector<uint16_t>& ref) {
  const float ms = median_ms([&] { run_flash_bwd<__nv_bfloat16, D, C>(bp, 0); }, 2, 7);
  const double flops = 2.5 * 4.0 * B * H * (double)S * S * D * (causal ? 0.5 : 1.0);
  report("bwd", name, causal, ms, flops, to_host({bp.dq.ptr, bp.dk.ptr, bp.dv.ptr}), ref);
}

void bwd(FlashAttnParams p) {
  void *dout, *dq, *dk, *dv;
  float* dsum;
  cudaMalloc(&dout, kElems * 2); cudaMalloc(&dq, kElems * 2); cudaMalloc(&dk, kElems * 2); cudaMalloc(&dv, kElems * 2);
  cudaMalloc(&dsum, size_t(B) * H * S * 4);
  cudaMemcpy(dout, p.q.ptr, kElems * 2, cudaMemcpyDeviceToDevice);
  FlashAttnBwdParams bp;
  bp.dout = p.q;
  bp.dout.ptr = dout;
  bp.dq = p.out; bp.dq.ptr = dq;
  bp.dk = p.out; bp.dk.ptr = dk;
  bp.dv = p.out; bp.dv.ptr = dv;
  bp.dsum = dsum;
  for (bool causal : {true, false}) {
    p.window_right = causal ? 0 : -1;
    run_flash_fwd<__nv_bfloat16, D>(p, 0);  // out and lse for this mask
    bp.fwd = p;
    std::vector<uint16_t> ref;
    run_bwd<BwdConfig<D>>("shipped", bp, causal, ref);
    run_bwd<BC<1, 4>>("dkdv1 dq4", bp, causal, ref);
    run_bwd<BC<3, 3>>("dkdv3 dq3", bp, causal, ref);
    run_bwd<BC<4, 4>>("dkdv4 dq4", bp, causal, ref);
  }
}

int main() {
  const size_t n = kElems;
  std::vector<uint16_t> h(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  void *q, *k, *v, *o;
  float* lse;
  cudaMalloc(&q, n * 2); cudaMalloc(&k, n * 2); cudaMalloc(&v, n * 2); cudaMalloc(&o, n * 2);
  cudaMalloc(&lse, size_t(B) * H * S * 4);
  for (void* t : {q, k, v}) {
    for (auto& x : h) { float f = nd(rng); uint32_t u; memcpy(&u, &f, 4); x = uint16_t(u >> 16); }
    cudaMemcpy(t, h.data(), n * 2, cudaMemcpyHostToDevice);
  }
  FlashAttnParams p;
  for (FlashAttnTensor* t : {&p.q, &p.k, &p.v}) { t->batch_stride = int64_t(S) * H * D; t->row_stride = H * D; t->head_stride = D; }
  p.q.ptr = q; p.k.ptr = k; p.v.ptr = v;
  p.out.ptr = o; p.out.batch_stride = int64_t(S) * H * D; p.out.row_stride = H * D; p.out.head_stride = D;
  p.lse = lse; p.lse_batch_stride = int64_t(H) * S; p.lse_head_stride = S;
  p.batch = B; p.seqlen_q = p.seqlen_k = S; p.heads = p.heads_k = H; p.head_dim = D;
  p.scale = 1.0f / std::sqrt(float(D)); p.dtype = DType::kBFloat16;
  for (bool causal : {true, false}) {
    std::vector<uint16_t> ref;
    run_fwd<FwdConfig<D>>("shipped", p, causal, ref);
    run_fwd<Cfg<8, 64, 1>>("W8 N64 MB1", p, causal, ref);
    run_fwd<Cfg<8, 48, 2>>("W8 N48 MB2", p, causal, ref);
    run_fwd<Cfg<8, 32, 2>>("W8 N32 MB2", p, causal, ref);
    run_fwd<Cfg<6, 64, 2>>("W6 N64 MB2", p, causal, ref);
    run_fwd<Cfg<4, 64, 4>>("W4 N64 MB4", p, causal, ref);
  }
  bwd(p);
  return 0;
}
