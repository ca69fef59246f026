// Tile-config sweep for the CUDA flash attention kernels, without torch: times
// the forward and the backward (b8 h16 s4096 d128 bf16, causal and full)
// under several warp counts, key tiles and blocks-per-SM bounds, and checks
// every variant's output against the shipped config's. Build and run on a GPU
// machine from the repository root:
//   nvcc -std=c++17 -O3 --use_fast_math -arch=sm_90a -Icsrc bench/cuda/flash_tile_configs.cu -o /tmp/ftc && /tmp/ftc
// The configs in flash_fwd.cuh / flash_bwd.cuh were picked with it (H200, 2026-12-01).
#include <algorithm>
#include <cmath>
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

constexpr int B = 8, H = 16, S = 4096, D = 128;

template <class C>
float run(const char* name, FlashAttnParams p, bool causal, std::vector<uint16_t>* out_host, const std::vector<uint16_t>* ref) {
  p.window_right = causal ? 0 : -1;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) run_flash_fwd<__nv_bfloat16, D, C>(p, 0);
  std::vector<float> ms;
  for (int i = 0; i < 10; ++i) {
    cudaEventRecord(a);
    run_flash_fwd<__nv_bfloat16, D, C>(p, 0);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double flops = 4.0 * B * H * (double)S * S * D * (causal ? 0.5 : 1.0);
  std::vector<uint16_t> o(size_t(B) * S * H * D);
  cudaMemcpy(o.data(), p.out.ptr, o.size() * 2, cudaMemcpyDeviceToHost);
  double maxdiff = 0;
  if (ref)
    for (size_t i = 0; i < o.size(); ++i) {
      float x, y;
      uint32_t ux = uint32_t(o[i]) << 16, uy = uint32_t((*ref)[i]) << 16;
      memcpy(&x, &ux, 4);
      memcpy(&y, &uy, 4);
      maxdiff = std::max(maxdiff, (double)std::fabs(x - y));
    }
  if (out_host) *out_host = o;
  printf("%-22s %-9s %8.3f ms %7.1f TFLOP/s  maxdiff %.3g  err %s\n", name, causal ? "causal" : "full", ms[5],
         flops / ms[5] / 1e9, maxdiff, cudaGetErrorString(cudaGetLastError()));
  return ms[5];
}

template <int A, int B>
struct BC : BwdConfig<128> {
  static constexpr int kDkdvMinBlocks = A, kDqMinBlocks = B;
};

template <class C>
void run_bwd(const char* name, FlashAttnBwdParams bp, bool causal, std::vector<uint16_t>* out_host,
             const std::vector<uint16_t>* ref) {
  bp.fwd.window_right = causal ? 0 : -1;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 2; ++i) run_flash_bwd<__nv_bfloat16, D, C>(bp, 0);
  std::vector<float> ms;
  for (int i = 0; i < 7; ++i) {
    cudaEventRecord(a);
    run_flash_bwd<__nv_bfloat16, D, C>(bp, 0);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double flops = 2.5 * 4.0 * B * H * (double)S * S * D * (causal ? 0.5 : 1.0);
  const size_t n = size_t(B) * S * H * D;
  std::vector<uint16_t> o(3 * n);
  cudaMemcpy(o.data(), bp.dq.ptr, n * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(o.data() + n, bp.dk.ptr, n * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(o.data() + 2 * n, bp.dv.ptr, n * 2, cudaMemcpyDeviceToHost);
  double maxdiff = 0;
  if (ref)
    for (size_t i = 0; i < o.size(); ++i) {
      float x, y;
      uint32_t ux = uint32_t(o[i]) << 16, uy = uint32_t((*ref)[i]) << 16;
      memcpy(&x, &ux, 4);
      memcpy(&y, &uy, 4);
      maxdiff = std::max(maxdiff, (double)std::fabs(x - y));
    }
  if (out_host) *out_host = o;
  printf("bwd %-18s %-9s %8.3f ms %7.1f TFLOP/s  maxdiff %.3g  err %s\n", name, causal ? "causal" : "full", ms[3],
         flops / ms[3] / 1e9, maxdiff, cudaGetErrorString(cudaGetLastError()));
}

void bwd(FlashAttnParams p) {
  const size_t n = size_t(B) * S * H * D;
  void *dout, *dq, *dk, *dv;
  float* dsum;
  cudaMalloc(&dout, n * 2); cudaMalloc(&dq, n * 2); cudaMalloc(&dk, n * 2); cudaMalloc(&dv, n * 2);
  cudaMalloc(&dsum, size_t(B) * H * S * 4);
  cudaMemcpy(dout, p.q.ptr, n * 2, cudaMemcpyDeviceToDevice);
  FlashAttnBwdParams bp;
  bp.fwd = p;
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
    run_bwd<BwdConfig<D>>("shipped", bp, causal, &ref, nullptr);
    run_bwd<BC<1, 4>>("dkdv1 dq4", bp, causal, nullptr, &ref);
    run_bwd<BC<3, 3>>("dkdv3 dq3", bp, causal, nullptr, &ref);
    run_bwd<BC<3, 4>>("dkdv3 dq4", bp, causal, nullptr, &ref);
    run_bwd<BC<4, 4>>("dkdv4 dq4", bp, causal, nullptr, &ref);
  }
}

int main() {
  const size_t n = size_t(B) * S * H * D;
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
    run<FwdConfig<D>>("shipped", p, causal, &ref, nullptr);
    run<Cfg<8, 64, 1>>("W8 N64 MB1", p, causal, nullptr, &ref);
    run<Cfg<8, 48, 2>>("W8 N48 MB2", p, causal, nullptr, &ref);
    run<Cfg<6, 64, 2>>("W6 N64 MB2", p, causal, nullptr, &ref);
    run<Cfg<6, 32, 3>>("W6 N32 MB3", p, causal, nullptr, &ref);
  }
  bwd(p);
  return 0;
}
