"""torchkiln.nn layers against Hugging Face-style Llama reference modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchkiln.nn import RMSNorm, RotaryEmbedding, SwiGLU


class LlamaMLPRef(nn.Module):
    """The layout of transformers' LlamaMLP (separate gate / up projections)."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, position_ids, head_dim, base):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb on (B, H, S, D)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # (B, 1, S, D)
    return q * cos + hf_rotate_half(q) * sin


def test_rmsnorm_matches_llama_formula_and_state_dict():
    norm = RMSNorm(96, eps=1e-5)
    assert list(norm.state_dict()) == ["weight"]
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 7, 96)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref)
    r = torch.randn_like(x)
    out, s = norm(x, r.clone())
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, norm(x + r))


def test_rotary_embedding_matches_hf_llama():
    B, H, S, D = 2, 4, 11, 64
    rope = RotaryEmbedding(D, max_position_embeddings=128, base=10000.0)
    q_bhsd = torch.randn(B, H, S, D)
    k_bhsd = torch.randn(B, 2, S, D)
    pos = torch.stack([torch.arange(S), torch.arange(5, 5 + S)])
    q_out, k_out = rope(q_bhsd.transpose(1, 2), k_bhsd.transpose(1, 2), pos)
    torch.testing.assert_close(q_out.transpose(1, 2), hf_rope(q_bhsd, pos, D, 10000.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.transpose(1, 2), hf_rope(k_bhsd, pos, D, 10000.0), rtol=1e-5, atol=1e-5)


def test_rotary_embedding_validates_rotary_dim():
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        RotaryEmbedding(64, rotary_dim=65)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_loads_hf_checkpoint_and_matches(bias):
    ref = LlamaMLPRef(48, 130)
    if bias:
        for lin in (ref.gate_proj, ref.up_proj, ref.down_proj):
            lin.bias = nn.Parameter(torch.randn(lin.out_features))
    mlp = SwiGLU(48, 130, bias=bias)
    mlp.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = mlp(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
