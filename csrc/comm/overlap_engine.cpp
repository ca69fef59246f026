#include "comm/overlap_engine.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <chrono>
#include <stdexcept>

#include "comm/bucket_pack.h"
#include "common/op_checks.h"

namespace torchkiln {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

struct OverlapEngine::BucketState {
  std::vector<int64_t> params;
  std::vector<int64_t> offsets;
  int64_t numel = 0;
  at::Tensor flat;      // parameter dtype; gradient views point here
  at::Tensor comm;      // what is all-reduced: flat itself, or a comm_dtype copy
  at::Tensor residual;  // fp32 error feedback when comm is lower precision
  int64_t pending = 0;
  bool launched = false;
  c10::intrusive_ptr<c10d::Work> work;
  double launch_t = 0.0;
  // Written by the process group's completion callback (another thread).
  std::shared_ptr<std::atomic<double>> finish_t = std::make_shared<std::atomic<double>>(0.0);
};

OverlapEngine::OverlapEngine(std::vector<at::Tensor> params, const std::vector<std::vector<int64_t>>& bucket_params,
                             const std::string& group_name, std::optional<at::ScalarType> comm_dtype,
                             bool grads_as_views)
    : params_(std::move(params)), comm_dtype_(comm_dtype), views_(grads_as_views) {
  const int64_t n = static_cast<int64_t>(params_.size());
  param_bucket_.assign(n, -1);
  param_slot_.assign(n, -1);
  ready_.assign(n, 0);
  for (const at::Tensor& p : params_) {
    kernel_dtype(p, "OverlappedDataParallel", "every parameter");
    TORCH_CHECK_VALUE(p.is_contiguous(), "OverlappedDataParallel: parameters must be contiguous");
  }
  if (comm_dtype_) {
    TORCH_CHECK_TYPE(*comm_dtype_ == at::kFloat || *comm_dtype_ == at::kBFloat16 || *comm_dtype_ == at::kHalf,
                     "OverlappedDataParallel: comm_dtype must be float32, bfloat16 or float16, got ", *comm_dtype_);
  }
  for (const auto& members : bucket_params) {
    TORCH_CHECK_VALUE(!members.empty(), "OverlappedDataParallel: empty bucket");
    auto b = std::make_unique<BucketState>();
    const at::Tensor& first = params_.at(members[0]);
    for (int64_t i : members) {
      TORCH_CHECK_VALUE(i >= 0 && i < n && param_bucket_[i] < 0, "OverlappedDataParallel: parameter index ", i,
                        " is out of range or in two buckets");
      TORCH_CHECK_VALUE(params_[i].scalar_type() == first.scalar_type() && params_[i].device() == first.device(),
                        "OverlappedDataParallel: a bucket mixes dtypes or devices");
      param_bucket_[i] = static_cast<int64_t>(buckets_.size());
      param_slot_[i] = static_cast<int64_t>(b->params.size());
      b->params.push_back(i);
      b->offsets.push_back(b->numel);
      b->numel += params_[i].numel();
    }
    b->flat = at::zeros({b->numel}, first.options());
    const bool cast = comm_dtype_ && *comm_dtype_ != first.scalar_type();
    b->comm = cast ? at::empty({b->numel}, first.options().dtype(*comm_dtype_)) : b->flat;
    const bool lossy = cast && at::elementSize(*comm_dtype_) < at::elementSize(first.scalar_type());
    if (lossy) b->residual = at::zeros({b->numel}, first.options().dtype(at::kFloat));
    buckets_.push_back(std::move(b));
  }
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(param_bucket_[i] >= 0, "OverlappedDataParallel: parameter ", i, " is in no bucket");
  group_ = c10d::resolve_process_group(group_name);
  world_ = group_->getSize();
}

OverlapEngine::~OverlapEngine() {
  // A backward that raised may leave collectives running on our buffers.
  try {
    wait_launched();
  } catch (...) {
  }
}

void OverlapEngine::prepare() {
  for (auto& b : buckets_) {
    b->pending = static_cast<int64_t>(b->params.size());
    b->launched = false;
    b->work.reset();
    b->finish_t->store(0.0);
  }
  std::fill(ready_.begin(), ready_.end(), 0);
  next_launch_ = 0;
  if (!views_) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    BucketState& b = *buckets_[param_bucket_[i]];
    at::Tensor& p = params_[i];
    at::Tensor view = b.flat.narrow(0, b.offsets[param_slot_[i]], p.numel()).view(p.sizes());
    at::Tensor& grad = p.mutable_grad();
    if (grad.defined() && grad.data_ptr() == view.data_ptr()) continue;  // already our view
    if (grad.defined())
      view.copy_(grad);  // keep what was accumulated outside a view (e.g. under no_sync)
    else
      view.zero_();
    grad = view;
  }
}

