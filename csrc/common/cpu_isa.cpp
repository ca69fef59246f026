#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace torchkiln {
namespace {

// __builtin_cpu_supports checks CPUID and, for AVX/AVX-512, that the OS saves
// the wider registers (XGETBV), so a "yes" here means the code can run.
CpuIsa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    // Every CPU with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) also
    // has AVX512_VNNI; the level requires both.
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")
               ? CpuIsa::kAvx512Bf16
               : CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return CpuIsa::kAvx2;
  }
  return CpuIsa::kScalar;
}

std::atomic<int> g_active{-1};
std::string g_rejected;
std::once_flag g_init;

void init_from_env() {
  CpuIsa isa = detected_cpu_isa();
  if (const char* env = std::getenv("TORCHKILN_CPU_ISA"); env && *env) {
    CpuIsa wanted;
    if (parse_cpu_isa(env, &wanted) && static_cast<int>(wanted) <= static_cast<int>(isa)) {
      isa = wanted;
    } else {
      g_rejected = env;
    }
  }
  int expected = -1;
  g_active.compare_exchange_strong(expected, static_cast<int>(isa));
}

}  // namespace

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa active_cpu_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    std::call_once(g_init, init_from_env);
    v = g_active.load();
  }
  return static_cast<CpuIsa>(v);
}

void set_active_cpu_isa(CpuIsa isa) {
  std::call_once(g_init, init_from_env);
  if (static_cast<int>(isa) > static_cast<int>(detected_cpu_isa())) {
    throw std::invalid_argument(std::string("this CPU cannot run the '") + cpu_isa_name(isa) +
                                "' code path (best available: '" +
                                cpu_isa_name(detected_cpu_isa()) + "')");
  }
  g_active.store(static_cast<int>(isa));
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool parse_cpu_isa(const char* name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (std::strcmp(name, cpu_isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

const char* rejected_cpu_isa_request() {
  std::call_once(g_init, init_from_env);
  return g_rejected.empty() ? nullptr : g_rejected.c_str();
}

}  // namespace torchkiln
