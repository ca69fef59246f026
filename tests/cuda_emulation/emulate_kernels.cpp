// Runs torchkiln's CUDA kernels (every csrc/*/cuda/*.cu, compiled for the
// host and linked in) through their public launchers under the emulator of
// cuda_shim.h. Driven by tests/cuda_emulation/test_emulated_kernels.py:
//   emulate_kernels DIR
// DIR/config holds "key value" lines, `op` choosing the kernel family;
// DIR/<name>.bin are raw little-endian input arrays (float32 data, int32 /
// int64 / uint8 as the op needs). Outputs are written as float32 .bin files
// with the layouts of the op glue (contiguous).
#define TORCHKILN_EMULATE_CUDA 1
#include "cuda_shim.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

#include "activation/silu_and_mul.h"
#include "attention/flash_attn.h"
#include "comm/bucket_pack.h"
#include "common/cuda/cuda_helpers.cuh"
#include "norm/rms_norm.h"
#include "paged/paged_attention.h"
#include "quant/quant_matmul.h"
#include "rope/rotary.h"

namespace {

using namespace torchkiln;
std::string dir;
std::map<std::string, double> config;

int64_t cfg(const char* key) {
  auto it = config.find(key);
  if (it == config.end()) throw std::runtime_error(std::string("missing config key ") + key);
  return static_cast<int64_t>(it->second);
}
int64_t cfg_or(const char* key, int64_t fallback) { return config.count(key) ? cfg(key) : fallback; }

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

// `guard` NaN elements, the values, `guard` NaN elements.
template <class T>
std::vector<T> guarded(const std::vector<float>& values, int64_t guard) {
  std::vector<T> out(values.size() + 2 * guard, cuda::from_float<T>(NAN));
  for (size_t i = 0; i < values.size(); ++i) out[guard + i] = cuda::from_float<T>(values[i]);
  return out;
}
// The values between `guard` elements at each end, and whether those guards
// are still NaN (nothing wrote outside the values).
template <class T>
std::vector<T> unguarded(const std::vector<T>& v, int64_t guard) {
  return std::vector<T>(v.begin() + guard, v.end() - guard);
}
template <class T>
bool guards_intact(const std::vector<T>& v, int64_t guard) {
  for (int64_t i = 0; i < guard; ++i)
    if (!std::isnan(cuda::to_float(v[i])) || !std::isnan(cuda::to_float(v[v.size() - 1 - i]))) return false;
  return true;
}

template <class T, int D>
void run_flash() {
  const int64_t batch = cfg("batch"), sq = cfg("seqlen_q"), sk = cfg("seqlen_k"), heads = cfg("heads"),
                heads_k = cfg("heads_k");
  const bool varlen = cfg("varlen") != 0, paged = cfg("block_size") > 0, backward = cfg("backward") != 0;
  // Token counts of the tensors as stored: fixed batches store seqlen per entry.
  const int64_t q_tokens = varlen ? cfg("total_q") : sq, k_tokens = varlen ? cfg("total_k") : sk;
  // `guard` NaN tokens (blocks of a paged cache) on each side of every input
  // and output: a read outside shows as NaN, a write outside as a lost guard.
  const int64_t guard = cfg_or("guard", 0), q_guard = guard * heads * D,
                kv_guard = guard * (paged ? cfg("block_size") : 1) * heads_k * D, lse_guard = guard * heads;
  std::vector<T> q = guarded<T>(read_array<float>("q"), q_guard), k = guarded<T>(read_array<float>("k"), kv_guard),
                 v = guarded<T>(read_array<float>("v"), kv_guard);
  std::vector<int32_t> cu_q, cu_k, table;
  std::vector<float> alibi;

  FlashAttnParams p;
  p.q = view(q.data() + q_guard, q_tokens, heads, D, varlen);
  p.k = view(k.data() + kv_guard, k_tokens, heads_k, D, varlen);
  p.v = view(v.data() + kv_guard, k_tokens, heads_k, D, varlen);
  p.batch = batch;
  p.seqlen_q = sq;
  p.seqlen_k = sk;
  p.total_q = varlen ? q_tokens : 0;
  p.total_k = varlen && !paged ? k_tokens : 0;
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
    p.block_table_stride = p.block_table_cols = static_cast<int64_t>(table.size()) / batch;
    p.k.batch_stride = p.v.batch_stride = p.block_size * heads_k * D;
    p.num_blocks = static_cast<int64_t>(k.size() - 2 * kv_guard) / p.k.batch_stride;
  }
  const int64_t q_elems = static_cast<int64_t>(q.size());  // guards included
  std::vector<T> out(q_elems, cuda::from_float<T>(NAN));    // poisoned
  const int64_t lse_size = varlen ? heads * q_tokens : batch * heads * sq;
  std::vector<float> lse(lse_size + 2 * lse_guard, NAN);
  p.out = out_view(out.data() + q_guard, q_tokens, heads, D, varlen);
  p.lse = lse.data() + lse_guard;
  p.lse_batch_stride = varlen ? 0 : heads * sq;
  p.lse_head_stride = varlen ? q_tokens : sq;
  std::vector<float> workspace(static_cast<size_t>(flash_attn_fwd_cuda_workspace(p)), NAN);
  if (!workspace.empty()) p.workspace = workspace.data();

