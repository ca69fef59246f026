// Registers one family's implementations for every device the build has.
// The glue functions are device-generic (TK_LAUNCH picks the kernel), so the
// same list serves the CPU and CUDA dispatch keys.
#pragma once
#include <torch/library.h>

#ifdef TORCHKILN_WITH_CUDA
#define TK_REGISTER_IMPLS(register_fn)                         \
  TORCH_LIBRARY_IMPL(torchkiln, CPU, m) { register_fn(m); }    \
  TORCH_LIBRARY_IMPL(torchkiln, CUDA, m) { register_fn(m); }
#else
#define TK_REGISTER_IMPLS(register_fn) \
  TORCH_LIBRARY_IMPL(torchkiln, CPU, m) { register_fn(m); }
#endif
