// CPU pack / unpack of gradient buckets: one pass over each gradient with
// the cast, the averaging scale and the error-feedback residual fused.
// Segments are split over torch's threads by element ranges, so one large
// parameter uses every thread.
#include <algorithm>
#include <vector>

#include "comm/bucket_pack.h"
#include "common/cpu/vec.h"
#include "common/parallel.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task

// Work item: elements [begin, end) of one segment.
struct Piece {
  int64_t segment, begin, end;
};

std::vector<Piece> split(const BucketPackParams& p) {
  std::vector<Piece> pieces;
  for (int64_t s = 0; s < p.num_segments; ++s)
    for (int64_t b = 0; b < p.segments[s].numel; b += kGrain)
      pieces.push_back({s, b, std::min(p.segments[s].numel, b + kGrain)});
  return pieces;
}

template <class S, class B>
void pack_piece(const BucketPackParams& p, const Piece& pc) {
  const PackSegment& seg = p.segments[pc.segment];
  const S* src = static_cast<const S*>(seg.data);
  B* dst = static_cast<B*>(p.bucket) + seg.offset;
  float* res = p.residual ? p.residual + seg.offset : nullptr;
  constexpr int W = Vec::kWidth;
  const Vec scale = vset1(p.scale);
  int64_t i = pc.begin;
  for (; i + W <= pc.end; i += W) {
    Vec v = src ? vload(src + i) * scale : vzero();
    if (res) {
      v = v + vload(res + i);
      vstore(dst + i, v);
      vstore(res + i, v - vload(dst + i));  // what the rounding to B dropped
    } else {
      vstore(dst + i, v);
    }
  }
  for (; i < pc.end; ++i) {
    float v = src ? to_float(src[i]) * p.scale : 0.0f;
    if (res) {
      v += res[i];
      dst[i] = from_float<B>(v);
      res[i] = v - to_float(dst[i]);
    } else {
      dst[i] = from_float<B>(v);
    }
  }
}

template <class S, class B>
void unpack_piece(const BucketPackParams& p, const Piece& pc) {
  const PackSegment& seg = p.segments[pc.segment];
  S* dst = static_cast<S*>(seg.data);
  const B* src = static_cast<const B*>(p.bucket) + seg.offset;
  constexpr int W = Vec::kWidth;
  int64_t i = pc.begin;
  for (; i + W <= pc.end; i += W) vstore(dst + i, vload(src + i));
  for (; i < pc.end; ++i) dst[i] = from_float<S>(to_float(src[i]));
}

template <bool kPack>
void run(const BucketPackParams& p) {
  const std::vector<Piece> pieces = split(p);
  dispatch_dtype(p.segment_dtype, [&](auto s_tag) {
    dispatch_dtype(p.bucket_dtype, [&](auto b_tag) {
      using S = decltype(s_tag);
      using B = decltype(b_tag);
      parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          if (kPack)
            pack_piece<S, B>(p, pieces[k]);
          else
            unpack_piece<S, B>(p, pieces[k]);
        }
      });
    });
  });
}

}  // namespace

void bucket_pack(const BucketPackParams& p) { run<true>(p); }
void bucket_unpack(const BucketPackParams& p) { run<false>(p); }

}  // namespace TK_CPU_NS
}  // namespace torchkiln
