// The CUDA runtime calls the kernels' launchers make, answered by the
// emulator (tests/cuda_emulation/cuda_shim.h) instead of libcudart.
#define TORCHKILN_EMULATE_CUDA 1
#include "cuda_shim.h"

#include <cstdlib>

extern "C" {

static std::string reported;  // the error cudaGetLastError last returned (and cleared)

cudaError_t cudaGetLastError(void) {
  if (emu::last_error.empty()) return cudaSuccess;
  reported = emu::last_error;
  emu::last_error.clear();
  return cudaErrorInvalidConfiguration;
}

const char* cudaGetErrorString(cudaError_t) { return reported.c_str(); }

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) emu::max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// TK_EMU_SMS sets the SM count kernels plan with (an H200 has 132).
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = 0;
  if (attr == cudaDevAttrMultiProcessorCount) {
    const char* sms = std::getenv("TK_EMU_SMS");
    *value = sms != nullptr ? std::atoi(sms) : 132;
  }
  return cudaSuccess;
}

}  // extern "C"
