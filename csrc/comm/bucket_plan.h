// Gradient bucket assignment for overlapped data-parallel all-reduce.
//
// Parameters are taken in reverse registration order (roughly the order in
// which backward produces their gradients) and packed greedily into buckets
// of at most `bucket_cap_bytes`; the first bucket is capped at
// `first_bucket_bytes` so the first all-reduce starts early in backward. A
// bucket holds one dtype and one device only. Every rank computes the same
// plan from the same model, so buckets are launched in the same order
// everywhere (a rank never waits on a collective the others skip).
#pragma once
#include <cstdint>
#include <vector>

namespace torchkiln {

struct BucketParam {
  int64_t numel = 0;
  int64_t element_size = 0;
  int64_t dtype = 0;   // any id; params of different ids never share a bucket
  int64_t device = 0;  // likewise
};

struct Bucket {
  std::vector<int64_t> params;   // indices into the parameter list, in bucket order
  std::vector<int64_t> offsets;  // element offset of each parameter in the flat bucket
  int64_t numel = 0;
};

// Throws std::invalid_argument for a non-positive cap or negative sizes.
std::vector<Bucket> plan_buckets(const std::vector<BucketParam>& params, int64_t bucket_cap_bytes,
                                 int64_t first_bucket_bytes);

}  // namespace torchkiln
