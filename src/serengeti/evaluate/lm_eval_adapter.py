"""lm-evaluation-harness adapter: zero-shot downstream tasks (LAMBADA, PIQA, ...) on a serengeti LM.

The scoring logic lives in :class:`LMScorer`, which needs nothing from ``lm_eval``: requests are
``(context, continuation)`` / ``(text,)`` / ``(context, gen_kwargs)`` tuples, or any object with
an ``.args`` attribute holding one (lm_eval's ``Instance``). When ``lm_eval`` is importable,
:class:`SerengetiLM` wraps it as an ``lm_eval.api.model.LM`` registered under the name
``serengeti``, and :func:`run_lm_eval` runs ``lm_eval.simple_evaluate`` on it. ``lm_eval`` is an
optional extra: ``pip install -e ".[eval]"``.

Command line: lm_eval 0.4 finds models only in its own registry (no entry-point discovery), so a
plain ``lm_eval --model serengeti`` cannot see this module. :func:`cli` is lm_eval's own command
line with the model registered, installed as ``serengeti-lm-eval`` (same arguments)::

    serengeti-lm-eval --model serengeti --model_args pretrained=PATH --tasks lambada_openai
    serengeti-lm-eval --model serengeti --model_args pretrained=PATH --include_path my_tasks --tasks my_task

Conventions (what each method computes):

* ``loglikelihood``: ``log p(continuation | context)`` = the sum over continuation tokens of the
  log-softmax of the logits restricted to the tokenizer's vocabulary (``model.vocab_size``: the
  embedding's padding rows are not part of the distribution), and ``is_greedy`` = every
  continuation token is the argmax at its position. Whitespace at the end of the context is moved
  to the start of the continuation (BPE attaches a leading space to the next word). An empty
  context is replaced by the prefix token (end-of-text; for character vocabularies without one,
  the newline character). Contexts longer than the model's maximum length are cut on the left.
* ``loglikelihood_rolling``: ``log p(text)`` conditioned on the prefix token, every token scored
  exactly once. Texts longer than the maximum length are split into windows of ``max_length``
  inputs; a window that predicts tokens ``[a, b)`` is fed the ``max_length`` tokens ending just
  before ``b`` (so later windows overlap earlier ones to keep a full context) and scores only its
  last ``b - a`` positions.
* ``generate_until``: greedy (or, with ``do_sample``/``temperature > 0``, sampled) continuation
  by :func:`serengeti.models.generation.stream` (the model's recurrent mode: prefill + one ``step`` per
  token), stopped at the end-of-text token, at ``max_gen_toks``, or at the first ``until``
  string, which is cut from the returned text.

The maximum length is the model's own (``LMHeadModel.max_seq_len``: Hyena's ``l_max``, learned
positions), or :data:`DEFAULT_MAX_LENGTH` for models that take any length (H3, S5, Hyena-S5, the
long convolution, attention without positions).

Batches are padded on the right: the models are causal, so padding never changes the logits of
real positions.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from serengeti.models.generation import stream
from serengeti.training.accelerator import usable_device

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
INSTALL_HINT = 'pip install -e ".[eval]"   (or: pip install "lm_eval>=0.4")'


def _request_args(request: Any) -> tuple:
    """The argument tuple of a request: ``request.args`` for lm_eval ``Instance``s, else the tuple itself."""
    args = getattr(request, "args", request)
    if isinstance(args, str):
        return (args,)
    return tuple(args)


class LMScorer:
    """Log-likelihoods and generation for a serengeti :class:`~serengeti.models.backbone.LMHeadModel`.

    Args:
        model: the LM (eval mode is set here).
        tokenizer: anything with ``encode_batch(list[str]) -> list[list[int]]`` and
            ``decode(ids) -> str`` (serengeti's BPE and char tokenizers), or a Hugging Face-style
            ``encode(str)`` (returning ids or an object with ``.ids``).
        batch_size: sequences per forward pass in the scoring methods.
        max_length: longest input fed to the model, at most ``model.max_seq_len``; default:
            ``model.max_seq_len``, or :data:`DEFAULT_MAX_LENGTH` for a model that takes any length.
        prefix_token_id: conditions the first token of empty contexts and rolling texts; default:
            the tokenizer's ``eos_id``, else (character vocabularies) the id of ``"\\n"``; required
            when the tokenizer has neither.
        max_gen_toks: default budget of ``generate_until`` when the request sets none.
        seed: seed of the sampler used when a generation request asks for sampling.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int | None = None,
                 prefix_token_id: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234) -> None:
        if tokenizer is None:
            raise ValueError("lm_eval needs a text tokenizer: this checkpoint records none (synthetic-task model?); "
                             "pass tokenizer=<tokenizer.json or a local GPT-2 directory>")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = getattr(model, "max_seq_len", None)
        self.max_length = int(max_length or limit or DEFAULT_MAX_LENGTH)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length={self.max_length} exceeds the model's maximum sequence length {limit}")
        self.vocab_size = int(getattr(model, "vocab_size", model.lm_head.weight.shape[0]))
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.prefix_token_id = self._default_prefix() if prefix_token_id is None else int(prefix_token_id)
        if self.prefix_token_id is None:
            raise ValueError("prefix_token_id: the tokenizer has no end-of-text id and no newline character; pass "
                             f"prefix_token_id=<a token id in [0, {self.vocab_size})> to condition empty contexts")
        if not 0 <= self.prefix_token_id < self.vocab_size:
            raise ValueError(f"prefix_token_id={self.prefix_token_id} is not a token id in [0, {self.vocab_size})")
        self.max_gen_toks = int(max_gen_toks)
        self.seed = seed

    def _default_prefix(self) -> int | None:
        """End-of-text, else the newline of a vocabulary that has it as one token (char-level text)."""
        if self.eos_id is not None:
            return int(self.eos_id)
        try:
            ids = self.encode("\n")
        except ValueError:  # a character vocabulary without "\n"
            return None
        return ids[0] if len(ids) == 1 else None

    @property
    def model_device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # --- tokenizer ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        if not text:
            return []
        tok = self.tokenizer
        if hasattr(tok, "encode_batch") and not hasattr(tok, "get_vocab_size"):  # serengeti tokenizers
            return list(tok.encode_batch([text])[0])
        out = tok.encode(text)
        return list(getattr(out, "ids", out))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, ids)))

    # --- scoring core ------------------------------------------------------------------------
    @torch.no_grad()
    def score_sequences(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Score token targets at the end of token inputs.

        Args:
            items: ``(inputs, targets)`` pairs with ``1 <= len(targets) <= len(inputs) <=
                max_length``; the logits at the last ``len(targets)`` positions of ``inputs``
                predict ``targets`` (``targets[-1]`` follows ``inputs[-1]``).

        Returns:
            per item ``(sum of log-probabilities, all targets greedy)``, in the input order.
            Items are run longest first in batches of ``batch_size``, right-padded.
        """
        results: list[tuple[float, bool] | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        device = self.model_device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = len(items[chunk[0]][0])
            batch = torch.full((len(chunk), width), self.prefix_token_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                inp, tgt = items[i]
                if not 1 <= len(tgt) <= len(inp) <= self.max_length:
                    raise ValueError(f"cannot score {len(tgt)} targets after {len(inp)} inputs "
                                     f"(max_length={self.max_length})")
                batch[row, :len(inp)] = torch.as_tensor(list(inp), dtype=torch.long)
            logits = self.model(batch.to(device))[..., : self.vocab_size]
            work = torch.float64 if logits.dtype == torch.float64 else torch.float32
            logp = F.log_softmax(logits.to(work), dim=-1)
            for row, i in enumerate(chunk):
                inp, tgt = items[i]
                n, k = len(inp), len(tgt)
                lp = logp[row, n - k:n]  # (k, V)
                t = torch.as_tensor(list(tgt), dtype=torch.long, device=lp.device)
                total = lp.gather(-1, t[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == t).all().item())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    # --- lm_eval request types ---------------------------------------------------------------
    def _context_continuation_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        ctx = self.encode(context) or [self.prefix_token_id]
        return ctx, self.encode(continuation)

    def loglikelihood(self, requests: Iterable[Any]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(context, continuation)`` request."""
        items, empty = [], []
        for j, req in enumerate(requests):
            context, continuation = _request_args(req)[:2]
            ctx, cont = self._context_continuation_ids(context, continuation)
            if not cont:
                empty.append(j)
                items.append(None)
                continue
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length={self.max_length}")
            seq = (ctx + cont)[-(self.max_length + 1):]
            items.append((seq[:-1], cont))
        scored = iter(self.score_sequences([it for it in items if it is not None]))
        return [(0.0, True) if it is None else next(scored) for it in items]

    def rolling_windows(self, tokens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """``(inputs, targets)`` windows that score every token of ``tokens`` once (see module docstring)."""
        full = [self.prefix_token_id] + list(tokens)  # full[j + 1] = tokens[j], predicted from full[: j + 1]
        windows = []
        for a in range(0, len(tokens), self.max_length):
            b = min(a + self.max_length, len(tokens))
            start = max(0, b - self.max_length)
            windows.append((full[start:b], list(tokens[a:b])))
        return windows

    def loglikelihood_rolling(self, requests: Iterable[Any]) -> list[float]:
        """``log p(text)`` per ``(text,)`` request, conditioned on the prefix token."""
        owners, items = [], []
        reqs = list(requests)
        for j, req in enumerate(reqs):
            for w in self.rolling_windows(self.encode(_request_args(req)[0])):
                owners.append(j)
                items.append(w)
        totals = [0.0] * len(reqs)
        for j, (lp, _) in zip(owners, self.score_sequences(items)):
            totals[j] += lp
        return totals

    def generate_until(self, requests: Iterable[Any]) -> list[str]:
        """Continuation text per ``(context, gen_kwargs)`` request (see module docstring)."""
        out = []
        for req in requests:
            args = _request_args(req)
            context, kwargs = args[0], dict(args[1] if len(args) > 1 and args[1] else {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = self.generate_ids(self.encode(context) or [self.prefix_token_id], max_new,
                                    stop=lambda text: any(u in text for u in until), temperature=temperature)
            text = self.decode(ids)
            for u in until:
                text = text.split(u, 1)[0] if u else text
            out.append(text)
        return out

    def generate_ids(self, context: list[int], max_new: int, *, stop: Callable[[str], bool] | None = None,
                     temperature: float = 0.0) -> list[int]:
        """Generate up to ``max_new`` tokens after ``context`` (batch 1) with :func:`serengeti.models.generation.stream`.

        Greedy when ``temperature == 0``. Stops after an end-of-text token (kept out of the result)
        or once ``stop(decoded text so far)`` is true. The context is cut on the left so context +
        generation fits ``max_length``.
        """
        max_new = max(0, min(max_new, self.max_length - 1))
        if max_new == 0:
            return []
        context = context[-(self.max_length - max_new):]
        device = self.model_device
        gen = torch.Generator(device=device).manual_seed(self.seed) if temperature > 0 else None
        out: list[int] = []
        for tok in stream(self.model, torch.as_tensor([context], dtype=torch.long, device=device), max_new,
                          temperature=temperature, generator=gen, max_len=self.max_length):
            tok = int(tok[0])
            if tok == self.eos_id:
                break
            out.append(tok)
            if stop is not None and stop(self.decode(out)):
                break
        return out


def _lm_eval_available() -> bool:
    try:
        import lm_eval.api.model  # noqa: F401
        return True
    except ImportError:
        return False


SerengetiLM = None
if _lm_eval_available():
    import lm_eval.models  # noqa: F401  (lm_eval's own models, e.g. hf: a registry holding only ours would hide them)
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model

    @_register_model("serengeti")
    class SerengetiLM(_LM):  # type: ignore[no-redef]
        """lm_eval model ``serengeti``: ``--model serengeti --model_args pretrained=PATH[,tokenizer=...]``.

        Args (all optional except one of ``pretrained`` / ``model``):
            pretrained: a ``.ckpt`` from ``train.py`` or an exported directory
                (:func:`serengeti.models.pretrained.load_model`).
            model, tokenizer: an already loaded LM and tokenizer (``tokenizer`` may also be a
                tokenizer spec for ``pretrained``: a ``tokenizer.json`` or a local GPT-2 directory).
            device: default CUDA when available, else CPU; a CUDA device on a machine without CUDA (lm_eval's
                ``--device cuda``) falls back to the CPU with a warning (:func:`serengeti.training.accelerator.usable_device`).
            batch_size, max_length, max_gen_toks, prefix_token_id: see :class:`LMScorer`.
        """

        def __init__(self, pretrained: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                     tokenizer: Any = None, device: str | None = None, batch_size: int | str = 8,
                     max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                     prefix_token_id: int | None = None, **unused: Any) -> None:
            super().__init__()
            if unused:
                log.warning("serengeti lm_eval adapter ignores arguments %s", sorted(unused))
            if model is None:
                if pretrained is None:
                    raise ValueError("the serengeti lm_eval model needs pretrained=<checkpoint path> or model=<LMHeadModel>")
                from serengeti.models.pretrained import load_model

                model, _, tokenizer = load_model(pretrained, device=usable_device(device), tokenizer=tokenizer)
            elif device is not None:
                model = model.to(usable_device(device))
            batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
            self.scorer = LMScorer(model, tokenizer, batch_size=batch_size, max_length=max_length and int(max_length),
                                   max_gen_toks=int(max_gen_toks), prefix_token_id=prefix_token_id)
            self._device = self.scorer.model_device

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

        @property
        def eot_token_id(self) -> int:
            return self.scorer.prefix_token_id

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return self.scorer.encode(string)

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.scorer.decode(tokens)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.scorer.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return self.scorer.generate_until(requests)


def task_manager(include_path: str | os.PathLike | None, tasks: Sequence[str | dict]) -> Any:
    """An lm_eval ``TaskManager`` that also knows the task YAMLs under ``include_path`` (``None``: lm_eval's own).

    Indexing lm_eval's thousands of built-in tasks takes seconds, so when every named task is found
    under ``include_path`` the built-in ones are left out.
    """
    if include_path is None:
        return None
    from lm_eval.tasks import TaskManager

    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"include_path={include_path}: not a directory (expected a directory of lm_eval task YAMLs)")
    local = TaskManager(include_path=str(path), include_defaults=False)
    names = [t for t in tasks if isinstance(t, str)]
    if all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=str(path))


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str | dict], *, num_fewshot: int | None = None,
                limit: int | float | None = None, batch_size: int = 8, max_length: int | None = None,
                device: str | None = None, include_path: str | os.PathLike | None = None,
                prefix_token_id: int | None = None, **simple_evaluate_kwargs: Any) -> dict:
    """Run lm-evaluation-harness tasks (e.g. ``["lambada_openai", "piqa"]``) on a loaded model.

    Args:
        model, tokenizer: from :func:`serengeti.models.pretrained.load_model`.
        tasks: lm_eval task names (or task config dicts).
        num_fewshot, limit: passed to ``lm_eval.simple_evaluate`` (``limit``: examples per task).
        batch_size, max_length, device, prefix_token_id: see :class:`LMScorer`.
        include_path: a directory of local task YAMLs whose ``task:`` names may appear in ``tasks``.
        **simple_evaluate_kwargs: any other ``simple_evaluate`` argument.

    Returns:
        The dict returned by ``lm_eval.simple_evaluate`` (per-task metrics under ``"results"``).

    Raises:
        ImportError: lm_eval is not installed (the message says how to install it).
        ValueError: no tasks, or a bad ``include_path`` / ``prefix_token_id``.
    """
    if SerengetiLM is None:
        raise ImportError(f"task=lm_eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
    if not tasks:
        raise ValueError("tasks is empty: pass lm_eval task names, e.g. tasks=[lambada_openai,piqa]")
    import lm_eval

    lm = SerengetiLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device,
                     prefix_token_id=prefix_token_id)
    simple_evaluate_kwargs.setdefault("task_manager", task_manager(include_path, tasks))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      **simple_evaluate_kwargs)
    if results is None:  # non-zero ranks in a distributed run
        return {}
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """``serengeti-lm-eval``: lm_eval's command line (same arguments) with the ``serengeti`` model registered.

    Bad input (a missing checkpoint, an unknown task, a bad ``prefix_token_id``) exits with one line.
    """
    if SerengetiLM is None:
        raise SystemExit(f"error: serengeti-lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ValueError as e:  # CheckpointError, LMScorer's and lm_eval's own input errors
        raise SystemExit(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