  flash_attn_fwd_cuda(p, nullptr);
  write_floats("workspace", {static_cast<float>(workspace.size())});  // > 0: split decode
  write_floats("out", to_f32(unguarded(out, q_guard)));
  write_floats("lse", unguarded(lse, lse_guard));
  bool intact = guards_intact(out, q_guard) && guards_intact(lse, lse_guard);
  if (backward) {
    std::vector<T> dout = guarded<T>(read_array<float>("dout"), q_guard);
    std::vector<T> dq(q_elems, cuda::from_float<T>(NAN)), dk(k.size(), cuda::from_float<T>(NAN)),
        dv(v.size(), cuda::from_float<T>(NAN));
    std::vector<float> dsum(lse.size(), NAN);
    FlashAttnBwdParams bp;
    bp.fwd = p;
    bp.dout = view(dout.data() + q_guard, q_tokens, heads, D, varlen);
    bp.dq = out_view(dq.data() + q_guard, q_tokens, heads, D, varlen);
    bp.dk = out_view(dk.data() + kv_guard, k_tokens, heads_k, D, varlen);
    bp.dv = out_view(dv.data() + kv_guard, k_tokens, heads_k, D, varlen);
    bp.dsum = dsum.data() + lse_guard;
    flash_attn_bwd_cuda(bp, nullptr);
    write_floats("dq", to_f32(unguarded(dq, q_guard)));
    write_floats("dk", to_f32(unguarded(dk, kv_guard)));
    write_floats("dv", to_f32(unguarded(dv, kv_guard)));
    intact = intact && guards_intact(dq, q_guard) && guards_intact(dk, kv_guard) && guards_intact(dv, kv_guard) &&
             guards_intact(dsum, lse_guard);
  }
  write_floats("guards_intact", {intact ? 1.0f : 0.0f});
}

