"""Recurrent generation: prefill the prompt once, then one ``step`` per new token.

Every mixer's state (KV cache, H3/S5 state, Hyena/LongConv input history) lives in the
:class:`~serengeti.models.lm.GenerationState` from ``LMHeadModel.allocate_state``::

    state  = model.allocate_state(B, max_len=P + N - 1)
    logits = model(prompt, state=state)[:, -1]     # prefill: parallel pass, state left at position P
    for each new token t:  tok = sample(logits);  logits = model.step(tok, state)

so generation never re-runs the prompt. :func:`stream` yields the new tokens one by one (a caller
may stop at an end-of-text token or a stop string, e.g. the lm_eval adapter); :func:`generate`
collects a fixed number of them and times the two phases.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class Generation:
    """Output of :func:`generate`.

    Attributes:
        tokens: (B, N) new token ids.
        prefill_s: wall time of the prompt pass (including the first sample).
        decode_s: wall time of the N - 1 ``step`` calls and samples.
    """

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float

    @property
    def ms_per_token(self) -> float:
        """Decode latency per generated token after the first (ms); nan for a single token."""
        n = self.tokens.shape[1] - 1
        return 1e3 * self.decode_s / n if n > 0 else float("nan")


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: (B, V) -> (B,) long.

    ``temperature == 0`` is greedy (argmax); otherwise softmax(logits / temperature) restricted to
    the ``top_k`` most likely tokens and then to the smallest set whose mass reaches ``top_p``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def stream(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           max_len: int | None = None) -> Iterator[torch.Tensor]:
    """Yield up to ``max_new_tokens`` new tokens after ``prompt``, one (B,) long tensor at a time.

    The model's recurrent mode: one prefill pass over the prompt, then one ``step`` per token; a
    token is only fed back when the next one is asked for, so a caller that stops early computes
    nothing past the last token it took.

    Args:
        model: an :class:`~serengeti.models.lm.LMHeadModel` (put it in eval mode first).
        prompt: (B, P) long, P >= 1.
        max_new_tokens: N >= 1.
        temperature, top_k, top_p, generator: see :func:`sample`.
        max_len: the model's maximum sequence length (``model.max_seq_len``; None = unbounded);
            ``P + N - 1`` must not exceed it.

    Only ids below ``model.vocab_size`` are sampled (the padded rows of the embedding are never produced).
    """
    B, P = prompt.shape
    if P < 1:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = P + max_new_tokens - 1  # positions fed to the model (the last sample is never fed back)
    if max_len is not None and total > max_len:
        raise ValueError(f"prompt of {P} tokens + max_new_tokens={max_new_tokens} needs {total} positions, more than "
                         f"the model's maximum sequence length {max_len} (model.l_max)")
    V = model.vocab_size
    state = model.allocate_state(B, max_len=total)
    logits = model(prompt, state=state, num_last_tokens=1)[:, -1, :V]
    for i in range(max_new_tokens):
        if i > 0:
            logits = model.step(tok, state)[:, :V]
        tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield tok


def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, max_len: int | None = None,
             clock: Callable[[], float] = time.perf_counter) -> Generation:
    """Generate exactly ``max_new_tokens`` tokens after ``prompt`` (:func:`stream`, same arguments).

    Args:
        clock: seconds for the timings (``time.thread_time`` measures CPU time on a busy machine).

    Returns:
        :class:`Generation` with ``tokens`` (B, N).
    """
    start = clock()
    tokens = stream(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    generator=generator, max_len=max_len)
    out = [next(tokens)]
    t_prefill = clock()
    out.extend(tokens)
    end = clock()
    return Generation(torch.stack(out, dim=1), t_prefill - start, end - t_prefill)
