// The pybind11 surface of torchkiln._C: objects and queries that are not
// tensor ops. (Ops register through TORCH_LIBRARY and never pass through here.)
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>  // at::Tensor <-> torch.Tensor for the comm engine

#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/cpu/compute_peak.h"
#include "common/cpu_gemm_choice.h"
#include "common/cpu_isa.h"
#include "common/op_checks.h"
#include "common/parallel.h"
#include "comm/bucket_pack.h"
#include "comm/bucket_plan.h"
#include "comm/overlap_engine.h"
#include "paged/block_allocator.h"
#include "quant/gemm_choice.h"

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

at::ScalarType gemm_dtype(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  throw std::invalid_argument("dtype must be 'bfloat16' or 'float16', got '" + name + "'");
}
at::ScalarType quant_gemm_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16" || name == "float16") return gemm_dtype(name);
  throw std::invalid_argument("dtype must be 'bfloat16', 'float16' or 'float32', got '" + name + "'");
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

// Arithmetic ceilings of the CPU with every thread of torch's pool busy (the
// clock of one busy core is higher): each thread times its own loops for
// `seconds`, the rates add up. GFLOP/s, 0 where the active ISA has no such
// instruction.
py::dict measure_compute_peak(double seconds) {
  if (!(seconds > 0.0 && seconds <= 10.0)) throw std::invalid_argument("seconds must lie in (0, 10]");
  const int threads = torchkiln::num_threads();
  std::vector<torchkiln::ComputePeak> each(static_cast<size_t>(threads));
  {
    py::gil_scoped_release no_gil;
    torchkiln::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) TK_CPU_DISPATCH(measure_compute_peak, seconds, &each[i]);
    });
  }
  double fma = 0.0, dot = 0.0;
  for (const auto& e : each) fma += e.fp32_fma, dot += e.bf16_dot;
  py::dict d;
  d["threads"] = threads;
  d["isa"] = torchkiln::cpu_isa_name(torchkiln::active_cpu_isa());
  d["fp32_fma_gflops"] = fma / 1e9;
  d["bf16_dot_gflops"] = dot / 1e9;
  return d;
}

// Token ids from any Python sequence of ints, without pybind11's per-element
// caster overhead (match_prefix sees thousands per call).
std::vector<int64_t> token_ids(py::handle seq) {
  PyObject* fast = PySequence_Fast(seq.ptr(), "token_ids must be a sequence of ints");
  if (fast == nullptr) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      throw py::error_already_set();
    }
  }
  Py_DECREF(fast);
  return out;
}

void bind_block_allocator(py::module_& m) {
  using torchkiln::BlockAllocator;
  py::class_<BlockAllocator>(m, "BlockAllocator", "C++ core of torchkiln.memory.BlockAllocator")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching"))
      .def("try_allocate",
           [](BlockAllocator& a, int64_t n) -> py::object {
             std::vector<int32_t> out;
             if (!a.allocate(n, &out)) return py::none();
             return py::cast(out);
           })
      .def("free", &BlockAllocator::free)
      .def("fork", &BlockAllocator::fork)
      .def("try_copy_on_write",
           [](BlockAllocator& a, int32_t block) -> py::object {
             std::pair<int32_t, int32_t> out;
             if (!a.copy_on_write(block, &out)) return py::none();
             return py::make_tuple(out.first, out.second);
           })
      .def("match_prefix",
           [](BlockAllocator& a, py::handle tokens, uint64_t extra) {
             const std::vector<int64_t> t = token_ids(tokens);
             return a.match_prefix(t.data(), static_cast<int64_t>(t.size()), extra);
           })
      .def("commit",
           [](BlockAllocator& a, const std::vector<int32_t>& blocks, py::handle tokens, uint64_t extra) {
             const std::vector<int64_t> t = token_ids(tokens);
             a.commit(blocks, t.data(), static_cast<int64_t>(t.size()), extra);
           })
      .def("reset_prefix_cache", &BlockAllocator::reset_prefix_cache)
      .def("ref_count", &BlockAllocator::ref_count)
      .def("is_cached", &BlockAllocator::is_cached)
      .def("free_order", &BlockAllocator::free_order)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_cached", &BlockAllocator::num_cached)
      .def_property_readonly("prefix_caching", &BlockAllocator::prefix_caching)
      .def("stats", [](const BlockAllocator& a) {
        const auto& s = a.stats();
        py::dict d;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["evictions"] = s.evictions;
        return d;
      });
}

}  // namespace

