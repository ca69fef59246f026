#include "common/cpu_gemm_choice.h"

#include <c10/core/InferenceMode.h>

#include <mutex>

#include "common/best_time.h"

namespace torchkiln {
namespace {

std::mutex choice_mutex;
std::optional<bool> choice_bf16, choice_fp16;

std::optional<bool>& slot(at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kHalf,
                    "cpu_gemm_prefers_fp32: dtype must be bfloat16 or float16, got ", dtype);
  return dtype == at::kBFloat16 ? choice_bf16 : choice_fp16;
}

bool measure_prefers_fp32(at::ScalarType dtype) {
  // Not part of any caller's autograd graph; no RNG (the caller's random
  // stream stays untouched): a ramp of values has no zeros or denormals.
  const c10::InferenceMode guard;
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::linspace(-1.0, 1.0, 128 * 1024, fp32).view({128, 1024});
  const at::Tensor b = at::linspace(1.0, -1.0, 1024 * 1024, fp32).view({1024, 1024}).t();
  const double t_fp32 = best_call_seconds([&] { at::mm(a, b); });
  const at::Tensor a_low = a.to(dtype), b_low = b.to(dtype);
  const double t_low = best_call_seconds([&] { at::mm(a_low, b_low); });
  return t_fp32 < t_low;
}

}  // namespace

bool cpu_gemm_prefers_fp32(at::ScalarType dtype) {
  const std::lock_guard<std::mutex> lock(choice_mutex);
  std::optional<bool>& s = slot(dtype);
  if (!s) s = measure_prefers_fp32(dtype);
  return *s;
}

void override_cpu_gemm_choice(at::ScalarType dtype, std::optional<bool> prefers_fp32) {
  const std::lock_guard<std::mutex> lock(choice_mutex);
  slot(dtype) = prefers_fp32;
}

}  // namespace torchkiln
