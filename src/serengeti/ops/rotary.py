"""Rotary position embedding (RoPE, docs/mixers.md#rotary-positions), with its direct reference.

A head of width ``d`` (even) is split into the channel pairs ``(i, i + d/2)``, ``i < d/2``; at
position ``p`` pair ``i`` is rotated by the angle ``p * theta_i`` with ``theta_i = base**(-2 i / d)``::

    x'[i]       = x[i] cos(p theta_i) - x[i + d/2] sin(p theta_i)
    x'[i + d/2] = x[i + d/2] cos(p theta_i) + x[i] sin(p theta_i)

Queries and keys are both rotated, so the score ``q'_p . k'_s`` depends on ``p - s`` only
(the rotations compose: ``R_p^T R_s = R_{s - p}``). Nothing is learned and no parameter is sized
by the sequence length. :func:`rotate_ref` is the same map written as an explicit rotation matrix
per position, in float64, for the tests.
"""
from __future__ import annotations

import torch

#: ``base`` of the frequencies theta_i = base**(-2i/d) (RoFormer's and LLaMA's value)
ROTARY_BASE = 10_000.0


def rotary_angles(length: int, head_dim: int, *, offset: int = 0, base: float = ROTARY_BASE,
                  device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``p * theta_i`` for positions ``p = offset .. offset + length - 1``: two ``(length, head_dim / 2)``.

    The angles are formed in float64 (``p * theta`` keeps its precision at positions ~1e6) and cast to ``dtype``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head width, got head_dim={head_dim} "
                         "(model.d_model / num_heads must be even)")
    theta = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.arange(offset, offset + length, device=device, dtype=torch.float64)[:, None] * theta
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(i, i + d/2)`` of ``x: (..., d)``; ``cos, sin`` broadcast against ``x[..., :d/2]``.

    For ``x: (B, H, L, d)`` pass the ``(L, d/2)`` of :func:`rotary_angles`; for ``(B, L, H, d)``, ``cos[:, None]``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotation_matrix_ref(position: int, head_dim: int, base: float = ROTARY_BASE) -> torch.Tensor:
    """The ``(d, d)`` float64 rotation ``R_p`` of position ``p``: a 2x2 rotation on each pair ``(i, i + d/2)``."""
    R = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    half = head_dim // 2
    for i in range(half):
        angle = torch.tensor(position * base ** (-2.0 * i / head_dim), dtype=torch.float64)
        c, s = torch.cos(angle), torch.sin(angle)
        R[i, i], R[i, i + half] = c, -s
        R[i + half, i], R[i + half, i + half] = s, c
    return R


def rotate_ref(x: torch.Tensor, offset: int = 0, base: float = ROTARY_BASE) -> torch.Tensor:
    """Reference of :func:`rotate` for ``x: (..., L, d)``: ``x'_p = R_{offset + p} x_p``, one matrix per position, float64."""
    x = x.double()
    out = torch.empty_like(x)
    for p in range(x.shape[-2]):
        out[..., p, :] = x[..., p, :] @ rotation_matrix_ref(offset + p, x.shape[-1], base).T
    return out