// Direct entry to the bucket pack / unpack kernels (tests and benchmarks;
// the engine calls them itself). CPU tensors only.
torchkiln::BucketPackParams pack_params(const std::vector<std::optional<at::Tensor>>& grads,
                                        const std::vector<int64_t>& offsets, const std::vector<int64_t>& numels,
                                        const at::Tensor& bucket, std::vector<torchkiln::PackSegment>& segments) {
  using namespace torchkiln;
  TORCH_CHECK_VALUE(grads.size() == offsets.size() && grads.size() == numels.size(),
                    "grads, offsets and numels must have the same length");
  TORCH_CHECK_VALUE(bucket.is_cpu() && bucket.dim() == 1 && bucket.is_contiguous(),
                    "bucket must be a contiguous 1-D CPU tensor");
  std::optional<at::ScalarType> dtype;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t numel = numels[i];
    void* data = nullptr;
    if (grads[i]) {
      const at::Tensor& g = *grads[i];
      TORCH_CHECK_VALUE(g.is_cpu() && g.is_contiguous() && g.numel() == numel, "grads[", i,
                        "] must be a contiguous CPU tensor of numels[", i, "] elements");
      TORCH_CHECK_TYPE(!dtype || *dtype == g.scalar_type(), "grads must share one dtype");
      dtype = g.scalar_type();
      data = g.data_ptr();
    }
    TORCH_CHECK_VALUE(numel >= 0 && offsets[i] >= 0 && offsets[i] + numel <= bucket.numel(), "grads[", i,
                      "] does not fit the bucket at offset ", offsets[i]);
    segments.push_back({data, numel, offsets[i]});
  }
  BucketPackParams p;
  p.segments = segments.data();
  p.num_segments = static_cast<int64_t>(segments.size());
  p.segment_dtype = kernel_dtype(at::empty({0}, bucket.options().dtype(dtype.value_or(at::kFloat))), "pack",
                                 "grads");
  p.bucket = bucket.data_ptr();
  p.bucket_dtype = kernel_dtype(bucket, "pack", "bucket");
  return p;
}

