"""Diagonal linear recurrences ``x_k = a_k * x_{k-1} + b_k`` (the S5 state update), and their oracle.

Time is dimension ``-2`` and the state dimension ``P`` is last, so that the products around the
scan in S5 (``B̄u`` and ``C̃x``) are plain matmuls on contiguous memory::

    b: (..., L, P) complex        a: (P,) time-invariant, or (..., L, P) per step
    x: (..., L, P) complex        x0: (..., P) optional state before step 0

Two parallel methods:

* ``"chunked"`` (time-invariant ``a`` only; the default for it). Cut time into chunks of ``T``
  steps. The local states of all chunks come from one loop of ``T`` fused multiply-adds, each
  vectorized over every chunk, batch element and state (so the Python loop is ``T`` long, not
  ``L``). The chunk end states obey the same recurrence with ``a^T``, solved by the same function
  on a sequence ``T`` times shorter (log_T(L) levels), then broadcast back::

        b  |----T----|----T----|----T----|      local_t = a local_{t-1} + b_t   (T steps, all chunks)
        ends            e0        e1        e2   h_c    = a^T h_{c-1} + e_c    (recursion, L/T long)
        x  = local + a^(t+1) * h_{c-1}                                         (fix-up, parallel)

  Work O(L P), extra memory O(L P) (no log L factor), no autograd graph: a custom backward runs
  the adjoint recurrence (a reverse scan with ``conj(a)``) through the same code and only saves
  the output ``x``, which a following ``C̃x`` product keeps alive anyway.
* ``"log"``: a log-depth odd/even associative scan (work O(L P), ``log2 L`` levels) with the
  operator ``(a_i, b_i) ∘ (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``; accepts per-step ``a``;
  differentiated by autograd.

:func:`linear_scan_ref` is the float64/complex128 sequential loop they are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCAN_METHODS = ("auto", "chunked", "log")  # the ``method`` names of :func:`linear_scan`
CHUNK_SIZE = 64  # chunk length T of the chunked scan; T = 32 ... 128 are within noise (benchmarks/scan.py)


@torch.compiler.disable  # a Python loop over time / custom autograd on complex states: eager under torch.compile (serengeti/training/compiling.py)
def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    method: str = "auto",
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """All states of ``x_k = a_k ⊙ x_{k-1} + b_k`` (or, with ``reverse``, ``x_k = a_k ⊙ x_{k+1} + b_k``).

    Args:
        a: (P,) time-invariant (broadcast over batch and time), or (..., L, P) per step; complex.
        b: (..., L, P) complex.
        x0: optional (..., P) state before the first step (after the last one when ``reverse``);
            zero when omitted.
        reverse: run the recurrence backwards in time (bidirectional S5).
        method: ``"chunked"`` (needs (P,) ``a``), ``"log"``, or ``"auto"`` (chunked when ``a`` is
            time-invariant, else log).
        chunk_size: chunk length ``T`` of the chunked method.

    Returns:
        x: (..., L, P), same dtype as ``b``.
    """
    if b.dim() < 2:
        raise ValueError(f"linear_scan: b must be (..., L, P), got shape {tuple(b.shape)}")
    invariant = a.dim() == 1
    if invariant and a.shape[0] != b.shape[-1]:
        raise ValueError(f"linear_scan: a (P,) = {tuple(a.shape)} does not match b (..., L, P) = {tuple(b.shape)}")
    if method == "auto":
        method = "chunked" if invariant else "log"
    if x0 is not None:
        # Fold the initial state into the first input: x_0 = a_0 x0 + b_0.
        i = -1 if reverse else 0
        a_first = a if invariant else a[..., i, :]
        first = (b[..., i, :] + a_first * x0).unsqueeze(-2)
        rest = b[..., :-1, :] if reverse else b[..., 1:, :]
        b = torch.cat([rest, first] if reverse else [first, rest], dim=-2)
    if method == "chunked":
        if not invariant:
            raise ValueError("linear_scan: method='chunked' needs a time-invariant a of shape (P,)")
        if chunk_size < 2:
            raise ValueError(f"linear_scan: chunk_size must be >= 2, got {chunk_size}")
        return _ChunkedScan.apply(a, b, reverse, chunk_size)
    if method == "log":
        return _log_scan(a, b, reverse)
    raise ValueError(f"linear_scan: unknown method {method!r} (expected one of {SCAN_METHODS})")


def linear_scan_ref(
    a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None = None, *, reverse: bool = False
) -> torch.Tensor:
    """Sequential oracle for :func:`linear_scan`, in complex128. Same arguments; returns (..., L, P) complex128."""
    b = b.to(torch.complex128)
    a = a.to(torch.complex128)
    a = a.expand_as(b) if a.dim() == 1 else a
    x = torch.zeros_like(b[..., 0, :]) if x0 is None else x0.to(torch.complex128)
    order = range(b.shape[-2] - 1, -1, -1) if reverse else range(b.shape[-2])
    out = [None] * b.shape[-2]
    for k in order:
        x = a[..., k, :] * x + b[..., k, :]
        out[k] = x
    return torch.stack(out, dim=-2)


# ----------------------------------------------------------------------------------------------
# chunked method (time-invariant a)


def _powers(a: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1, P): a^0, a^1, ..., a^n by a cumulative product (exact for a = 0, no log)."""
    return torch.cat([torch.ones_like(a)[None], torch.cumprod(a.expand(n, -1), dim=0)])


