// FlashAttention-2 forward kernel (sm_80+ tensor cores), included by the
// per-head-dim instantiation files flash_fwd_hdim*.cu.
//
// One thread block owns kBlockM = 16 * kWarps query rows of one (batch, head);
// each warp owns 16 of those rows for the whole key loop, so the online
// softmax statistics never leave registers. Per key tile of kBlockN keys:
//   S = Q K^T (mma, fp32)  ->  scale / softcap / ALiBi / masks, base-2 units
//   m_new = max(m, rowmax S);  P = exp2(S - m_new);  l = l * 2^(m - m_new) + rowsum P
//   O = O * 2^(m - m_new) + P V   (P re-used from the accumulators as the A operand)
// Copies overlap compute FlashAttention-2 style with one K and one V buffer:
// V(n) streams in while S(n) is computed, K(n+1) while P(n) V(n) is.
#pragma once
#include <stdexcept>

#include "attention/cuda/flash_common.cuh"

namespace torchkiln {
namespace flash {

template <int D>
struct FwdConfig {
  static constexpr int kWarps = D <= 128 ? 8 : 4;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kLd = D + 8;
  static constexpr int kThreads = 32 * kWarps;
  // Two blocks per SM: the kernel is latency-bound, and two blocks' warps
  // hide it (measured on an H200, D = 128: 1.5x over one block at 165
  // registers, although 128 registers spill a few values).
  static constexpr int kMinBlocks = 2;
  static constexpr size_t kSmemBytes(size_t elem) { return (kBlockM + 2 * kBlockN) * kLd * elem; }
};

template <class T, int D, class C = FwdConfig<D>>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) flash_fwd_kernel(const FlashAttnParams p) {
  using Mma = MmaType<T>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kLd = C::kLd;
  TK_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kLd;
  T* sV = sK + kBlockN * kLd;

  const int b = blockIdx.z, h = blockIdx.y;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqInfo si = seq_info(p, b, h);
  // Last query tiles first: under a causal mask they see the most keys, and
  // starting them early keeps the tail of the grid short.
  const int i0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  if (i0 >= si.sq) return;
  const int i1 = min(i0 + kBlockM, si.sq);
  const int hk = h / static_cast<int>(p.heads / p.heads_k);
  const ScoreRule rule = score_rule(p, b, h, si.sq, si.sk);
  const KeyRange keys = key_range(rule, i0, i1);
  const int n_first = keys.begin / kBlockN;
  const int n_last = keys.end > keys.begin ? (keys.end - 1) / kBlockN : n_first - 1;  // inclusive

  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  // Keys from row j0 on into a tile: straight rows, or through the block table.
  const bool paged = p.block_table != nullptr;
  const auto load_kv = [&](T* tile, const T* base, const FlashAttnTensor& t, int j0) {
    if (!paged)
      load_tile_strided<kBlockN, D, C::kThreads>(tile, base + token_offset(t, b, varlen, si.k_off + j0, hk),
                                                 t.row_stride, si.sk - j0, base);
    else
      load_tile<kBlockN, D, C::kThreads>(tile, base, j0, si.sk, [&](int j) { return kv_offset(p, t, b, si.k_off, j, hk); });
  };

  load_tile_strided<kBlockM, D, C::kThreads>(sQ, q + token_offset(p.q, b, varlen, si.q_off + i0, h), p.q.row_stride,
                                             si.sq - i0, q);
  if (n_first <= n_last) load_kv(sK, k, p.k, n_first * kBlockN);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wrow = warp * 16;                              // warp's first row in the tile
  const int rows[2] = {i0 + wrow + g, i0 + wrow + g + 8};  // this lane's two query rows

  float acc_o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; ++d) acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.0f;
  // Scores are kept in units of `unit` (base-2 logit = score * unit): plain
  // scores stay raw, and the scale goes into the exponent's FMA (one
  // instruction a score fewer); modified ones (softcap, ALiBi, a scale <= 0)
  // are base 2 already, unit 1.
  const bool raw_scores = !rule.modified;
  const float unit = raw_scores ? rule.scale_log2 : 1.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // in units of `unit`
  float row_sum[2] = {0.0f, 0.0f};            // this lane's partial sums

