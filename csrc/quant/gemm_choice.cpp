#include "quant/gemm_choice.h"

#include <c10/core/InferenceMode.h>

#include <mutex>

#include "common/best_time.h"
#include "common/cpu_isa.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

std::mutex choice_mutex;
// [with AVX512_BF16][bf16 x]: the AVX-512 levels compile the fp32 GEMM
// apart (and only AVX512_BF16 has the bf16 one); tests switch levels.
std::optional<bool> choices[2][2];

std::optional<bool>& slot(at::ScalarType dtype, CpuIsa isa) {
  TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                    "cpu_quant_gemm_wins: dtype must be bfloat16, float16 or float32, got ", dtype);
  return choices[isa == CpuIsa::kAvx512Bf16][dtype == at::kBFloat16];
}

bool measure(at::ScalarType dtype) {
  // No RNG (the caller's random stream stays untouched) and no autograd.
  const c10::InferenceMode guard;
  constexpr int64_t m = 192, k = 1024, n = 512;
  const at::ScalarType xt = dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const auto fp32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::linspace(-1.0, 1.0, m * k, fp32).view({m, k}).to(xt);
  const at::Tensor codes = at::arange(n * k, fp32).remainder(255.0).sub(127.0).view({n, k});
  const at::Tensor qweight = codes.to(at::kChar);
  const at::Tensor scales = at::full({n, 1}, 0.01, fp32);
  const at::Tensor dense = codes.mul(0.01).to(xt);
  at::Tensor out = at::empty({m, n}, x.options());

  WeightOnlyParams p;
  p.format = WeightFormat::kInt8;
  p.x = x.data_ptr();
  p.x_row_stride = k;
  p.qweight = reinterpret_cast<const uint8_t*>(qweight.data_ptr<int8_t>());
  p.qweight_row_stride = k;
  p.scales = scales.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_row_stride = n;
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = k;
  p.dtype = xt == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
  const double ours = best_call_seconds([&] { TK_CPU_DISPATCH(weight_only_gemm, p); });
  const double aten = best_call_seconds([&] { at::mm(x, dense.t()); });
  return aten * 2.0 > ours;
}

}  // namespace

bool cpu_quant_gemm_wins(at::ScalarType dtype) {
  const std::lock_guard<std::mutex> lock(choice_mutex);
  const CpuIsa isa = active_cpu_isa();
  // The kernel needs AVX-512, and AVX512_BF16 for bf16 x (a forced ISA level, or the CPU's own).
  if (isa != CpuIsa::kAvx512Bf16 && (isa != CpuIsa::kAvx512 || dtype == at::kBFloat16)) return false;
  std::optional<bool>& s = slot(dtype, isa);
  if (s) return *s;
  s = measure(dtype);
  return *s;
}

void override_cpu_quant_gemm_choice(at::ScalarType dtype, std::optional<bool> wins) {
  const std::lock_guard<std::mutex> lock(choice_mutex);
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) slot(dtype, isa) = wins;
}

}  // namespace torchkiln
