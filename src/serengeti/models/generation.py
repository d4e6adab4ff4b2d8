"""Recurrent generation: prefill the prompt once, then one ``step`` per new token.

Every mixer's state (KV cache, H3/S5 state, Hyena/LongConv input history) lives in the
:class:`~serengeti.models.backbone.GenerationState` from ``LMHeadModel.allocate_state``::

    state  = model.allocate_state(B, max_len=P + N - 1)
    logits = model(prompt, state=state)[:, -1]     # prefill: parallel pass, state left at position P
    for each new token t:  tok = sample(logits);  logits = model.step(tok, state)

so generation never re-runs the prompt. :func:`stream` yields the new tokens one by one (a caller
may stop at an end-of-text token or a stop string, e.g. the lm_eval adapter); :func:`generate`
collects a fixed number of them and times the two phases.

:func:`check_memory` refuses, before anything is allocated, a request whose state and token ids
would not fit in the device's free memory (e.g. ``num_samples=10**9``); ``MAX_NEW_TOKENS`` bounds one
call of ``evaluate.py task=generate`` for models without a length limit of their own.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

#: the most tokens one ``evaluate.py task=generate`` call may ask for (2**20: about an hour of
#: decoding at a few ms per token); a model with a length limit is bounded by that limit first
MAX_NEW_TOKENS = 2**20


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
    # in float64 (a tiny temperature is 0 in float32), with the maximum shifted to 0 first: as the
    # temperature goes to 0 the others go to -inf (greedy in the limit) instead of NaN
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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
        model: an :class:`~serengeti.models.backbone.LMHeadModel` (put it in eval mode first).
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


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` (dataclasses, lists, tuples, dicts)."""
    if torch.is_tensor(obj):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj``."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _floats(obj: Any) -> int:
    """Real numbers held by the floating-point tensors reachable from ``obj`` (a complex entry counts 2)."""
    return sum(t.numel() * (2 if t.is_complex() else 1) for t in _tensors(obj) if t.is_floating_point() or t.is_complex())


def state_size_by_block(model, seq_len: int) -> list[int]:
    """Per block: the floats one sequence's recurrent state holds when generating ``seq_len`` positions.

    Read from the models' own state contract (docs/architecture.md): the states of
    ``allocate_state(2, max_len=seq_len)`` minus those of ``allocate_state(1, ...)`` (sized on the meta
    device, nothing allocated), so what ``allocate_state`` computes once for the whole batch (cached
    filters, discretized SSMs) is not counted. Attention: its KV cache, 2 D per position; Hyena and
    the long convolution: the input history of each long convolution, D per position, plus the short
    convolution's last inputs; H3, S5, Hyena-S5: a fixed-size state. Raises
    :class:`~serengeti.mixers.base.StateError` for a mixer without a recurrent mode.
    """
    one, two = (model.allocate_state(b, max_len=seq_len, device="meta") for b in (1, 2))
    return [_floats(two.layers[i]) - _floats(one.layers[i]) for i in sorted(one.layers)]


def state_size(model, seq_len: int) -> int:
    """The recurrent state of one sequence at generation time, in floats, summed over the blocks
    (:func:`state_size_by_block`): the x-axis of zoology's recall-vs-state-size comparison."""
    return sum(state_size_by_block(model, seq_len))


def memory_needed(model, batch_size: int, prompt_len: int, max_new_tokens: int) -> int:
    """Rough bytes :func:`generate` needs for ``batch_size`` sequences: the recurrent state for
    ``prompt_len + max_new_tokens - 1`` positions (sized on the meta device, nothing allocated), the
    new token ids (collected, then stacked), the sampling buffers over the vocabulary, and one
    block's working set of the prompt pass."""
    total = prompt_len + max_new_tokens - 1
    one, two = (_tensor_bytes(model.allocate_state(b, max_len=total, device="meta")) for b in (1, 2))
    shared = max(one - (two - one), 0)  # cached kernels, SSM matrices: one copy for the whole batch
    vocab, width = model.word_embeddings.weight.shape
    per_sequence = (two - one) + 2 * 8 * max_new_tokens + 4 * 4 * vocab + 16 * 4 * prompt_len * width
    return shared + batch_size * per_sequence


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: the kernel's MemAvailable), or ``None``."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model, batch_size: int, prompt_len: int, max_new_tokens: int, device: str | torch.device) -> None:
    """Raise ``ValueError`` (one line) when :func:`memory_needed` exceeds the free memory of ``device``."""
    free = available_memory(device)
    need = memory_needed(model, batch_size, prompt_len, max_new_tokens)
    if free is not None and need > free:
        raise ValueError(f"num_samples={batch_size} x (prompt {prompt_len} + max_new_tokens={max_new_tokens} tokens) "
                         f"needs about {_gib(need)} for the generation state and token ids, more than the "
                         f"{_gib(free)} free on {torch.device(device).type}: lower num_samples or max_new_tokens")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"
