// Which CPU code path the kernels use. Every kernel under csrc/*/cpu/ is
// compiled once per ISA (see CMakeLists.txt); this picks one copy at run time.
// The levels are ordered, each a superset of the one before:
//   scalar      any x86-64 (the compiler may still use SSE2)
//   avx2        AVX2 + FMA + F16C (Haswell, Zen 1 and later)
//   avx512      AVX-512 F/BW/VL/DQ (Skylake-SP, Ice Lake, ...)
//   avx512bf16  + AVX512_BF16 and AVX512_VNNI: one-instruction fp32 -> bf16
//               rounding (much of the work of memory-bound bf16 kernels),
//               bf16 dot products and int8 dot products (Zen 4, Sapphire
//               Rapids, Cooper Lake)
//   detected: the best level this CPU and OS support (CPUID + XGETBV, once).
//   active:   what kernels run; defaults to detected, or to TORCHKILN_CPU_ISA
//             when set, and can be changed by tests.
#pragma once

namespace torchkiln {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

CpuIsa detected_cpu_isa();
CpuIsa active_cpu_isa();
// Throws std::invalid_argument when the CPU cannot run `isa`.
void set_active_cpu_isa(CpuIsa isa);
const char* cpu_isa_name(CpuIsa isa);
// Returns false for an unknown name.
bool parse_cpu_isa(const char* name, CpuIsa* out);
// The TORCHKILN_CPU_ISA value that was ignored because the CPU cannot run it,
// or nullptr. Reported by torchkiln.info() so a silent fallback is visible.
const char* rejected_cpu_isa_request();

}  // namespace torchkiln

// Declares `ret name(args)` in each per-ISA namespace. Use in a kernel header.
#define TK_DECLARE_CPU_KERNEL(ret, name, ...)                \
  namespace cpu_scalar { ret name(__VA_ARGS__); }           \
  namespace cpu_avx2 { ret name(__VA_ARGS__); }             \
  namespace cpu_avx512 { ret name(__VA_ARGS__); }           \
  namespace cpu_avx512bf16 { ret name(__VA_ARGS__); }

// Calls the copy of `name` for the active ISA (inside namespace torchkiln).
#define TK_CPU_DISPATCH(name, ...)                                    \
  do {                                                                \
    switch (::torchkiln::active_cpu_isa()) {                          \
      case ::torchkiln::CpuIsa::kAvx512Bf16:                          \
        ::torchkiln::cpu_avx512bf16::name(__VA_ARGS__);               \
        break;                                                        \
      case ::torchkiln::CpuIsa::kAvx512:                              \
        ::torchkiln::cpu_avx512::name(__VA_ARGS__);                   \
        break;                                                        \
      case ::torchkiln::CpuIsa::kAvx2:                                \
        ::torchkiln::cpu_avx2::name(__VA_ARGS__);                     \
        break;                                                        \
      default:                                                        \
        ::torchkiln::cpu_scalar::name(__VA_ARGS__);                   \
        break;                                                        \
    }                                                                 \
  } while (0)