void OverlapEngine::mark_ready(int64_t param) {
  TORCH_CHECK_VALUE(param >= 0 && param < static_cast<int64_t>(params_.size()),
                    "OverlappedDataParallel: parameter index ", param, " out of range");
  TORCH_CHECK(!ready_[param], "OverlappedDataParallel: parameter ", param,
              " produced a gradient twice in one backward pass (reentrant activation checkpointing is not "
              "supported; use torch.utils.checkpoint with use_reentrant=False)");
  ready_[param] = 1;
  BucketState& b = *buckets_[param_bucket_[param]];
  if (--b.pending == 0) launch_ready_in_order();
}

void OverlapEngine::launch_ready_in_order() {
  while (next_launch_ < num_buckets() && buckets_[next_launch_]->pending == 0) launch(next_launch_++);
}

void OverlapEngine::launch(int64_t bi) {
  BucketState& b = *buckets_[bi];
  std::vector<PackSegment> segments;
  BucketPackParams p;
  if (views_) {
    segments.push_back({b.flat.data_ptr(), b.numel, 0});  // in place, or flat -> comm
  } else {
    for (size_t s = 0; s < b.params.size(); ++s) {
      const at::Tensor& g = params_[b.params[s]].grad();
      TORCH_CHECK(!g.defined() || (g.is_contiguous() && g.sizes() == params_[b.params[s]].sizes() &&
                                   g.scalar_type() == b.flat.scalar_type()),
                  "OverlappedDataParallel: the gradient of parameter ", b.params[s],
                  " must be dense, contiguous and of the parameter's dtype");
      segments.push_back({g.defined() ? g.data_ptr() : nullptr, params_[b.params[s]].numel(), b.offsets[s]});
    }
  }
  p.segments = segments.data();
  p.num_segments = static_cast<int64_t>(segments.size());
  p.segment_dtype = kernel_dtype(b.flat, "OverlappedDataParallel", "gradient");
  p.bucket = b.comm.data_ptr();
  p.bucket_dtype = kernel_dtype(b.comm, "OverlappedDataParallel", "comm buffer");
  p.scale = 1.0f / static_cast<float>(world_);
  p.residual = b.residual.defined() ? b.residual.data_ptr<float>() : nullptr;
  TK_LAUNCH(b.flat, bucket_pack, p);
  std::vector<at::Tensor> tensors{b.comm};
  b.launch_t = now_s();
  b.work = group_->allreduce(tensors);
  std::shared_ptr<std::atomic<double>> finish = b.finish_t;
  try {
    b.work->getFuture()->addCallback([finish](c10::ivalue::Future&) { finish->store(now_s()); });
  } catch (const std::exception&) {
    // A backend without futures: the timeline lacks finish times, nothing else changes.
  }
  b.launched = true;
}

void OverlapEngine::wait_launched() {
  for (auto& b : buckets_)
    if (b->launched && b->work) b->work->wait();
}

std::vector<int64_t> OverlapEngine::finalize(bool allow_unused) {
  std::vector<int64_t> unready;
  for (size_t i = 0; i < params_.size(); ++i)
    if (!ready_[i]) unready.push_back(static_cast<int64_t>(i));
  if (!unready.empty()) {
    if (!allow_unused) {
      // Every rank runs the same model, so every rank stops before the same
      // bucket: finish what was launched and let the caller raise.
      wait_launched();
      return unready;
    }
    for (int64_t i : unready) {
      ready_[i] = 1;  // contributes zeros (or, with views, what its slice holds)
      --buckets_[param_bucket_[i]]->pending;
    }
    launch_ready_in_order();
  }
  TORCH_INTERNAL_ASSERT(next_launch_ == num_buckets());
  for (auto& bp : buckets_) {
    BucketState& b = *bp;
    b.work->wait();
    const bool cast = !b.comm.is_same(b.flat);
    std::vector<PackSegment> segments;
    if (views_) {
      if (!cast) continue;  // reduced in place
      segments.push_back({b.flat.data_ptr(), b.numel, 0});
    } else {
      for (size_t s = 0; s < b.params.size(); ++s) {
        at::Tensor& p = params_[b.params[s]];
        at::Tensor& g = p.mutable_grad();
        if (!g.defined()) g = at::empty_like(p, at::MemoryFormat::Contiguous);
        segments.push_back({g.data_ptr(), p.numel(), b.offsets[s]});
      }
    }
    BucketPackParams p;
    p.segments = segments.data();
    p.num_segments = static_cast<int64_t>(segments.size());
    p.segment_dtype = kernel_dtype(b.flat, "OverlappedDataParallel", "gradient");
    p.bucket = b.comm.data_ptr();
    p.bucket_dtype = kernel_dtype(b.comm, "OverlappedDataParallel", "comm buffer");
    TK_LAUNCH(b.flat, bucket_unpack, p);
  }
  return {};
}

std::vector<std::tuple<double, double, int64_t>> OverlapEngine::timeline() const {
  std::vector<std::tuple<double, double, int64_t>> out;
  for (const auto& b : buckets_) out.emplace_back(b->launch_t, b->finish_t->load(), b->comm.nbytes());
  return out;
}

std::vector<at::Tensor> OverlapEngine::bucket_buffers() const {
  std::vector<at::Tensor> out;
  for (const auto& b : buckets_) out.push_back(b->flat);
  return out;
}

}  // namespace torchkiln
