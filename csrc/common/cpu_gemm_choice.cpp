#include "common/cpu_gemm_choice.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <mutex>

namespace torchkiln {
namespace {

std::mutex choice_mutex;
std::optional<bool> choice_bf16, choice_fp16;

std::optional<bool>& slot(at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kHalf,
                    "cpu_gemm_prefers_fp32: dtype must be bfloat16 or float16, got ", dtype);
  return dtype == at::kBFloat16 ? choice_bf16 : choice_fp16;
}

// Best of three after a warm-up call: the first call of a dtype also pays
// for ATen's kernel selection (oneDNN primitive creation for bf16).
double best_mm_seconds(const at::Tensor& a, const at::Tensor& b) {
  at::mm(a, b);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm(a, b);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

bool measure_prefers_fp32(at::ScalarType dtype) {
  // Not part of any caller's autograd graph; no RNG (the caller's random
  // stream stays untouched): a ramp of values has no zeros or denormals.
  const c10::InferenceMode guard;
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::linspace(-1.0, 1.0, 128 * 1024, fp32).view({128, 1024});
  const at::Tensor b = at::linspace(1.0, -1.0, 1024 * 1024, fp32).view({1024, 1024}).t();
  const double t_fp32 = best_mm_seconds(a, b);
  const double t_low = best_mm_seconds(a.to(dtype), b.to(dtype));
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
