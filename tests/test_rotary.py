"""Rotary positions (serengeti.ops.rotary): the fast rotation against explicit float64 rotation matrices."""
from __future__ import annotations

import math

import pytest
import torch

from serengeti.ops.rotary import rotary_angles, rotate, rotate_ref, rotation_matrix_ref


@pytest.mark.parametrize("offset", [0, 5, 100_000])
def test_rotate_matches_explicit_rotation_matrices(offset):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 16, dtype=torch.float64)  # (B, H, L, d)
    cos, sin = rotary_angles(9, 16, offset=offset, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, cos, sin), rotate_ref(x, offset), rtol=0, atol=1e-12)


def test_rotation_by_hand():
    """Position 3, d = 4: pair (0, 2) turns by 3 rad, pair (1, 3) by 3 / 100 rad (theta_1 = 10000^(-1/2))."""
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    cos, sin = rotary_angles(1, 4, offset=3, dtype=torch.float64)
    expected = torch.tensor([[math.cos(3), 2 * math.cos(0.03), math.sin(3), 2 * math.sin(0.03)]], dtype=torch.float64)
    torch.testing.assert_close(rotate(x, cos, sin), expected, rtol=0, atol=1e-15)
    R = rotation_matrix_ref(3, 4)
    torch.testing.assert_close(R @ R.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-15)


def test_scores_depend_on_the_distance_only():
    """(R_p q) . (R_s k) is the same for (p, s) and (p + c, s + c): rotary encodes relative positions."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 8, dtype=torch.float64).unbind(0)
    for p, s, c in [(7, 2, 1), (40, 0, 1000), (3, 3, 77)]:
        score = (rotate_ref(q, p) * rotate_ref(k, s)).sum()
        shifted = (rotate_ref(q, p + c) * rotate_ref(k, s + c)).sum()
        torch.testing.assert_close(score, shifted, rtol=0, atol=1e-12)


def test_odd_head_width_is_refused():
    with pytest.raises(ValueError, match="even head width.*num_heads"):
        rotary_angles(4, 7)