template <class T>
void run_paged_decode() {
  const int64_t seqs = cfg("num_seqs"), heads = cfg("heads"), heads_k = cfg("heads_k"), D = cfg("head_dim");
  const int64_t block_size = cfg("block_size");
  // guard_blocks NaN blocks on each side of the caches: a read outside them shows as NaN.
  const int64_t block_elems = block_size * heads_k * D, guard = cfg_or("guard_blocks", 0) * block_elems;
  std::vector<T> q = to_dtype<T>(read_array<float>("q")), kc = guarded<T>(read_array<float>("k"), guard),
                 vc = guarded<T>(read_array<float>("v"), guard);
  std::vector<int32_t> table = read_array<int32_t>("block_table"), lens = read_array<int32_t>("seq_lens");
  std::vector<float> alibi;
  PagedAttnParams p;
  p.q = q.data();
  p.q_seq_stride = heads * D;
  p.q_head_stride = D;
  p.key_cache = kc.data() + guard;
  p.value_cache = vc.data() + guard;
  p.cache.num_blocks = static_cast<int64_t>(kc.size() - 2 * guard) / block_elems;
  p.cache.block_size = block_size;
  p.cache.heads_k = heads_k;
  p.cache.head_dim = D;
  p.cache.block_stride = block_size * heads_k * D;
  p.cache.pos_stride = heads_k * D;
  p.cache.head_stride = D;
  p.block_table = table.data();
  p.block_table_stride = p.max_blocks = static_cast<int64_t>(table.size()) / seqs;
  p.seq_lens = lens.data();
  p.num_seqs = seqs;
  p.heads = heads;
  // The glue's plan: the longest sequence, or (graph capture) the table's capacity.
  p.max_seq_len = cfg_or("max_seq_len", *std::max_element(lens.begin(), lens.end()));
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
  p.out_seq_stride = heads * D;
  p.out_head_stride = D;
  p.lse_seq_stride = heads;
  p.lse_head_stride = 1;
  p.dtype = std::is_same_v<T, float> ? DType::kFloat32
            : std::is_same_v<T, __nv_bfloat16> ? DType::kBFloat16 : DType::kFloat16;
  paged_attention_cuda_plan(p);  // chunks from the SM count (TK_EMU_SMS)
  std::vector<float> partial_out(seqs * heads * p.num_splits * D, NAN), partial_lse(seqs * heads * p.num_splits, NAN);
  p.partial_out = partial_out.data();
  p.partial_lse = partial_lse.data();
  paged_attention_cuda(p, nullptr);
  write_floats("out", to_f32(out));
  write_floats("lse", lse);
  write_floats("num_splits", {static_cast<float>(p.num_splits)});
}

template <class T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return DType::kBFloat16;
  else return DType::kFloat16;
}

template <class T>
std::vector<T> poisoned(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n), cuda::from_float<T>(NAN));
}

template <class T>
void run_rms_norm() {
  const int64_t rows = cfg("rows"), hidden = cfg("hidden");
  const bool fused = cfg("fused") != 0, backward = cfg("backward") != 0;
  std::vector<T> x = to_dtype<T>(read_array<float>("x")), w = to_dtype<T>(read_array<float>("w")), res;
  std::vector<T> out = poisoned<T>(rows * hidden), sum = poisoned<T>(rows * hidden);
  RmsNormParams p;
  p.x = x.data();
  p.x_row_stride = hidden;
  p.weight = w.data();
  p.out = out.data();
  p.out_row_stride = hidden;
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(config["eps"]);
  p.dtype = dtype_of<T>();
  if (fused) {
    res = to_dtype<T>(read_array<float>("residual"));
    p.residual = res.data();
    p.residual_row_stride = hidden;
    p.residual_out = sum.data();
    p.residual_out_row_stride = hidden;
  }
  rms_norm_fwd_cuda(p, nullptr);
  write_floats("out", to_f32(out));
  if (fused) write_floats("sum", to_f32(sum));
  if (!backward) return;
  std::vector<T> dy = to_dtype<T>(read_array<float>("dy")), gres;
  std::vector<T> dx = poisoned<T>(rows * hidden), dw = poisoned<T>(hidden);
  RmsNormBwdParams b;
  b.grad_out = dy.data();
  b.grad_out_row_stride = hidden;
  b.x = fused ? sum.data() : x.data();
  b.x_row_stride = hidden;
  b.weight = w.data();
  if (fused) {
    gres = to_dtype<T>(read_array<float>("grad_sum"));
    b.grad_residual = gres.data();
    b.grad_residual_row_stride = hidden;
  }
  b.grad_x = dx.data();
  b.grad_weight = dw.data();
  b.num_partials = rms_norm_bwd_cuda_num_partials(rows, hidden);
  std::vector<float> partials(b.num_partials * hidden, NAN);
  b.dw_partial = partials.data();
  b.rows = rows;
  b.hidden = hidden;
  b.eps = p.eps;
  b.dtype = p.dtype;
  rms_norm_bwd_cuda(b, nullptr);
  write_floats("dx", to_f32(dx));
  write_floats("dw", to_f32(dw));
}

