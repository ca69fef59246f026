// The only glue file that sees CUDA runtime headers (built with CUDA only).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "common/op_checks.h"

namespace torchkiln {

CUstream_st* current_cuda_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The CUDA runtime's own query: c10's capture helpers have changed their
// signatures between torch releases (we build against 2.11 to 2.14), this
// call has not.
bool capturing_cuda_graph(const at::Tensor& t) {
  if (!t.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_cuda_stream(t), &status));
  return status == cudaStreamCaptureStatusActive;
}

}  // namespace torchkiln
