// Element types the kernels understand, without any torch type.
// Kernels receive raw pointers plus a DType and switch once, outside loops.
#pragma once
#include <cstdint>

namespace torchkiln {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Storage-only 16-bit types for CPU kernels. Arithmetic always happens in fp32
// after widening (see common/cpu/vec.h); these only name the bit layout.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

}  // namespace torchkiln
