// Rotary position embedding (RoPE) on query/key heads.
//
// For a head vector x and a position p, the first rot_dim features are rotated
// pairwise by angles theta_i * p, with cos/sin read from a (max_position,
// rot_dim/2) table; features past rot_dim (partial rotary) pass through.
//   GPT-NeoX style (interleaved=false): pairs (x[i], x[i + rot_dim/2])
//   GPT-J style    (interleaved=true):  pairs (x[2i], x[2i+1])
//   out_a = a*cos - b*sin ; out_b = b*cos + a*sin     (inverse: sin -> -sin,
//   which is also the backward, since the rotation is orthogonal).
//
// Tokens are addressed as (batch, seq) with independent strides so both
// (batch, seq, heads, head_dim) and (batch, heads, seq, head_dim) views work;
// in and out may alias (in place).
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

struct RotaryParams {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t in_batch_stride = 0, in_seq_stride = 0, in_head_stride = 0;
  int64_t out_batch_stride = 0, out_seq_stride = 0, out_head_stride = 0;
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0, rot_dim = 0;
  const int64_t* positions = nullptr;  // (batch, seq) with the strides below
  int64_t pos_batch_stride = 0, pos_seq_stride = 0;
  const void* cos = nullptr;  // (max_position, rot_dim / 2), rows cs_row_stride apart
  const void* sin = nullptr;
  int64_t cs_row_stride = 0;
  int64_t max_position = 0;  // positions outside [0, max_position) are skipped (glue rejects them first)
  bool interleaved = false;
  bool inverse = false;
  DType dtype = DType::kFloat32;     // of in / out
  DType cs_dtype = DType::kFloat32;  // of cos / sin: fp32 or the same as dtype
};

TK_DECLARE_CPU_KERNEL(void, rotary_fwd, const RotaryParams&)
void rotary_fwd_cuda(const RotaryParams& p, CUstream_st* stream);

}  // namespace torchkiln
