// THE list of torchkiln op schemas. Implementations register per device in
// each family's *_ops.cpp; fake (meta) kernels and autograd formulas live in
// python/torchkiln/ops/<family>.py.
//
// Conventions: an op that updates arguments marks them `Tensor(a!)` and
// returns `()`: `*_out` ops write into a caller-provided `out` (vLLM style,
// for allocation-free hot paths and CUDA graphs), ops ending in `_` update
// their inputs in place. Functional twins exist where autograd needs them.
#include <torch/library.h>

TORCH_LIBRARY(torchkiln, m) {
  // ---- norm: RMSNorm (+ fused residual add) -------------------------------
  // out = x * rsqrt(mean(x^2, -1) + eps) * weight
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // same, into a caller-provided buffer shaped like x (which may be x itself)
  m.def("rms_norm_out(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  // s = x + residual; returns (rms_norm(s), s)
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // residual <- x + residual in place; out <- rms_norm(residual) (out may be x itself)
  m.def(
      "fused_add_rms_norm_out(Tensor(a!) out, Tensor x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // (grad_x [+ grad_residual], grad_weight) for rms_norm evaluated at x
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps, Tensor? grad_residual) "
      "-> (Tensor, Tensor)");

  // ---- rope: rotary position embedding ------------------------------------
  // x: (tokens, heads, head_dim) or (batch, seq, heads, head_dim); inverse rotates by -theta
  m.def(
      "rotary_embedding(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, "
      "bool inverse) -> Tensor");
  // q and (optionally) k rotated in place
  m.def(
      "rotary_embedding_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor positions, "
      "bool interleaved) -> ()");

  // ---- attention: FlashAttention-2 (causal = window_right 0) -------------
  // q (batch, seqlen_q, heads, D), k/v (batch, seqlen_k, heads_k, D) -> (out like q, lse (batch, heads, seqlen_q) fp32)
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes) -> (Tensor, Tensor)");
  // packed (total, heads, D) with int32 cu_seqlens (batch + 1) -> (out, lse (heads, total_q));
  // with block_table (batch, max_blocks), k/v are paged caches (chunked prefill)
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes, Tensor? block_table=None) -> (Tensor, Tensor)");

  // (dq, dk, dv) from the forward's out and lse; dk/dv summed over each GQA group
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, "
      "int window_left, int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, "
      "int window_left, int window_right, float softcap, Tensor? alibi_slopes) -> (Tensor, Tensor, Tensor)");

  // ---- paged: KV cache in blocks (num_blocks, block_size, kv_heads, D) ------
  // key/value (tokens, kv_heads, D) -> cache slots (block * block_size + offset); slot < 0 skipped
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  // block_mapping (n, 2) int64 (src, dst) applied to every layer's caches (copy-on-write)
  m.def("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()");
  // blocks between caches on different devices (offload / reload)
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");
  // decode: q (seqs, heads, D) over seq_lens cached tokens via block_table -> (out, lse (seqs, heads))
  m.def(
      "paged_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor seq_lens, "
      "float softmax_scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes) "
      "-> (Tensor, Tensor)");

  // ---- activation: SwiGLU gate --------------------------------------------
  // silu(x[..., :d]) * x[..., d:]
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("silu_and_mul_out(Tensor(a!) out, Tensor x) -> ()");
  m.def("silu_and_mul_backward(Tensor grad_out, Tensor x) -> Tensor");

  // ---- quant: matmul with 8 / 4-bit weights (layouts: csrc/quant/quant_matmul.h)
  // x (..., in) @ W^T + bias, format 'int8' | 'int4' | 'nf4'; scales/zeros fp32 (out, in / group_size)
  m.def(
      "quant_matmul_weight_only(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
      "str format, int group_size) -> Tensor");
  // the input gradient of quant_matmul_weight_only: grad (..., out) @ W -> (..., in)
  m.def(
      "quant_matmul_weight_only_grad_input(Tensor grad, Tensor qweight, Tensor scales, Tensor? zeros, "
      "str format, int group_size, int in_features) -> Tensor");
  // the dense W (out, in) in dtype
  m.def(
      "quant_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, str format, int group_size, "
      "int in_features, ScalarType dtype) -> Tensor");
  // dense weight (out, in) -> (qweight, scales, zeros) in the layouts above (CPU; zeros empty but for
  // int4), the formulas of python/torchkiln/quant/quantize.py bit for bit
  m.def("quant_quantize(Tensor weight, str format, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)");
  // x quantised per row to int8 on the fly; qweight int8 panels (out/16, in/4, 16, 4), scales fp32 (out)
  m.def(
      "quant_matmul_w8a8(Tensor x, Tensor qweight, Tensor scales, Tensor weight_sums, Tensor? bias) -> Tensor");
}
