// The pybind11 surface of torchkiln._C: objects and queries that are not
// tensor ops. (Ops register through TORCH_LIBRARY and never pass through here.)
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/cpu_isa.h"
#include "common/parallel.h"

namespace py = pybind11;

namespace {

py::dict cpu_info() {
  using namespace torchkiln;
  py::dict d;
  d["detected_isa"] = cpu_isa_name(detected_cpu_isa());
  d["active_isa"] = cpu_isa_name(active_cpu_isa());
  const char* rejected = rejected_cpu_isa_request();
  d["rejected_isa_request"] = rejected ? py::object(py::str(rejected)) : py::object(py::none());
  d["num_threads"] = at::get_num_threads();
  return d;
}

py::dict build_info() {
  py::dict d;
  d["torch_version"] = TORCHKILN_TORCH_VERSION;
  d["compiler"] = TORCHKILN_CXX_COMPILER;
  d["cpu_isas"] = py::make_tuple("scalar", "avx2", "avx512", "avx512bf16");
#ifdef TORCHKILN_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = TORCHKILN_CUDA_VERSION;
  d["cuda_archs"] = TORCHKILN_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::none();
#endif
  return d;
}

void set_cpu_isa(const std::string& name) {
  torchkiln::CpuIsa isa;
  if (!torchkiln::parse_cpu_isa(name.c_str(), &isa))
    throw std::invalid_argument("unknown CPU ISA '" + name + "': expected avx512bf16, avx512, avx2 or scalar");
  torchkiln::set_active_cpu_isa(isa);  // throws std::invalid_argument if unsupported
}

// How many distinct threads torchkiln's parallel_for (the path every CPU
// kernel takes) runs `items` single-item tasks on: proves kernels really use
// torch's intra-op pool.
int parallel_thread_count(int64_t items) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  torchkiln::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int>(ids.size());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchkiln native module: custom ops (torch.ops.torchkiln) and runtime queries";
  m.def("cpu_info", &cpu_info, "CPU code path detected and in use, and torch's intra-op thread count.");
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA, archs, compiler.");
  m.def("parallel_thread_count", &parallel_thread_count, py::arg("items"),
        "Distinct threads that CPU kernels' parallel_for uses for `items` tasks (a test probe).");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Select the CPU kernel path ('avx512bf16', 'avx512', 'avx2', 'scalar'); ValueError if this CPU lacks it.");
}
