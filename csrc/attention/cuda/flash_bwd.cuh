// FlashAttention-2 backward kernels (sm_80+ tensor cores), included by the
// per-head-dim instantiation files flash_bwd_hdim*.cu.
//
// With P recomputed from the forward's lse, dsum_i = sum_d dO_i O_i and
// dS = P * (dP - dsum) (times the softcap derivative and the softmax scale):
//   dV = P^T dO     dK = dS^T Q     (kernel dkdv: one block per key tile)
//   dQ = dS K                      (kernel dq:   one block per query tile)
// Two kernels instead of FlashAttention-2's atomic dQ accumulation: every
// gradient element is a sum in a fixed order, so gradients are bitwise
// deterministic, at the price of computing S and dP twice. GQA: a dkdv block
// walks every query head of its group, so dK / dV are summed in registers.
// Accumulators wider than 128 columns (head_dim 256) are produced in column
// passes of 128, recomputing S and dP per pass, to stay within registers.
#pragma once
#include <stdexcept>
#include <string>

#include "attention/cuda/flash_common.cuh"

namespace torchkiln {
namespace flash {

template <int D>
struct BwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Blocks per SM (__launch_bounds__): more resident warps hide latency.
  // Measured on an H200 at D = 128: 1.16x over the compiler's own choice
  // (2 and 3 blocks), despite a few spilled registers in dk/dv.
  static constexpr int kDkdvMinBlocks = D <= 128 ? 3 : 1, kDqMinBlocks = D <= 128 ? 4 : 1;
  static constexpr int kLd = D + 8;
  static constexpr int kAccD = D > 128 ? 128 : D;  // gradient columns per pass
  static constexpr int kPasses = D / kAccD;
  // dkdv: 16 keys per warp, query tiles of kTileQ
  static constexpr int kBlockKeys = 16 * kWarps;
  static constexpr int kTileQ = 32;
  // dq: 16 queries per warp, key tiles of kTileK
  static constexpr int kBlockQueries = 16 * kWarps;
  static constexpr int kTileK = 32;
  static constexpr size_t kDkdvSmem(size_t elem) {
    return 2 * (kBlockKeys + kTileQ) * kLd * elem + 2 * kTileQ * sizeof(float);
  }
  static constexpr size_t kDqSmem(size_t elem) { return 2 * (kBlockQueries + kTileK) * kLd * elem; }
};

// dsum[b, h, i] = sum_d dout * out, fp32, in the lse layout. One warp per row.
template <class T>
__global__ void flash_bwd_dsum_kernel(const FlashAttnBwdParams bp) {
  const FlashAttnParams& p = bp.fwd;
  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo si = seq_info(p, b, h);
  const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (i >= si.sq) return;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* o = static_cast<const T*>(p.out.ptr) + token_offset(p.out, b, varlen, si.q_off + i, h);
  const T* dout = static_cast<const T*>(bp.dout.ptr) + token_offset(bp.dout, b, varlen, si.q_off + i, h);
  float acc = 0.0f;
  for (int d = lane; d < p.head_dim; d += 32) acc += MmaType<T>::to_float(o[d]) * MmaType<T>::to_float(dout[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) bp.dsum[si.lse_off + i] = acc;
}

template <class T, int D, class C = BwdConfig<D>>
__global__ void __launch_bounds__(C::kThreads, C::kDkdvMinBlocks) flash_bwd_dkdv_kernel(const FlashAttnBwdParams bp) {
  using Mma = MmaType<T>;
  constexpr int kLd = C::kLd, kTileQ = C::kTileQ, kBlockKeys = C::kBlockKeys;
  const FlashAttnParams& p = bp.fwd;
  TK_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockKeys * kLd;
  T* sQ = sV + kBlockKeys * kLd;
  T* sdO = sQ + kTileQ * kLd;
  float* sLse = reinterpret_cast<float*>(sdO + kTileQ * kLd);  // base 2
  float* sDsum = sLse + kTileQ;

  const int b = blockIdx.z, hk = blockIdx.y;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int group = static_cast<int>(p.heads / p.heads_k);
  const SeqInfo si0 = seq_info(p, b, hk * group);
  const int n0 = blockIdx.x * kBlockKeys;
  if (n0 >= si0.sk) return;
  const int n1 = min(n0 + kBlockKeys, si0.sk);

  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  const T* dout = static_cast<const T*>(bp.dout.ptr);
  load_tile_strided<kBlockKeys, D, C::kThreads>(sK, k + token_offset(p.k, b, varlen, si0.k_off + n0, hk),
                                                p.k.row_stride, si0.sk - n0, k);
  load_tile_strided<kBlockKeys, D, C::kThreads>(sV, v + token_offset(p.v, b, varlen, si0.k_off + n0, hk),
                                                p.v.row_stride, si0.sk - n0, v);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wrow = warp * 16;
  const int keys[2] = {n0 + wrow + g, n0 + wrow + g + 8};

  for (int pass = 0; pass < C::kPasses; ++pass) {
    const int col0 = pass * C::kAccD;
    float acc_dk[C::kAccD / 8][4], acc_dv[C::kAccD / 8][4];
#pragma unroll
    for (int d = 0; d < C::kAccD / 8; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[d][e] = acc_dv[d][e] = 0.0f;

    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      const SeqInfo si = seq_info(p, b, h);
      const ScoreRule rule = score_rule(p, b, h, si.sq, si.sk);
      const KeyRange queries = query_range(rule, si.sq, n0, n1);
      if (queries.end <= queries.begin) continue;
      for (int i0 = queries.begin / kTileQ * kTileQ; i0 < queries.end; i0 += kTileQ) {
        __syncthreads();  // the previous tile's Q / dO / lse are no longer read
        load_tile_strided<kTileQ, D, C::kThreads>(sQ, q + token_offset(p.q, b, varlen, si.q_off + i0, h),
                                                  p.q.row_stride, si.sq - i0, q);
        load_tile_strided<kTileQ, D, C::kThreads>(sdO, dout + token_offset(bp.dout, b, varlen, si.q_off + i0, h),
                                                  bp.dout.row_stride, si.sq - i0, dout);
        cp_async_commit();
        if (threadIdx.x < kTileQ) {
          const int i = i0 + threadIdx.x;
          // Rows past the end: lse = +inf makes their P exactly 0.
          sLse[threadIdx.x] = i < si.sq ? p.lse[si.lse_off + i] * kLog2e : INFINITY;
          sDsum[threadIdx.x] = i < si.sq ? bp.dsum[si.lse_off + i] * rule.scale : 0.0f;  // scaled: see ds below
        }
        cp_async_wait_all();
        __syncthreads();

        // S^T = K Q^T: this warp's 16 keys x kTileQ queries.
        float s[kTileQ / 8][4], dp[kTileQ / 8][4];
#pragma unroll
        for (int j = 0; j < kTileQ / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ak[4], av[4];
          load_a(ak, sK, kLd, wrow, kk * 16, lane);
          load_a(av, sV, kLd, wrow, kk * 16, lane);
#pragma unroll
          for (int j = 0; j < kTileQ / 16; ++j) {
            uint32_t bq[4], bdo[4];
            load_b_nk(bq, sQ, kLd, j * 16, kk * 16, lane);
            load_b_nk(bdo, sdO, kLd, j * 16, kk * 16, lane);
            Mma::mma(s[2 * j], ak, bq[0], bq[1]);
            Mma::mma(s[2 * j + 1], ak, bq[2], bq[3]);
            Mma::mma(dp[2 * j], av, bdo[0], bdo[1]);  // dP^T = V dO^T
            Mma::mma(dp[2 * j + 1], av, bdo[2], bdo[3]);
          }
        }
        const bool mask = tile_needs_mask(rule, i0, min(i0 + kTileQ, si.sq), n0, n0 + kBlockKeys);
#pragma unroll
        for (int j = 0; j < kTileQ / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = j * 8 + 2 * t + (e & 1);
            float cap;
            const float prob = probability(rule, s[j][e], i0 + col, keys[e >> 1], mask, sLse[col], cap);
            s[j][e] = prob;
            dp[j][e] = prob * cap * fmaf(dp[j][e], rule.scale, -sDsum[col]);  // dS^T w.r.t. the raw q.k
          }

        // dV += P^T dO and dK += dS^T Q over this query tile.
#pragma unroll
        for (int kk = 0; kk < kTileQ / 16; ++kk) {
          const uint32_t ap[4] = {Mma::pack(s[2 * kk][0], s[2 * kk][1]), Mma::pack(s[2 * kk][2], s[2 * kk][3]),
                                  Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
          const uint32_t ads[4] = {Mma::pack(dp[2 * kk][0], dp[2 * kk][1]), Mma::pack(dp[2 * kk][2], dp[2 * kk][3]),
                                   Mma::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                   Mma::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
          for (int d = 0; d < C::kAccD / 16; ++d) {
            uint32_t bdo[4], bq[4];
            load_b_kn(bdo, sdO, kLd, kk * 16, col0 + d * 16, lane);
            load_b_kn(bq, sQ, kLd, kk * 16, col0 + d * 16, lane);
            Mma::mma(acc_dv[2 * d], ap, bdo[0], bdo[1]);
            Mma::mma(acc_dv[2 * d + 1], ap, bdo[2], bdo[3]);
            Mma::mma(acc_dk[2 * d], ads, bq[0], bq[1]);
            Mma::mma(acc_dk[2 * d + 1], ads, bq[2], bq[3]);
          }
        }
      }
    }

    // Keys that no query sees still get their (zero) gradients written.
    T* dk = static_cast<T*>(bp.dk.ptr);
    T* dv = static_cast<T*>(bp.dv.ptr);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = keys[r];
      if (j >= si0.sk) continue;
      T* dk_row = dk + token_offset(bp.dk, b, varlen, si0.k_off + j, hk) + col0;
      T* dv_row = dv + token_offset(bp.dv, b, varlen, si0.k_off + j, hk) + col0;
#pragma unroll
      for (int d = 0; d < C::kAccD / 8; ++d) {
        using Pair = decltype(Mma::pair(0.f, 0.f));
        *reinterpret_cast<Pair*>(dk_row + d * 8 + 2 * t) = Mma::pair(acc_dk[d][2 * r], acc_dk[d][2 * r + 1]);
        *reinterpret_cast<Pair*>(dv_row + d * 8 + 2 * t) = Mma::pair(acc_dv[d][2 * r], acc_dv[d][2 * r + 1]);
      }
    }
  }
  cp_async_wait_all();
}

template <class T, int D, class C = BwdConfig<D>>
__global__ void __launch_bounds__(C::kThreads, C::kDqMinBlocks) flash_bwd_dq_kernel(const FlashAttnBwdParams bp) {
  using Mma = MmaType<T>;
  constexpr int kLd = C::kLd, kTileK = C::kTileK, kBlockQ = C::kBlockQueries;
  const FlashAttnParams& p = bp.fwd;
  TK_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockQ * kLd;
  T* sK = sdO + kBlockQ * kLd;
  T* sV = sK + kTileK * kLd;

  const int b = blockIdx.z, h = blockIdx.y;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqInfo si = seq_info(p, b, h);
  const int i0 = (gridDim.x - 1 - blockIdx.x) * kBlockQ;  // heaviest (causal) query tiles first
  if (i0 >= si.sq) return;
  const int i1 = min(i0 + kBlockQ, si.sq);
  const int hk = h / static_cast<int>(p.heads / p.heads_k);
  const ScoreRule rule = score_rule(p, b, h, si.sq, si.sk);
  const KeyRange keys = key_range(rule, i0, i1);

  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  const T* q = static_cast<const T*>(p.q.ptr);
  const T* dout = static_cast<const T*>(bp.dout.ptr);
  load_tile_strided<kBlockQ, D, C::kThreads>(sQ, q + token_offset(p.q, b, varlen, si.q_off + i0, h), p.q.row_stride,
                                             si.sq - i0, q);
  load_tile_strided<kBlockQ, D, C::kThreads>(sdO, dout + token_offset(bp.dout, b, varlen, si.q_off + i0, h),
                                             bp.dout.row_stride, si.sq - i0, dout);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wrow = warp * 16;
  const int rows[2] = {i0 + wrow + g, i0 + wrow + g + 8};
  float lse2[2], dsum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = rows[r] < si.sq ? p.lse[si.lse_off + rows[r]] * kLog2e : INFINITY;
    dsum[r] = rows[r] < si.sq ? bp.dsum[si.lse_off + rows[r]] * rule.scale : 0.0f;  // scaled: see ds below
  }

  for (int pass = 0; pass < C::kPasses; ++pass) {
    const int col0 = pass * C::kAccD;
    float acc_dq[C::kAccD / 8][4];
#pragma unroll
    for (int d = 0; d < C::kAccD / 8; ++d) acc_dq[d][0] = acc_dq[d][1] = acc_dq[d][2] = acc_dq[d][3] = 0.0f;

    for (int n0 = keys.begin / kTileK * kTileK; n0 < keys.end; n0 += kTileK) {
      __syncthreads();  // the previous K / V tile is no longer read
      load_tile_strided<kTileK, D, C::kThreads>(sK, k + token_offset(p.k, b, varlen, si.k_off + n0, hk),
                                                p.k.row_stride, si.sk - n0, k);
      load_tile_strided<kTileK, D, C::kThreads>(sV, v + token_offset(p.v, b, varlen, si.k_off + n0, hk),
                                                p.v.row_stride, si.sk - n0, v);
      cp_async_commit();
      cp_async_wait_all();
      __syncthreads();

      float s[kTileK / 8][4], dp[kTileK / 8][4];
#pragma unroll
      for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t aq[4], ado[4];
        load_a(aq, sQ, kLd, wrow, kk * 16, lane);
        load_a(ado, sdO, kLd, wrow, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < kTileK / 16; ++j) {
          uint32_t bk[4], bv[4];
          load_b_nk(bk, sK, kLd, j * 16, kk * 16, lane);
          load_b_nk(bv, sV, kLd, j * 16, kk * 16, lane);
          Mma::mma(s[2 * j], aq, bk[0], bk[1]);
          Mma::mma(s[2 * j + 1], aq, bk[2], bk[3]);
          Mma::mma(dp[2 * j], ado, bv[0], bv[1]);  // dP = dO V^T
          Mma::mma(dp[2 * j + 1], ado, bv[2], bv[3]);
        }
      }
      const bool mask = tile_needs_mask(rule, i0, i1, n0, n0 + kTileK);
#pragma unroll
      for (int j = 0; j < kTileK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float cap;
          const float prob = probability(rule, s[j][e], rows[r], n0 + j * 8 + 2 * t + (e & 1), mask, lse2[r], cap);
          dp[j][e] = prob * cap * fmaf(dp[j][e], rule.scale, -dsum[r]);
        }
      // dQ += dS K
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        const uint32_t ads[4] = {Mma::pack(dp[2 * kk][0], dp[2 * kk][1]), Mma::pack(dp[2 * kk][2], dp[2 * kk][3]),
                                 Mma::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                 Mma::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int d = 0; d < C::kAccD / 16; ++d) {
          uint32_t bk[4];
          load_b_kn(bk, sK, kLd, kk * 16, col0 + d * 16, lane);
          Mma::mma(acc_dq[2 * d], ads, bk[0], bk[1]);
          Mma::mma(acc_dq[2 * d + 1], ads, bk[2], bk[3]);
        }
      }
    }

    T* dq = static_cast<T*>(bp.dq.ptr);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] >= si.sq) continue;
      T* row = dq + token_offset(bp.dq, b, varlen, si.q_off + rows[r], h) + col0;
