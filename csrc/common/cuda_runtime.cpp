// The only glue file that sees CUDA runtime headers (built with CUDA only).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include "common/op_checks.h"

namespace torchkiln {

CUstream_st* current_cuda_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

bool capturing_cuda_graph(const at::Tensor& t) {
  return t.is_cuda() && c10::cuda::isStreamCapturingMayInitCtx(current_cuda_stream(t));
}

}  // namespace torchkiln
