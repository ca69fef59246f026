// The C++ engine behind torchkiln.distributed.OverlappedDataParallel.
//
// It owns one flat buffer per gradient bucket (see bucket_plan.h), counts
// parameters whose gradient is final (mark_ready, called from autograd
// post-accumulate hooks), and as soon as the bucket that is next in the
// fixed launch order is complete it packs it (cast + 1/world scaling +
// error feedback fused) and starts an asynchronous all-reduce on the c10d
// process group, while backward goes on computing earlier layers. finalize()
// (queued to run when backward ends) launches what is left, waits once and
// writes the averaged gradients back.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace c10d {
class ProcessGroup;
class Work;
}  // namespace c10d

namespace torchkiln {

class OverlapEngine {
 public:
  // bucket_params: the parameter indices of each bucket in launch order
  // (plan_buckets); group_name: a c10d group's registered name.
  OverlapEngine(std::vector<at::Tensor> params, const std::vector<std::vector<int64_t>>& bucket_params,
                const std::string& group_name, std::optional<at::ScalarType> comm_dtype, bool grads_as_views);
  ~OverlapEngine();

  // Before a backward pass that synchronises: resets readiness and, with
  // gradient views, points every parameter's .grad at its bucket slice
  // (keeping any gradient accumulated so far).
  void prepare();
  void mark_ready(int64_t param);
  // Ends a synchronising backward. Parameters never marked ready either count
  // as zero gradients (allow_unused) or are returned, without any collective
  // launched for their buckets, so the caller can raise.
  std::vector<int64_t> finalize(bool allow_unused);

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  int64_t world_size() const { return world_; }
  // (launch, finish, bytes) per bucket of the last synchronisation, seconds
  // on a steady clock; finish is when the collective completed.
  std::vector<std::tuple<double, double, int64_t>> timeline() const;
  // The flat bucket buffers (for tests and tools).
  std::vector<at::Tensor> bucket_buffers() const;

 private:
  struct BucketState;
  void launch_ready_in_order();
  void launch(int64_t b);
  void wait_launched();

  std::vector<at::Tensor> params_;
  std::vector<std::unique_ptr<BucketState>> buckets_;
  std::vector<int64_t> param_bucket_, param_slot_;
  std::vector<char> ready_;
  int64_t next_launch_ = 0;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int64_t world_ = 1;
  std::optional<at::ScalarType> comm_dtype_;
  bool views_ = true;
};

}  // namespace torchkiln