#pragma unroll
      for (int d = 0; d < C::kAccD / 8; ++d) {
        using Pair = decltype(Mma::pair(0.f, 0.f));
        *reinterpret_cast<Pair*>(row + d * 8 + 2 * t) = Mma::pair(acc_dq[d][2 * r], acc_dq[d][2 * r + 1]);
      }
    }
  }
  cp_async_wait_all();
}

inline void check_bwd_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("torchkiln: flash_attn backward ") + what +
                             " launch failed: " + cudaGetErrorString(err));
}

template <class T, int D, class C = BwdConfig<D>>
void run_flash_bwd(const FlashAttnBwdParams& bp, cudaStream_t stream) {
  const FlashAttnParams& p = bp.fwd;
  const unsigned batch = static_cast<unsigned>(p.batch), heads = static_cast<unsigned>(p.heads);

  constexpr int kRowsPerDsumBlock = 8;
  const dim3 dsum_grid(static_cast<unsigned>((p.seqlen_q + kRowsPerDsumBlock - 1) / kRowsPerDsumBlock), heads, batch);
  TK_KERNEL_LAUNCH(dsum_grid, 32 * kRowsPerDsumBlock, 0, stream, flash_bwd_dsum_kernel<T>)(bp);
  check_bwd_launch("dsum");

  const size_t dkdv_smem = C::kDkdvSmem(sizeof(T));
  auto dkdv = flash_bwd_dkdv_kernel<T, D, C>;
  if (dkdv_smem > 48 * 1024)
    cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dkdv_smem));
  cudaFuncSetAttribute(dkdv, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  const dim3 dkdv_grid(static_cast<unsigned>((p.seqlen_k + C::kBlockKeys - 1) / C::kBlockKeys),
                       static_cast<unsigned>(p.heads_k), batch);
  TK_KERNEL_LAUNCH(dkdv_grid, C::kThreads, dkdv_smem, stream, dkdv)(bp);
  check_bwd_launch("dk/dv");

  const size_t dq_smem = C::kDqSmem(sizeof(T));
  auto dq = flash_bwd_dq_kernel<T, D, C>;
  if (dq_smem > 48 * 1024)
    cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dq_smem));
  cudaFuncSetAttribute(dq, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  const dim3 dq_grid(static_cast<unsigned>((p.seqlen_q + C::kBlockQueries - 1) / C::kBlockQueries), heads, batch);
  TK_KERNEL_LAUNCH(dq_grid, C::kThreads, dq_smem, stream, dq)(bp);
  check_bwd_launch("dq");
}

}  // namespace flash
}  // namespace torchkiln