def _sequential(a: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The recurrence along dim -2 as a loop of ``L`` fused multiply-adds, each vectorized over
    every other dimension, written into one preallocated output (no autograd). a: (P,)."""
    out = torch.empty_like(b)
    L = b.shape[-2]
    order = range(L - 1, -1, -1) if reverse else range(L)
    prev = None
    for t in order:
        if prev is None:
            out[..., t, :] = b[..., t, :]
        else:
            torch.addcmul(b[..., t, :], out[..., prev, :], a, out=out[..., t, :])
        prev = t
    return out


def _chunked(a: torch.Tensor, b: torch.Tensor, reverse: bool, T: int) -> torch.Tensor:
    """Chunked scan without autograd. a: (P,), b: (..., L, P) -> (..., L, P)."""
    L = b.shape[-2]
    if L <= T:
        return _sequential(a, b, reverse)
    pad = -L % T
    if pad:
        # Zeros after the end change nothing in either direction.
        b = F.pad(b, (0, 0, 0, pad))
    n_chunks = b.shape[-2] // T
    # Local states of every chunk at once: T steps, each over all chunks (and batch, states).
    x = _sequential(a, b.unflatten(-2, (n_chunks, T)), reverse)  # (..., C, T, P)
    pw = _powers(a, T)  # (T + 1, P)
    # State entering each chunk from its neighbour: carry_c = a^T carry_{c-1} + end_c.
    edge = x[..., 0, :] if reverse else x[..., -1, :]  # (..., C, P)
    carry = _chunked(pw[T], edge, reverse, T)
    zero = torch.zeros_like(carry[..., :1, :])
    incoming = torch.cat([carry[..., 1:, :], zero] if reverse else [zero, carry[..., :-1, :]], dim=-2)
    decay = pw[1:].flip(0) if reverse else pw[1:]  # (T, P): a^(t+1), or a^(T-t) backwards
    x.addcmul_(decay, incoming.unsqueeze(-2))
    x = x.flatten(-3, -2)
    return x[..., :L, :] if pad else x


class _ChunkedScan(torch.autograd.Function):
    """``x = scan(a, b)`` with the adjoint recurrence as backward.

    For x_k = a x_{k-1} + b_k and a real loss, with PyTorch's conjugate-gradient convention:
    λ_k = g_k + conj(a) λ_{k+1} (a reverse scan of the output gradient g), grad b_k = λ_k,
    grad a = Σ_k λ_k conj(x_{k-1}).
    """

    @staticmethod
    def forward(ctx, a, b, reverse, T):
        x = _chunked(a, b, reverse, T)
        ctx.save_for_backward(a, x)
        ctx.reverse, ctx.T = reverse, T
        return x

    @staticmethod
    def backward(ctx, g):
        a, x = ctx.saved_tensors
        lam = _chunked(a.conj(), g, not ctx.reverse, ctx.T)
        grad_a = None
        if ctx.needs_input_grad[0]:
            # previous state x_{k-1} (x_{k+1} when reverse); zero beyond the edge
            if ctx.reverse:
                prod = lam[..., :-1, :] * x[..., 1:, :].conj()
            else:
                prod = lam[..., 1:, :] * x[..., :-1, :].conj()
            grad_a = prod.reshape(-1, a.shape[0]).sum(0)
        return grad_a, lam, None, None


# ----------------------------------------------------------------------------------------------
# log-depth method (any a)


def _log_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Odd/even associative scan along dim -2. a: (P,) or (..., L, P); b: (..., L, P)."""
    if reverse:
        flip_a = a if a.dim() == 1 else a.flip(-2)
        return _log_scan(flip_a, b.flip(-2), False).flip(-2)
    L = b.shape[-2]
    if L == 1:
        return b
    invariant = a.dim() == 1
    n = L // 2
    # Combine neighbours (2i, 2i+1) into one element: (a_{2i+1} a_{2i}, a_{2i+1} b_{2i} + b_{2i+1}).
    b_even, b_odd = b[..., 0 : 2 * n : 2, :], b[..., 1 : 2 * n : 2, :]
    if invariant:
        a_pair = a * a
        b_pair = a * b_even + b_odd
    else:
        a_even, a_odd = a[..., 0 : 2 * n : 2, :], a[..., 1 : 2 * n : 2, :]
        a_pair = a_odd * a_even
        b_pair = a_odd * b_even + b_odd
    x_odd = _log_scan(a_pair, b_pair, False)  # states at 1, 3, 5, ...
    # States at the even positions 2, 4, ...: one more step from the odd state before them.
    b_next = b[..., 2::2, :]
    a_next = a if invariant else a[..., 2::2, :]
    x_even = torch.cat([b[..., :1, :], a_next * x_odd[..., : b_next.shape[-2], :] + b_next], dim=-2)
    # interleave: even, odd, even, odd, ... (one extra even state when L is odd)
    x = torch.stack([x_even[..., :n, :], x_odd], dim=-2).flatten(-3, -2)
    if L % 2:
        x = torch.cat([x, x_even[..., n:, :]], dim=-2)
    return x
