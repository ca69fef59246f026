#include "comm/bucket_plan.h"

#include <map>
#include <stdexcept>
#include <string>
#include <utility>

namespace torchkiln {

std::vector<Bucket> plan_buckets(const std::vector<BucketParam>& params, int64_t bucket_cap_bytes,
                                 int64_t first_bucket_bytes) {
  if (bucket_cap_bytes <= 0 || first_bucket_bytes <= 0)
    throw std::invalid_argument("bucket sizes must be positive, got cap " + std::to_string(bucket_cap_bytes) +
                                " and first " + std::to_string(first_bucket_bytes));
  std::vector<Bucket> done;
  // One open bucket per (dtype, device); the first bucket closed overall uses the small cap.
  std::map<std::pair<int64_t, int64_t>, std::pair<Bucket, int64_t>> open;  // -> (bucket, bytes)
  auto cap = [&]() { return done.empty() ? first_bucket_bytes : bucket_cap_bytes; };
  for (int64_t i = static_cast<int64_t>(params.size()) - 1; i >= 0; --i) {
    const BucketParam& p = params[i];
    if (p.numel < 0 || p.element_size <= 0)
      throw std::invalid_argument("parameter " + std::to_string(i) + " has a negative size");
    auto& [bucket, bytes] = open[{p.dtype, p.device}];
    bucket.params.push_back(i);
    bucket.offsets.push_back(bucket.numel);
    bucket.numel += p.numel;
    bytes += p.numel * p.element_size;
    if (bytes >= cap()) {
      done.push_back(std::move(bucket));
      bucket = Bucket{};
      bytes = 0;
    }
  }
  for (auto& [key, entry] : open)
    if (!entry.first.params.empty()) done.push_back(std::move(entry.first));
  return done;
}

}  // namespace torchkiln
