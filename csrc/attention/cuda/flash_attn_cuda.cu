// Entry points of the CUDA attention kernels: validate what the kernels
// assume (the glue guarantees it; these are our own invariants) and pick the
// head_dim instantiation.
#include <stdexcept>
#include <string>

#include "attention/cuda/flash_launch.h"

namespace torchkiln {
namespace {

void check_kernel_params(const FlashAttnParams& p) {
  if (p.dtype == DType::kFloat32)
    throw std::invalid_argument("torchkiln: the CUDA attention kernels take bf16 or fp16");
  if (flash_attn_cuda_head_dim(p.head_dim) != p.head_dim)
    throw std::invalid_argument("torchkiln: no CUDA attention kernel for head_dim " + std::to_string(p.head_dim));
  if (p.batch > 65535 || p.heads > 65535)
    throw std::invalid_argument("torchkiln: CUDA attention supports at most 65535 sequences and 65535 heads");
}

}  // namespace

void flash_attn_fwd_cuda(const FlashAttnParams& p, CUstream_st* stream) {
  check_kernel_params(p);
  switch (p.head_dim) {
    case 64: flash::run_fwd_hdim64(p, stream); break;
    case 96: flash::run_fwd_hdim96(p, stream); break;
    case 128: flash::run_fwd_hdim128(p, stream); break;
    default: flash::run_fwd_hdim256(p, stream); break;
  }
}

void flash_attn_bwd_cuda(const FlashAttnBwdParams& p, CUstream_st* stream) {
  check_kernel_params(p.fwd);
  if (p.dsum == nullptr) throw std::invalid_argument("torchkiln: CUDA attention backward needs dsum scratch");
  switch (p.fwd.head_dim) {
    case 64: flash::run_bwd_hdim64(p, stream); break;
    case 96: flash::run_bwd_hdim96(p, stream); break;
    case 128: flash::run_bwd_hdim128(p, stream); break;
    default: flash::run_bwd_hdim256(p, stream); break;
  }
}

}  // namespace torchkiln