template <class T>
void run_silu() {
  const int64_t rows = cfg("rows"), d = cfg("d");
  std::vector<T> x = to_dtype<T>(read_array<float>("x")), out = poisoned<T>(rows * d);
  SiluAndMulParams p;
  p.x = x.data();
  p.x_row_stride = 2 * d;
  p.out = out.data();
  p.out_row_stride = d;
  p.rows = rows;
  p.d = d;
  p.dtype = dtype_of<T>();
  silu_and_mul_fwd_cuda(p, nullptr);
  write_floats("out", to_f32(out));
  if (cfg("backward") == 0) return;
  std::vector<T> dy = to_dtype<T>(read_array<float>("dy")), dx = poisoned<T>(rows * 2 * d);
  SiluAndMulBwdParams b;
  b.grad_out = dy.data();
  b.grad_out_row_stride = d;
  b.x = x.data();
  b.x_row_stride = 2 * d;
  b.grad_x = dx.data();
  b.grad_x_row_stride = 2 * d;
  b.rows = rows;
  b.d = d;
  b.dtype = p.dtype;
  silu_and_mul_bwd_cuda(b, nullptr);
  write_floats("dx", to_f32(dx));
}

template <class T, class CS>
void run_rotary() {
  const int64_t batch = cfg("batch"), seq = cfg("seq"), heads = cfg("heads"), D = cfg("head_dim");
  const int64_t rot = cfg("rot_dim"), max_pos = cfg("max_position");
  std::vector<T> x = to_dtype<T>(read_array<float>("x")), out = poisoned<T>(batch * seq * heads * D);
  std::vector<CS> cs_cos = to_dtype<CS>(read_array<float>("cos")), cs_sin = to_dtype<CS>(read_array<float>("sin"));
  std::vector<int64_t> pos = read_array<int64_t>("positions");
  RotaryParams p;
  p.in = x.data();
  p.out = out.data();
  p.in_batch_stride = p.out_batch_stride = seq * heads * D;
  p.in_seq_stride = p.out_seq_stride = heads * D;
  p.in_head_stride = p.out_head_stride = D;
  p.batch = batch;
  p.seq_len = seq;
  p.heads = heads;
  p.head_dim = D;
  p.rot_dim = rot;
  p.positions = pos.data();
  p.pos_batch_stride = seq;
  p.pos_seq_stride = 1;
  p.cos = cs_cos.data();
  p.sin = cs_sin.data();
  p.cs_row_stride = rot / 2;
  p.max_position = max_pos;
  p.interleaved = cfg("interleaved") != 0;
  p.inverse = cfg("inverse") != 0;
  p.dtype = dtype_of<T>();
  p.cs_dtype = dtype_of<CS>();
  rotary_fwd_cuda(p, nullptr);
  write_floats("out", to_f32(out));
}

template <class T>
void run_quant() {
  const int64_t m = cfg("m"), n = cfg("n"), k = cfg("k");
  std::vector<T> x = to_dtype<T>(read_array<float>("x")), bias, out = poisoned<T>(m * n), dense = poisoned<T>(n * k);
  std::vector<uint8_t> qweight = read_array<uint8_t>("qweight");
  std::vector<float> scales = read_array<float>("scales");
  std::vector<uint8_t> zeros;
  // x_offset > 0: x starts that many elements into its buffer (a sliced,
  // not 16-byte aligned x: the kernels' narrow-load path).
  const int64_t x_offset = cfg_or("x_offset", 0);
  x.insert(x.begin(), x_offset, cuda::from_float<T>(0.0f));
  WeightOnlyParams p;
  p.x = x.data() + x_offset;
  p.x_row_stride = k;
  p.qweight = qweight.data();
  p.qweight_row_stride = static_cast<int64_t>(qweight.size()) / n;
  p.scales = scales.data();
  p.format = static_cast<WeightFormat>(cfg("format"));
  if (p.format == WeightFormat::kInt4) {
    zeros = read_array<uint8_t>("zeros");
    p.zeros = zeros.data();
  }
  if (cfg("bias") != 0) {
    bias = to_dtype<T>(read_array<float>("bias"));
    p.bias = bias.data();
  }
  p.out = out.data();
  p.out_row_stride = n;
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = cfg("group_size");
  p.dtype = dtype_of<T>();
  std::vector<float> workspace;
  if (cfg("gemm") != 0) {  // the tensor-core path for many rows, k split as planned for TK_EMU_SMS SMs
    const int64_t splits = weight_only_gemm_cuda_splits(p);
    workspace.assign(splits * m * n, std::nanf(""));
    weight_only_gemm_cuda(p, splits, splits > 1 ? workspace.data() : nullptr, nullptr);
    write_floats("num_splits", {static_cast<float>(splits)});
  } else if (cfg_or("gemv_4bit", 0) != 0) {  // the tensor-core decode path, k split as planned for TK_EMU_SMS SMs
    const int64_t splits = gemv_4bit_cuda_splits(p);
    if (splits == 0) throw std::runtime_error("gemv_4bit_cuda_splits: this case does not suit the kernel");
    workspace.assign(splits * m * n, std::nanf(""));
    gemv_4bit_cuda(p, splits, splits > 1 ? workspace.data() : nullptr, nullptr);
    write_floats("num_splits", {static_cast<float>(splits)});
  } else {
    weight_only_matmul_cuda(p, nullptr);
  }
  weight_only_dequantize_cuda(p, dense.data(), nullptr);
  write_floats("out", to_f32(out));
  write_floats("dense", to_f32(dense));
}

