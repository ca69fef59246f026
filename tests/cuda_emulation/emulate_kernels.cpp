// Runs torchkiln's CUDA attention kernels (their real source) under the host
// emulator of cuda_shim.h. Driven by tests/cuda_emulation/test_emulated_kernels.py:
//   emulate_kernels DIR
// DIR/config holds "key value" lines; DIR/<name>.bin raw little-endian arrays
// (float32 data, int32 indices). Writes DIR/out.bin, lse.bin and, for a
// backward, dq.bin, dk.bin, dv.bin (float32), with the layouts of the op glue:
// fixed (batch, seq, heads, D) or varlen (tokens, heads, D), contiguous.
#define TORCHKILN_EMULATE_CUDA 1
#include "cuda_shim.h"

#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

#include "attention/cuda/flash_bwd.cuh"
#include "attention/cuda/flash_fwd.cuh"
#include "paged/cuda/paged_attention.cu"

namespace {

using namespace torchkiln;
std::string dir;
std::map<std::string, double> config;

int64_t cfg(const char* key) {
  auto it = config.find(key);
  if (it == config.end()) throw std::runtime_error(std::string("missing config key ") + key);
  return static_cast<int64_t>(it->second);
}

template <class E>
std::vector<E> read_array(const std::string& name) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f) throw std::runtime_error("missing " + name + ".bin");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<E> v(bytes.size() / sizeof(E));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(E));
  return v;
}

void write_floats(const std::string& name, const std::vector<float>& v) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
}

template <class T>
std::vector<T> to_dtype(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = cuda::from_float<T>(v[i]);
  return out;
}
template <class T>
std::vector<float> to_f32(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = cuda::to_float(v[i]);
  return out;
}

// (.., tokens, heads, D) contiguous view.
FlashAttnTensor view(const void* ptr, int64_t tokens, int64_t heads, int64_t d, bool varlen) {
  FlashAttnTensor t;
  t.ptr = ptr;
  t.batch_stride = varlen ? 0 : tokens * heads * d;
  t.row_stride = heads * d;
  t.head_stride = d;
  return t;
}
FlashAttnOutput out_view(void* ptr, int64_t tokens, int64_t heads, int64_t d, bool varlen) {
  const FlashAttnTensor v = view(ptr, tokens, heads, d, varlen);
  FlashAttnOutput o;
  o.ptr = ptr;
  o.batch_stride = v.batch_stride;
  o.row_stride = v.row_stride;
  o.head_stride = v.head_stride;
  return o;
}

template <class T, int D>
void run_flash() {
  const int64_t batch = cfg("batch"), sq = cfg("seqlen_q"), sk = cfg("seqlen_k"), heads = cfg("heads"),
                heads_k = cfg("heads_k");
  const bool varlen = cfg("varlen") != 0, paged = cfg("block_size") > 0, backward = cfg("backward") != 0;
  // Token counts of the tensors as stored: fixed batches store seqlen per entry.
  const int64_t q_tokens = varlen ? cfg("total_q") : sq, k_tokens = varlen ? cfg("total_k") : sk;
  std::vector<T> q = to_dtype<T>(read_array<float>("q")), k = to_dtype<T>(read_array<float>("k")),
                 v = to_dtype<T>(read_array<float>("v"));
  std::vector<int32_t> cu_q, cu_k, table;
  std::vector<float> alibi;

  FlashAttnParams p;
  p.q = view(q.data(), q_tokens, heads, D, varlen);
  p.k = view(k.data(), k_tokens, heads_k, D, varlen);
  p.v = view(v.data(), k_tokens, heads_k, D, varlen);
  p.batch = batch;
  p.seqlen_q = sq;
  p.seqlen_k = sk;
  p.heads = heads;
  p.heads_k = heads_k;
  p.head_dim = D;
  p.scale = static_cast<float>(config["scale"]);
  p.softcap = static_cast<float>(config["softcap"]);
  p.window_left = cfg("window_left");
  p.window_right = cfg("window_right");
  p.dtype = std::is_same_v<T, __nv_bfloat16> ? DType::kBFloat16 : DType::kFloat16;
  if (cfg("alibi") != 0) {
    alibi = read_array<float>("alibi");
    p.alibi_slopes = alibi.data();
    p.alibi_batch_stride = static_cast<int64_t>(alibi.size()) == heads ? 0 : heads;
  }
  if (varlen) {
    cu_q = read_array<int32_t>("cu_q");
    cu_k = read_array<int32_t>("cu_k");
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  }
  if (paged) {  // k / v are (num_blocks, block_size, heads_k, D) caches
    table = read_array<int32_t>("block_table");
    p.block_table = table.data();
    p.block_size = cfg("block_size");
    p.block_table_stride = static_cast<int64_t>(table.size()) / batch;
    p.k.batch_stride = p.v.batch_stride = p.block_size * heads_k * D;
  }
  const int64_t q_elems = static_cast<int64_t>(q.size());
  std::vector<T> out(q_elems, cuda::from_float<T>(NAN));  // poisoned
  const int64_t lse_size = varlen ? heads * q_tokens : batch * heads * sq;
  std::vector<float> lse(lse_size, NAN);
  p.out = out_view(out.data(), q_tokens, heads, D, varlen);
  p.lse = lse.data();
  p.lse_batch_stride = varlen ? 0 : heads * sq;
  p.lse_head_stride = varlen ? q_tokens : sq;

  using FC = flash::FwdConfig<D>;
  const dim3 fwd_grid((sq + FC::kBlockM - 1) / FC::kBlockM, heads, batch);
  emu::launch(fwd_grid, dim3(FC::kThreads), [&] { flash::flash_fwd_kernel<T, D>(p); });
  write_floats("out", to_f32(out));
  write_floats("lse", lse);
  if (!backward) return;

  std::vector<T> dout = to_dtype<T>(read_array<float>("dout"));
  std::vector<T> dq(q_elems, cuda::from_float<T>(NAN)), dk(k.size(), cuda::from_float<T>(NAN)),
      dv(v.size(), cuda::from_float<T>(NAN));
  std::vector<float> dsum(lse_size, NAN);
  FlashAttnBwdParams bp;
  bp.fwd = p;
  bp.fwd.out = out_view(out.data(), q_tokens, heads, D, varlen);
  bp.dout = view(dout.data(), q_tokens, heads, D, varlen);
  bp.dq = out_view(dq.data(), q_tokens, heads, D, varlen);
  bp.dk = out_view(dk.data(), k_tokens, heads_k, D, varlen);
  bp.dv = out_view(dv.data(), k_tokens, heads_k, D, varlen);
  bp.dsum = dsum.data();
  using BC = flash::BwdConfig<D>;
  emu::launch(dim3((sq + 7) / 8, heads, batch), dim3(256), [&] { flash::flash_bwd_dsum_kernel<T>(bp); });
  emu::launch(dim3((sk + BC::kBlockKeys - 1) / BC::kBlockKeys, heads_k, batch), dim3(BC::kThreads),
              [&] { flash::flash_bwd_dkdv_kernel<T, D>(bp); });
  emu::launch(dim3((sq + BC::kBlockQueries - 1) / BC::kBlockQueries, heads, batch), dim3(BC::kThreads),
              [&] { flash::flash_bwd_dq_kernel<T, D>(bp); });
  write_floats("dq", to_f32(dq));
  write_floats("dk", to_f32(dk));
  write_floats("dv", to_f32(dv));
}