void bind_comm(py::module_& m) {
  m.def(
      "pack_gradients",
      [](const std::vector<std::optional<at::Tensor>>& grads, const std::vector<int64_t>& offsets,
         const std::vector<int64_t>& numels, const at::Tensor& bucket, double scale,
         const std::optional<at::Tensor>& residual) {
        std::vector<torchkiln::PackSegment> segments;
        torchkiln::BucketPackParams p = pack_params(grads, offsets, numels, bucket, segments);
        p.scale = static_cast<float>(scale);
        if (residual) {
          TORCH_CHECK_VALUE(residual->scalar_type() == at::kFloat && residual->sizes() == bucket.sizes() &&
                                residual->is_contiguous() && residual->is_cpu(),
                            "residual must be a contiguous fp32 CPU tensor shaped like bucket");
          p.residual = residual->data_ptr<float>();
        }
        TK_CPU_DISPATCH(bucket_pack, p);
      },
      py::arg("grads"), py::arg("offsets"), py::arg("numels"), py::arg("bucket"), py::arg("scale"),
      py::arg("residual"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "unpack_gradients",
      [](const at::Tensor& bucket, const std::vector<int64_t>& offsets, const std::vector<at::Tensor>& grads) {
        std::vector<std::optional<at::Tensor>> g(grads.begin(), grads.end());
        std::vector<int64_t> numels;
        for (const at::Tensor& t : grads) numels.push_back(t.numel());
        std::vector<torchkiln::PackSegment> segments;
        torchkiln::BucketPackParams p = pack_params(g, offsets, numels, bucket, segments);
        TK_CPU_DISPATCH(bucket_unpack, p);
      },
      py::arg("bucket"), py::arg("offsets"), py::arg("grads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "plan_buckets",
      [](const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>& params, int64_t cap_bytes,
         int64_t first_bytes) {
        std::vector<torchkiln::BucketParam> in;
        for (const auto& [numel, elem, dtype, device] : params) in.push_back({numel, elem, dtype, device});
        std::vector<std::vector<int64_t>> out;
        for (const auto& b : torchkiln::plan_buckets(in, cap_bytes, first_bytes)) out.push_back(b.params);
        return out;
      },
      py::arg("params"), py::arg("bucket_cap_bytes"), py::arg("first_bucket_bytes"),
      "Bucket assignment: params as (numel, element_size, dtype_id, device_id) in registration order; "
      "returns the parameter indices of each bucket in launch order.");
  using torchkiln::OverlapEngine;
  py::class_<OverlapEngine>(m, "OverlapEngine", "C++ core of torchkiln.distributed.OverlappedDataParallel")
      .def(py::init<std::vector<at::Tensor>, const std::vector<std::vector<int64_t>>&, const std::string&,
                    std::optional<at::ScalarType>, bool>(),
           py::arg("params"), py::arg("buckets"), py::arg("group_name"), py::arg("comm_dtype"),
           py::arg("grads_as_views"))
      .def("prepare", &OverlapEngine::prepare, py::call_guard<py::gil_scoped_release>())
      // Without the GIL: Gloo's worker thread may need it (to drop Python
      // objects captured in a finished work's thread-local state) while it
      // holds the work-queue lock that enqueueing our all-reduce takes.
      .def("mark_ready", &OverlapEngine::mark_ready, py::call_guard<py::gil_scoped_release>())
      .def("finalize", &OverlapEngine::finalize, py::arg("allow_unused"), py::call_guard<py::gil_scoped_release>())
      .def("timeline", &OverlapEngine::timeline)
      .def("bucket_buffers", &OverlapEngine::bucket_buffers)
      .def_property_readonly("num_buckets", &OverlapEngine::num_buckets)
      .def_property_readonly("world_size", &OverlapEngine::world_size);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchkiln native module: custom ops (torch.ops.torchkiln) and runtime queries";
  m.def("cpu_info", &cpu_info, "CPU code path detected and in use, and torch's intra-op thread count.");
  m.def("build_info", &build_info, "How this extension was built: torch version, CUDA, archs, compiler.");
  m.def("measure_compute_peak", &measure_compute_peak, py::arg("seconds") = 0.2,
        "Measured fp32 FMA and bf16 dot-product GFLOP/s of the CPU, all of torch's threads busy.");
  m.def("parallel_thread_count", &parallel_thread_count, py::arg("items"),
        "Distinct threads that CPU kernels' parallel_for uses for `items` tasks (a test probe).");
  m.def(
      "cpu_gemm_prefers_fp32",
      [](const std::string& dtype) { return torchkiln::cpu_gemm_prefers_fp32(gemm_dtype(dtype)); },
      py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
      "Whether ATen's fp32 CPU GEMM beats its GEMM in dtype ('bfloat16', 'float16') here (measured once).");
  m.def(
      "override_cpu_gemm_choice",
      [](const std::string& dtype, std::optional<bool> prefers_fp32) {
        torchkiln::override_cpu_gemm_choice(gemm_dtype(dtype), prefers_fp32);
      },
      py::arg("dtype"), py::arg("prefers_fp32"),
      "Tests: force cpu_gemm_prefers_fp32's answer for dtype (None: measure again).");
  m.def(
      "cpu_quant_gemm_wins",
      [](const std::string& dtype) { return torchkiln::cpu_quant_gemm_wins(quant_gemm_dtype(dtype)); },
      py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
      "Whether the quantised GEMM for many rows beats ATen's GEMM on a dense weight here (AVX512_BF16 CPUs; "
      "measured once).");
  m.def(
      "override_cpu_quant_gemm_choice",
      [](const std::string& dtype, std::optional<bool> wins) {
        torchkiln::override_cpu_quant_gemm_choice(quant_gemm_dtype(dtype), wins);
      },
      py::arg("dtype"), py::arg("wins"), "Tests: force cpu_quant_gemm_wins's answer for dtype (None: measure again).");
  bind_block_allocator(m);
  bind_comm(m);
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Select the CPU kernel path ('avx512bf16', 'avx512', 'avx2', 'scalar'); ValueError if this CPU lacks it.");
}