template <class S, class B>
void run_pack() {
  const std::vector<int64_t> numels = read_array<int64_t>("numels"), offsets = read_array<int64_t>("offsets");
  const int64_t null_segment = cfg("null_segment"), bucket_numel = cfg("bucket_numel");
  std::vector<S> grads = to_dtype<S>(read_array<float>("grads"));  // concatenated segments
  std::vector<B> bucket = poisoned<B>(bucket_numel);
  std::vector<float> residual;
  std::vector<PackSegment> segs(numels.size());
  int64_t at = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    segs[i].data = static_cast<int64_t>(i) == null_segment ? nullptr : grads.data() + at;
    segs[i].numel = numels[i];
    segs[i].offset = offsets[i];
    at += numels[i];
  }
  BucketPackParams p;
  p.segments = segs.data();
  p.num_segments = static_cast<int64_t>(segs.size());
  p.segment_dtype = dtype_of<S>();
  p.bucket = bucket.data();
  p.bucket_dtype = dtype_of<B>();
  p.scale = static_cast<float>(config["scale"]);
  if (cfg("residual") != 0) {
    residual = read_array<float>("residual");
    p.residual = residual.data();
  }
  bucket_pack_cuda(p, nullptr);
  write_floats("bucket", to_f32(bucket));
  if (!residual.empty()) write_floats("residual", residual);
  // Unpack the packed bucket into fresh (poisoned) gradients.
  std::vector<S> back = poisoned<S>(static_cast<int64_t>(grads.size()));
  at = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    segs[i].data = back.data() + at;
    at += numels[i];
  }
  bucket_unpack_cuda(p, nullptr);
  write_floats("unpacked", to_f32(back));
}

template <class T>
void run_cache_ops() {
  const int64_t tokens = cfg("tokens"), heads_k = cfg("heads_k"), D = cfg("head_dim"), bs = cfg("block_size");
  std::vector<T> key = to_dtype<T>(read_array<float>("key")), value = to_dtype<T>(read_array<float>("value"));
  // One NaN block on each side of the caches, written out with them: a write
  // outside the cache shows there.
  const int64_t guard = bs * heads_k * D;
  std::vector<T> kc = guarded<T>(read_array<float>("key_cache"), guard),
                 vc = guarded<T>(read_array<float>("value_cache"), guard);
  std::vector<int64_t> slots = read_array<int64_t>("slots"), mapping = read_array<int64_t>("mapping");
  CacheLayout c;
  c.num_blocks = static_cast<int64_t>(kc.size() - 2 * guard) / (bs * heads_k * D);
  c.block_size = bs;
  c.heads_k = heads_k;
  c.head_dim = D;
  c.block_stride = bs * heads_k * D;
  c.pos_stride = heads_k * D;
  c.head_stride = D;
  ReshapeAndCacheParams r;
  r.key = key.data();
  r.value = value.data();
  r.key_token_stride = r.value_token_stride = heads_k * D;
  r.key_head_stride = r.value_head_stride = D;
  r.key_cache = kc.data() + guard;
  r.value_cache = vc.data() + guard;
  r.cache = c;
  r.slot_mapping = slots.data();
  r.num_tokens = tokens;
  r.element_size = sizeof(T);
  reshape_and_cache_cuda(r, nullptr);
  write_floats("key_cache_written", to_f32(kc));
  write_floats("value_cache_written", to_f32(vc));
  // Then copy blocks (src, dst pairs) in both caches.
  void* caches[2] = {kc.data() + guard, vc.data() + guard};
  CopyBlocksParams b;
  b.caches = caches;
  b.num_caches = 2;
  b.mapping = mapping.data();
  b.num_pairs = static_cast<int64_t>(mapping.size()) / 2;
  b.block_bytes = c.block_stride * static_cast<int64_t>(sizeof(T));
  copy_blocks_cuda(b, nullptr);
  write_floats("key_cache_copied", to_f32(kc));
  write_floats("value_cache_copied", to_f32(vc));
}