template <class T>
void run_paged_decode() {
  const int64_t seqs = cfg("num_seqs"), heads = cfg("heads"), heads_k = cfg("heads_k"), D = cfg("head_dim");
  const int64_t block_size = cfg("block_size");
  std::vector<T> q = to_dtype<T>(read_array<float>("q")), kc = to_dtype<T>(read_array<float>("k")),
                 vc = to_dtype<T>(read_array<float>("v"));
  std::vector<int32_t> table = read_array<int32_t>("block_table"), lens = read_array<int32_t>("seq_lens");
  std::vector<float> alibi;
  PagedAttnParams p;
  p.q = q.data();
  p.q_seq_stride = heads * D;
  p.q_head_stride = D;
  p.key_cache = kc.data();
  p.value_cache = vc.data();
  p.cache.num_blocks = static_cast<int64_t>(kc.size()) / (block_size * heads_k * D);
  p.cache.block_size = block_size;
  p.cache.heads_k = heads_k;
  p.cache.head_dim = D;
  p.cache.block_stride = block_size * heads_k * D;
  p.cache.pos_stride = heads_k * D;
  p.cache.head_stride = D;
  p.block_table = table.data();
  p.block_table_stride = static_cast<int64_t>(table.size()) / seqs;
  p.seq_lens = lens.data();
  p.num_seqs = seqs;
  p.heads = heads;
  p.max_seq_len = *std::max_element(lens.begin(), lens.end());
  p.scale = static_cast<float>(config["scale"]);
  p.softcap = static_cast<float>(config["softcap"]);
  p.window_left = cfg("window_left");
  p.window_right = -1;
  if (cfg("alibi") != 0) {
    alibi = read_array<float>("alibi");
    p.alibi_slopes = alibi.data();
  }
  std::vector<T> out(q.size(), cuda::from_float<T>(NAN));
  std::vector<float> lse(seqs * heads, NAN);
  p.out = out.data();
  p.lse = lse.data();
  p.split_chunk = cfg("split_chunk");
  p.num_splits = (p.max_seq_len + p.split_chunk - 1) / p.split_chunk;
  std::vector<float> partial_out(seqs * heads * p.num_splits * D, NAN), partial_lse(seqs * heads * p.num_splits, NAN);
  p.partial_out = partial_out.data();
  p.partial_lse = partial_lse.data();
  const int gb = group_blocks(p);
  emu::launch(dim3(seqs, heads_k * gb, p.num_splits), dim3(kThreads), [&] { paged_decode_kernel<T>(p, gb); });
  if (p.num_splits > 1)
    emu::launch(dim3(seqs, heads), dim3(128), [&] { paged_combine_kernel<T>(p); });
  write_floats("out", to_f32(out));
  write_floats("lse", lse);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  dir = argv[1];
  std::ifstream f(dir + "/config");
  std::string key;
  double value;
  while (f >> key >> value) config[key] = value;
  try {
    const int64_t dtype = cfg("dtype"), d = cfg("head_dim");
    if (cfg("paged_decode") != 0) {
      if (dtype == 0) run_paged_decode<float>();
      else if (dtype == 1) run_paged_decode<__nv_bfloat16>();
      else run_paged_decode<__half>();
      return 0;
    }
    auto by_dim = [&](auto tag) {
      using T = decltype(tag);
      switch (d) {
        case 64: run_flash<T, 64>(); break;
        case 96: run_flash<T, 96>(); break;
        case 128: run_flash<T, 128>(); break;
        case 256: run_flash<T, 256>(); break;
        default: throw std::runtime_error("no kernel for head_dim " + std::to_string(d));
      }
    };
    if (dtype == 1) by_dim(__nv_bfloat16{});
    else by_dim(__half{});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
