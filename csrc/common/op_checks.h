// Argument checks and small helpers shared by the torch glue (*_ops.cpp).
// Every failure is a TORCH_CHECK whose message names the op and the argument,
// so Python callers get a RuntimeError/ValueError that says what to fix.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return DType::kFloat32;  // unreachable
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_not_empty(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

// Whether t views as (rows, t.size(-1)) without copying: a contiguous last
// dimension, leading dimensions that collapse into one stride (true for
// contiguous tensors and for slices along the last dimension such as
// x[..., :d]) and rows that do not overlap. *stride gets the row stride.
enum class RowLayout { kFlat, kStridedLastDim, kUnevenRows, kOverlappingRows };
inline RowLayout row_layout(const at::Tensor& t, int64_t* stride) {
  const int64_t last = t.size(-1);
  if (last != 1 && t.stride(-1) != 1) return RowLayout::kStridedLastDim;
  int64_t rs = -1, expected = -1;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (rs < 0) {
      rs = t.stride(i);
      expected = rs * t.size(i);
    } else if (t.stride(i) != expected) {
      return RowLayout::kUnevenRows;
    } else {
      expected *= t.size(i);
    }
  }
  *stride = rs < 0 ? last : rs;
  return *stride >= last ? RowLayout::kFlat : RowLayout::kOverlappingRows;
}

// The row stride of t viewed as (rows, t.size(-1)); a clear error otherwise.
inline int64_t row_stride(const at::Tensor& t, const char* op, const char* name) {
  int64_t rs = 0;
  switch (row_layout(t, &rs)) {
    case RowLayout::kFlat:
      return rs;
    case RowLayout::kStridedLastDim:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be contiguous in its last dimension, got strides ", t.strides());
    case RowLayout::kUnevenRows:
      TORCH_CHECK_VALUE(false, op, ": ", name,
                        " must have evenly strided rows (leading dimensions that flatten into one); got sizes ",
                        t.sizes(), " and strides ", t.strides(), ". Call .contiguous() first");
    case RowLayout::kOverlappingRows:
      TORCH_CHECK_VALUE(false, op, ": ", name, " has overlapping rows (row stride ", rs, " < ", t.size(-1),
                        "); call .contiguous() first");
  }
  return rs;  // unreachable
}

// t itself when row_stride(t) accepts it, else a contiguous copy: for
// read-only inputs that may come in any layout (F.linear's x does).
// A 0-dim t comes back as is, for the op's own checks to reject.
inline at::Tensor with_flat_rows(const at::Tensor& t) {
  int64_t rs = 0;
  return t.dim() == 0 || row_layout(t, &rs) == RowLayout::kFlat ? t : t.contiguous();
}

// Mutated tensors must not write the same memory twice, nor alias each other.
inline void check_writable(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                    " is updated in place but has overlapping elements (e.g. from expand()); clone it first");
}

// Same rule as ATen's out= checks: overlap that ATen can prove (dense
// tensors) is an error; strided views it cannot decide are the caller's
// responsibility (q and k as interleaved views of one qkv buffer are legal).
inline void check_no_overlap(const at::Tensor& written, const at::Tensor& other, const char* op,
                             const char* name, const char* other_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(written, other);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ",
                    name, " is written and must not share memory with ", other_name);
}

#ifdef TORCHKILN_WITH_CUDA
// The current torch CUDA stream of t's device (common/cuda_runtime.cpp).
CUstream_st* current_cuda_stream(const at::Tensor& t);
// Whether that stream is capturing a CUDA graph: reading device memory on
// the host (a check, a plan) is not allowed then.
bool capturing_cuda_graph(const at::Tensor& t);
#else
inline bool capturing_cuda_graph(const at::Tensor&) { return false; }
#endif

// Runs the CPU kernel for the active ISA or the CUDA launcher, by t's device.
#ifdef TORCHKILN_WITH_CUDA
#define TK_LAUNCH(t, name, params)                                      \
  do {                                                                  \
    if ((t).is_cuda()) {                                                \
      const c10::DeviceGuard tk_device_guard((t).device());            \
      ::torchkiln::name##_cuda(params, ::torchkiln::current_cuda_stream(t)); \
    } else {                                                            \
      TK_CPU_DISPATCH(name, params);                                    \
    }                                                                   \
  } while (0)
#else
#define TK_LAUNCH(t, name, params)                                                        \
  do {                                                                                    \
    TORCH_CHECK(!(t).is_cuda(), "torchkiln was built without CUDA; rebuild with TORCHKILN_CUDA=on"); \
    TK_CPU_DISPATCH(name, params);                                                        \
  } while (0)
#endif

}  // namespace torchkiln
