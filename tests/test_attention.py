"""Attention mixer against a plain softmax oracle; KV-cache step == forward."""
from __future__ import annotations

import math

import pytest
import torch

from serengeti.mixers import Attention, StateError


def attention_ref(mixer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention written out in float64."""
    B, L, D = x.shape
    H, hd = mixer.num_heads, mixer.head_dim
    qkv = (x @ mixer.Wqkv.weight.T + mixer.Wqkv.bias).view(B, L, 3, H, hd)
    q, k, v = qkv.unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, D)
    return y @ mixer.out_proj.weight.T + mixer.out_proj.bias


@pytest.mark.parametrize("L", [1, 7, 33])
def test_matches_reference(L):
    torch.manual_seed(0)
    mixer = Attention(24, num_heads=3).double()
    x = torch.randn(2, L, 24, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), attention_ref(mixer, x), rtol=1e-10, atol=1e-10)


def test_kv_cache_step_reproduces_forward():
    torch.manual_seed(0)
    mixer = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 10, 32)
    full = mixer(x)
    state = mixer.allocate_state(2, max_len=10)
    torch.testing.assert_close(mixer(x[:, :4], state=state), full[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixer(x[:, 4:6], state=state), full[:, 4:6], rtol=1e-5, atol=1e-5)  # chunked prefill
    for t in range(6, 10):
        y, state = mixer.step(x[:, t], state)
        torch.testing.assert_close(y, full[:, t], rtol=1e-5, atol=1e-5)
    assert state.length == 10
    with pytest.raises(ValueError, match="max_len"):
        mixer.step(x[:, 0], state)


def test_step_without_state_is_explained():
    mixer = Attention(8, num_heads=2)
    with pytest.raises(StateError, match="allocate_state"):
        mixer.step(torch.randn(1, 8), None)


def rotary_attention_ref(mixer: Attention, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Causal attention with rotary positions, O(L^2) in float64: every query and key rotated by the explicit
    rotation matrix of its position (serengeti.ops.rotary.rotate_ref), every score a dot product."""
    from serengeti.ops.rotary import rotate_ref

    B, L, D = x.shape
    H, hd = mixer.num_heads, mixer.head_dim
    x = x.double()
    qkv = (x @ mixer.Wqkv.weight.double().T + mixer.Wqkv.bias.double()).view(B, L, 3, H, hd)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, hd)
    q, k = rotate_ref(q, offset), rotate_ref(k, offset)
    y = torch.zeros(B, H, L, hd, dtype=torch.float64)
    for p in range(L):
        scores = torch.stack([(q[:, :, p] * k[:, :, s]).sum(-1) for s in range(p + 1)], dim=-1) / math.sqrt(hd)
        y[:, :, p] = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v[:, :, : p + 1])
    y = y.transpose(1, 2).reshape(B, L, D)
    return y @ mixer.out_proj.weight.double().T + mixer.out_proj.bias.double()


@pytest.mark.parametrize("L", [1, 9, 40])
def test_rotary_matches_the_float64_rotation_reference(L):
    torch.manual_seed(0)
    mixer = Attention(24, num_heads=3, rotary=True).double()
    x = torch.randn(2, L, 24, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), rotary_attention_ref(mixer, x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mixer(x), attention_ref(mixer, x)) or L == 1  # the rotation does change the output


def test_rotary_kv_cache_keeps_positions():
    """Prefill in two chunks, then step: every query and key at its absolute position (the cache holds rotated keys)."""
    torch.manual_seed(0)
    mixer = Attention(16, num_heads=2, rotary=True).double().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full = rotary_attention_ref(mixer, x)
    state = mixer.allocate_state(2, max_len=12)
    torch.testing.assert_close(mixer(x[:, :4], state=state), full[:, :4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixer(x[:, 4:7], state=state), full[:, 4:7], rtol=1e-10, atol=1e-10)
    for t in range(7, 12):
        torch.testing.assert_close(mixer.step(x[:, t], state)[0], full[:, t], rtol=1e-10, atol=1e-10)


def test_rotary_needs_an_even_head_width():
    with pytest.raises(ValueError, match="even head width"):
        Attention(12, num_heads=4, rotary=True)