template <class T>
void run_w8a8() {
  const int64_t m = cfg("m"), n = cfg("n"), k = cfg("k");
  std::vector<T> x = to_dtype<T>(read_array<float>("x")), bias, out = poisoned<T>(m * n);
  std::vector<uint8_t> qweight = read_array<uint8_t>("qweight");
  std::vector<float> scales = read_array<float>("scales");
  W8A8Params p;
  p.x = x.data();
  p.x_row_stride = k;
  p.qweight = reinterpret_cast<const int8_t*>(qweight.data());
  p.scales = scales.data();
  if (cfg("bias") != 0) {
    bias = to_dtype<T>(read_array<float>("bias"));
    p.bias = bias.data();
  }
  p.out = out.data();
  p.out_row_stride = n;
  p.m = m;
  p.n = n;
  p.k = k;
  p.dtype = dtype_of<T>();
  std::vector<int8_t> xq(m * w8a8_cuda_x_stride(k), 99);  // poisoned: the kernel must write the padding too
  std::vector<float> x_scale(m, NAN);
  const int64_t splits = w8a8_cuda_splits(p);  // as planned for TK_EMU_SMS SMs
  std::vector<int32_t> workspace(splits * m * n, -7);
  w8a8_matmul_cuda(p, xq.data(), x_scale.data(), splits, splits > 1 ? workspace.data() : nullptr, nullptr);
  write_floats("out", to_f32(out));
  write_floats("num_splits", {static_cast<float>(splits)});
}

// Calls f(T{}) for the dtype code of `key` (0 fp32, 1 bf16, 2 fp16).
template <class F>
void with_dtype(const char* key, const F& f) {
  switch (cfg(key)) {
    case 0: f(float{}); break;
    case 1: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
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
    const std::string op = config.count("op_rms_norm") ? "rms_norm"
                           : config.count("op_silu")    ? "silu"
                           : config.count("op_rotary")  ? "rotary"
                           : config.count("op_quant")   ? "quant"
                           : config.count("op_pack")    ? "pack"
                           : config.count("op_cache")   ? "cache"
                           : config.count("op_w8a8")    ? "w8a8"
                           : cfg("paged_decode") != 0  ? "paged_decode"
                                                        : "flash";
    if (op == "rms_norm") {
      with_dtype("dtype", [](auto t) { run_rms_norm<decltype(t)>(); });
    } else if (op == "silu") {
      with_dtype("dtype", [](auto t) { run_silu<decltype(t)>(); });
    } else if (op == "rotary") {
      with_dtype("dtype", [](auto t) {
        using T = decltype(t);
        if (cfg("cs_fp32") != 0) run_rotary<T, float>();
        else run_rotary<T, T>();
      });
    } else if (op == "quant") {
      with_dtype("dtype", [](auto t) { run_quant<decltype(t)>(); });
    } else if (op == "pack") {
      with_dtype("segment_dtype", [](auto s) {
        with_dtype("bucket_dtype", [](auto b) { run_pack<decltype(s), decltype(b)>(); });
      });
    } else if (op == "w8a8") {
      with_dtype("dtype", [](auto t) { run_w8a8<decltype(t)>(); });
    } else if (op == "cache") {
      with_dtype("dtype", [](auto t) { run_cache_ops<decltype(t)>(); });
    } else if (op == "paged_decode") {
      with_dtype("dtype", [](auto t) { run_paged_decode<decltype(t)>(); });
    } else {
      const int64_t d = cfg("head_dim");
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
      if (cfg("dtype") == 1) by_dim(__nv_bfloat16{});
      else by_dim(__half{});
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