  for (int n = n_first; n <= n_last; ++n) {
    const int n0 = n * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K(n) (and Q) landed; every warp is done with V(n-1)
    load_kv(sV, v, p.v, n0);
    cp_async_commit();

    float s[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, sQ, kLd, wrow, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < kBlockN / 16; ++j) {
        uint32_t bk[4];
        load_b_nk(bk, sK, kLd, j * 16, kk * 16, lane);
        Mma::mma(s[2 * j], a, bk[0], bk[1]);
        Mma::mma(s[2 * j + 1], a, bk[2], bk[3]);
      }
    }

    const bool mask = tile_needs_mask(rule, i0, i1, n0, n0 + kBlockN);
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e >> 1], key = n0 + j * 8 + 2 * t + (e & 1);
        if (raw_scores)
          s[j][e] = mask && !key_visible(rule, i, key) ? -INFINITY : s[j][e];
        else
          s[j][e] = score_log2(rule, s[j][e], i, key, mask);
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
      }
    // The running max moves only when a tile's max passes it by more than
    // kMaxSlack (base 2), so P stays below 2^kMaxSlack, which neither the
    // 16-bit P nor the fp32 sums mind (the lse uses the same max), and most
    // tiles skip rescaling O: the warp rescales when any of its rows moved.
    constexpr float kMaxSlack = 8.0f;
    float m_use[2], alpha[2];
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 lanes of a quad hold one row between them.
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      alpha[r] = 1.0f;
      if ((tile_max[r] - row_max[r]) * unit > kMaxSlack) {  // also the first finite max (NaN when both are -inf)
        alpha[r] = exp2f((row_max[r] - tile_max[r]) * unit);
        row_max[r] = tile_max[r];
        moved = true;
      }
      m_use[r] = (row_max[r] == -INFINITY ? 0.0f : row_max[r]) * unit;  // fully masked so far: keep P = 0
      row_sum[r] *= alpha[r];
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        acc_o[d][0] *= alpha[0];
        acc_o[d][1] *= alpha[0];
        acc_o[d][2] *= alpha[1];
        acc_o[d][3] *= alpha[1];
      }
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(fmaf(s[j][e], unit, -m_use[e >> 1]));
        row_sum[e >> 1] += s[j][e];
      }

    cp_async_wait_all();
    __syncthreads();  // V(n) landed; every warp is done with K(n)
    if (n < n_last) load_kv(sK, k, p.k, n0 + kBlockN);
    cp_async_commit();

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Mma::pack(s[2 * kk][0], s[2 * kk][1]), Mma::pack(s[2 * kk][2], s[2 * kk][3]),
                             Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d = 0; d < D / 16; ++d) {
        uint32_t bv[4];
        load_b_kn(bv, sV, kLd, kk * 16, d * 16, lane);
        Mma::mma(acc_o[2 * d], a, bv[0], bv[1]);
        Mma::mma(acc_o[2 * d + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait_all();  // nothing may be in flight when the block exits

  T* out = static_cast<T*>(p.out.ptr);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = rows[r];
    if (i >= si.sq) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key outputs zeros
    T* o = out + token_offset(p.out, b, varlen, si.q_off + i, h);
#pragma unroll
    for (int d = 0; d < D / 8; ++d)
      *reinterpret_cast<decltype(Mma::pair(0.f, 0.f))*>(o + d * 8 + 2 * t) =
          Mma::pair(acc_o[d][2 * r] * inv, acc_o[d][2 * r + 1] * inv);
    if (t == 0) p.lse[si.lse_off + i] = l > 0.0f ? (row_max[r] * unit + log2f(l)) * kLn2 : INFINITY;
  }
}

template <class T, int D, class C = FwdConfig<D>>
void run_flash_fwd(const FlashAttnParams& p, cudaStream_t stream) {
  const size_t smem = C::kSmemBytes(sizeof(T));
  auto kernel = flash_fwd_kernel<T, D, C>;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  // As much shared memory as the SM has: the default split can leave room
  // for fewer blocks than the registers allow.
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + C::kBlockM - 1) / C::kBlockM), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  TK_KERNEL_LAUNCH(grid, C::kThreads, smem, stream, kernel)(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("torchkiln: flash_attn forward launch failed: ") + cudaGetErrorString(err));
}

}  // namespace flash
}  // namespace torchkiln
