"""The language model: embedding -> N pre-norm residual blocks -> final norm -> tied LM head.

One block, in the reference order (docs/architecture.md)::

    residual = dropout1(h) + residual        # block 0: residual = dropout1(embeddings)
    h        = mixer(LN1(residual))
    residual = dropout2(h) + residual
    h        = mlp(LN2(residual))             # returned with residual to the next block

and after the last block ``h = LN_f(dropout(h) + residual)``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.nn.modules.module as nn_module
from torch import nn

from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import check_weights, first_line, load_weights, read_checkpoint, save_pretrained
from serengeti.mixers.attention import Attention
from serengeti.ops.init import lecun_normal_
from serengeti.ops.short_conv import ShortConv

MixerFactory = Callable[..., nn.Module]


GELU_APPROXIMATIONS = {"tanh": "tanh", "exact": "none"}  # model.gelu -> torch's ``approximate``
POSITIONS = ("learned", "rotary", "none")  # model.positions
NORMS = ("layernorm", "rmsnorm")  # model.norm
MLPS = ("gelu", "swiglu")  # model.mlp


class MLP(nn.Module):
    """fc1 -> GELU -> fc2. x: (B, L, D) -> (B, L, D).

    ``gelu``: ``tanh`` (the approximation of the papers' code) or ``exact`` (erf, as nanoGPT's
    ``nn.GELU()``); ``bias``: biases in fc1 and fc2.
    """

    def __init__(self, d_model: int, d_inner: int, gelu: str = "tanh", bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"model.gelu must be one of {sorted(GELU_APPROXIMATIONS)}, got {gelu!r}")
        self.approximate = GELU_APPROXIMATIONS[gelu]
        self.fc1 = nn.Linear(d_model, d_inner, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_inner, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def swiglu_hidden(d_inner: int) -> int:
    """SwiGLU width for a GELU width ``d_inner``: 2/3 d_inner rounded to the nearest multiple of 8 (at least 8).

    SwiGLU has three D x hidden matrices where the GELU MLP has two D x d_inner ones, so this keeps the
    MLP's parameter count (3 D hidden ~ 2 D d_inner): d_inner 3072 -> 2048, 256 -> 168, 128 -> 88.
    """
    return max(8, 8 * round(2 * d_inner / 24))


class SwiGLU(nn.Module):
    """fc1 -> (value, gate) -> value * SiLU(gate) -> fc2. x: (B, L, D) -> (B, L, D).

    ``fc1``: D -> 2 hidden (value and gate side by side), ``fc2``: hidden -> D, hidden =
    :func:`swiglu_hidden` (``d_inner``); ``bias``: biases in fc1 and fc2.
    """

    def __init__(self, d_model: int, d_inner: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        hidden = swiglu_hidden(d_inner)
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))


def make_mlp(kind: str, d_model: int, d_inner: int, *, gelu: str, bias: bool, device=None, dtype=None) -> nn.Module:
    """``model.mlp``: ``gelu`` (:class:`MLP`) or ``swiglu`` (:class:`SwiGLU`, width from :func:`swiglu_hidden`)."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_inner, bias=bias, device=device, dtype=dtype)
    return MLP(d_model, d_inner, gelu=gelu, bias=bias, device=device, dtype=dtype)


def make_norm(kind: str, d_model: int, *, eps: float, bias: bool, device=None, dtype=None) -> nn.Module:
    """``model.norm``: ``layernorm`` (with a bias when ``bias``) or ``rmsnorm`` (scale only)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(d_model, eps=eps, bias=bias, device=device, dtype=dtype)


class Block(nn.Module):
    """Pre-norm residual block around one mixer and one MLP (see the module docstring).

    ``norm``, ``mlp``: the kinds of :func:`make_norm` and :func:`make_mlp`.
    """

    def __init__(self, d_model: int, mixer: nn.Module, d_inner: int, *, dropout1: float, dropout2: float,
                 eps: float = 1e-5, gelu: str = "tanh", bias: bool = True, norm: str = "layernorm",
                 mlp: str = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        self.mixer = mixer
        self.dropout1 = nn.Dropout(dropout1)
        self.norm1 = make_norm(norm, d_model, eps=eps, bias=bias, device=device, dtype=dtype)
        self.dropout2 = nn.Dropout(dropout2)
        self.norm2 = make_norm(norm, d_model, eps=eps, bias=bias, device=device, dtype=dtype)
        self.mlp = make_mlp(mlp, d_model, d_inner, gelu=gelu, bias=bias, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, state: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h, residual: (B, L, D) (residual None at block 0) -> (h, residual)."""
        residual = self.dropout1(h) + residual if residual is not None else self.dropout1(h)
        x = self.norm1(residual)
        h = self.mixer(x) if state is None else self.mixer(x, state=state)
        residual = self.dropout2(h) + residual
        return self.mlp(self.norm2(residual)), residual

    def step(self, h: torch.Tensor, residual: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: h, residual (B, D); dropout is inactive in generation."""
        residual = h + residual if residual is not None else h
        y, _ = self.mixer.step(self.norm1(residual), state)
        residual = y + residual
        return self.mlp(self.norm2(residual)), residual


@dataclass
class GenerationState:
    """Per-layer mixer states plus the number of positions consumed so far."""

    layers: dict[int, Any] = field(default_factory=dict)
    offset: int = 0
    max_len: int = 0


class LMHeadModel(nn.Module):
    """Causal LM over a configurable mixer.

    Args:
        d_model, n_layer: width and depth.
        vocab_size: tokenizer vocabulary; padded up to ``pad_vocab_size_multiple``.
        mixer: factory ``mixer(d_model, layer_idx=i, l_max=l_max, device=, dtype=)`` for ordinary blocks.
        d_inner: MLP width (default 4 * d_model); with ``mlp="swiglu"`` the GELU width whose parameter
            count the SwiGLU keeps (hidden = :func:`swiglu_hidden` (d_inner) = 2/3 d_inner rounded to 8).
        attn_layer_idx: block indices that use attention instead (hybrids).
        attn_cfg: keyword arguments of :class:`Attention` for those blocks (num_heads, dropout, ...).
        positions: ``learned`` (an absolute position table of ``max_position_embeddings`` rows added to
            the embeddings), ``rotary`` (every attention block rotates its queries and keys; needs at
            least one attention block) or ``none``. ``None`` (the default, and configs written before
            this option): ``learned`` when ``max_position_embeddings > 0``, else ``none``.
        max_position_embeddings: rows of the learned table; must be > 0 with ``learned`` and 0 otherwise.
        l_max: maximum sequence length, passed to mixers that size filters by it.
        embed_dropout: dropout on the embeddings (block 0's dropout1); resid_dropout: every other dropout.
        initializer_range: std of the ``gpt2`` init (see :func:`_init_weights`).
        init_scheme: ``gpt2`` (safari's LMs, the default) or ``lecun`` (the Flax defaults of the S5
            authors' JAX LM, see :func:`_init_lecun`).
        gelu: the MLP's GELU, ``tanh`` (default) or ``exact``.
        bias: biases in the MLPs and LayerNorms (the mixers' own layers keep theirs; attention
            takes ``attn_cfg.bias``).
        norm: ``layernorm`` (default) or ``rmsnorm``, for every norm of the backbone.
        mlp: ``gelu`` (default, :class:`MLP`) or ``swiglu`` (:class:`SwiGLU`).

    Transformer++ (``configs/model/transformer_pp.yaml``) is attention with ``positions="rotary"``,
    ``norm="rmsnorm"``, ``mlp="swiglu"`` and no biases.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_layer: int,
        vocab_size: int,
        mixer: MixerFactory,
        d_inner: int | None = None,
        attn_layer_idx: Sequence[int] = (),
        attn_cfg: dict | None = None,
        positions: str | None = None,
        max_position_embeddings: int = 0,
        l_max: int | None = None,
        embed_dropout: float = 0.1,
        resid_dropout: float = 0.0,
        pad_vocab_size_multiple: int = 1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        init_scheme: str = "gpt2",
        gelu: str = "tanh",
        bias: bool = True,
        norm: str = "layernorm",
        mlp: str = "gelu",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for key, value, allowed in (("init_scheme", init_scheme, INIT_SCHEMES), ("norm", norm, NORMS), ("mlp", mlp, MLPS)):
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {sorted(allowed)}, got {value!r}")
        attn_layer_idx = list(attn_layer_idx or [])
        bad = [i for i in attn_layer_idx if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"model.attn_layer_idx {bad} out of range for model.n_layer={n_layer}")
        max_position_embeddings = max_position_embeddings or 0
        self.positions = _check_positions(positions, max_position_embeddings)
        self.vocab_size = vocab_size
        self.padded_vocab_size = math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
        self.max_position_embeddings = max_position_embeddings
        self.l_max = l_max
        d_inner = d_inner or 4 * d_model
        rotary = self.positions == "rotary"
        attn_factory = functools.partial(Attention, **(attn_cfg or {}), rotary=rotary)
        if rotary:
            if _builds_attention(mixer):
                mixer = functools.partial(mixer, rotary=True)
            elif not attn_layer_idx:
                raise ValueError("model.positions=rotary rotates the queries and keys of attention blocks, but this "
                                 "model has none (model.mixer is not attention and model.attn_layer_idx is empty)")

        self.word_embeddings = nn.Embedding(self.padded_vocab_size, d_model, device=device, dtype=dtype)
        self.position_embeddings = (
            nn.Embedding(max_position_embeddings, d_model, device=device, dtype=dtype) if max_position_embeddings > 0 else None
        )
        self.layers = nn.ModuleList()
        for i in range(n_layer):
            factory = attn_factory if i in attn_layer_idx else mixer
            block_mixer = factory(d_model, layer_idx=i, l_max=l_max, device=device, dtype=dtype)
            self.layers.append(Block(d_model, block_mixer, d_inner, dropout1=embed_dropout if i == 0 else resid_dropout,
                                     dropout2=resid_dropout, eps=layer_norm_epsilon, gelu=gelu, bias=bias,
                                     norm=norm, mlp=mlp, device=device, dtype=dtype))
        self.drop_f = nn.Dropout(resid_dropout)
        self.ln_f = make_norm(norm, d_model, eps=layer_norm_epsilon, bias=bias, device=device, dtype=dtype)
        self.lm_head = nn.Linear(d_model, self.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.lm_head.weight = self.word_embeddings.weight  # tied
        self.lm_head._no_reinit = True  # its weight is the embedding's: initialised as an Embedding, not a Linear
        self.apply(functools.partial(INIT_SCHEMES[init_scheme], n_layer=n_layer, initializer_range=initializer_range))

    @property
    def max_seq_len(self) -> int | None:
        """Longest input the model accepts (the bound of :meth:`length_limit`); ``None`` = any length
        (e.g. S5, Hyena-S5, H3, the long convolution, and attention without learned positions)."""
        limit = self.length_limit()
        return None if limit is None else limit[0]

    def length_limit(self) -> tuple[int, str] | None:
        """``(bound, reason)`` of the tightest length bound, the reason naming its config key; ``None`` = any length.

        The bounds: learned positions (``model.max_position_embeddings``) and each mixer's
        ``max_seq_len`` (a module without one counts as bounded by ``l_max``).
        """
        limits = []
        if self.position_embeddings is not None:
            n = self.max_position_embeddings
            limits.append((n, f"learned positions end at model.max_position_embeddings={n}"))
        for i, layer in enumerate(self.layers):
            bound = getattr(layer.mixer, "max_seq_len", self.l_max)
            if bound is not None:
                why = layer.mixer.max_seq_len_reason() if hasattr(layer.mixer, "max_seq_len_reason") else f"model.l_max={bound}"
                limits.append((bound, f"{type(layer.mixer).__name__} (block {i}): {why}"))
        return min(limits, key=lambda limit: limit[0], default=None)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """input_ids: (B, L) -> (B, L, D)."""
        h = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            L = input_ids.shape[-1]
            if offset + L > self.max_position_embeddings:
                raise ValueError(f"sequence of {offset + L} tokens exceeds model.max_position_embeddings={self.max_position_embeddings}")
            pos = torch.arange(offset, offset + L, device=input_ids.device)
            h = h + self.position_embeddings(pos)
        return h

    def forward(self, input_ids: torch.Tensor, state: GenerationState | None = None, num_last_tokens: int = 0) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, L, padded_vocab). With ``state``: prefill, state left after the prompt.

        ``num_last_tokens > 0`` returns only the last positions' logits (B, n, padded_vocab): a prefill
        needs just the last one, and the LM head over a long prompt would otherwise dominate its cost.
        """
        offset = state.offset if state is not None else 0
        if state is not None and offset + input_ids.shape[-1] > state.max_len:
            raise ValueError(f"prompt of {input_ids.shape[-1]} tokens after {offset} exceeds the state's max_len={state.max_len}")
        h, residual = self.embed(input_ids, offset), None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, None if state is None else state.layers[i])
        if state is not None:
            state.offset += input_ids.shape[-1]
        if num_last_tokens > 0:
            h, residual = h[:, -num_last_tokens:], residual[:, -num_last_tokens:]
        return self.lm_head(self.ln_f(self.drop_f(h) + residual))

    @torch.no_grad()
    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> GenerationState:
        """Empty per-layer states for generating up to ``max_len`` positions in total."""
        ref = self.word_embeddings.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        layers = {i: layer.mixer.allocate_state(batch_size, max_len=max_len, device=device, dtype=dtype)
                  for i, layer in enumerate(self.layers)}
        return GenerationState(layers=layers, offset=0, max_len=max_len)

    def step(self, token_ids: torch.Tensor, state: GenerationState) -> torch.Tensor:
        """One token per sequence: token_ids (B,) -> logits (B, padded_vocab); advances ``state``."""
        if state is None:
            raise RuntimeError("LMHeadModel.step needs a state: call allocate_state(batch_size, max_len) first")
        if state.offset >= state.max_len:
            raise ValueError(f"generation state is full (max_len={state.max_len})")
        h, residual = self.embed(token_ids[:, None], state.offset)[:, 0], None
        for i, layer in enumerate(self.layers):
            h, residual = layer.step(h, residual, state.layers[i])
        state.offset += 1
        return self.lm_head(self.ln_f(h + residual))

    # Hugging Face-style loading: serengeti.io.checkpoint reads and writes the files (config checked first)
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LMHeadModel:
        """Load an exported directory (``model.safetensors`` + ``config.json``) or a ``.ckpt`` from ``train.py``.

        No pickled code runs (:func:`serengeti.io.checkpoint.read_checkpoint`) and the config is
        checked against the registered mixers and the weights' shapes before anything is allocated
        (:func:`build_checked`). The
        model is in eval mode; its config (``model`` and, when recorded, ``dataset`` and
        ``tokenizer``) is ``pretrained_config``. The tokenizer: :func:`serengeti.load_tokenizer`.

        Raises:
            CheckpointError: naming ``path``, for a missing or unreadable file, a config that
                cannot be built, or weights that do not match it.
        """
        cfg, state = read_checkpoint(path)
        model = build_checked(cfg["model"], state, path)
        model.to(device).eval()
        model.pretrained_config, model.pretrained_path = cfg, str(path)
        return model

    def save_pretrained(self, out: str | os.PathLike, *, config: dict | None = None, tokenizer: Any = None,
                        overwrite: bool = False) -> Path:
        """Write ``out`` = ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``); returns ``out``.

        Args:
            config: ``{"model": ..., "dataset": ..., "tokenizer": <record>}``; default: the
                ``pretrained_config`` of :meth:`from_pretrained`.
            tokenizer: a BPE tokenizer whose ``tokenizer.json`` goes in; default: the one the
                loaded checkpoint recorded (char vocabularies live in ``config.json``).
            overwrite: replace an existing ``out`` (atomically, see :func:`serengeti.io.checkpoint.save_pretrained`).
        """
        # imported here: serengeti.data imports Lightning, which imports transformers, whose serengeti
        # registration (serengeti.models.hf) imports this module
        from serengeti.data.tokenizers import recorded_tokenizer

        config = config if config is not None else getattr(self, "pretrained_config", None)
        if config is None:
            raise ValueError("save_pretrained needs config={'model': <model config>, ...}: "
                             "this model was not loaded with LMHeadModel.from_pretrained")
        if tokenizer is None:
            source = getattr(self, "pretrained_path", None)
            tokenizer = recorded_tokenizer(config, source if source and Path(source).is_dir() else None)
        return save_pretrained(self, config, out, tokenizer=tokenizer, overwrite=overwrite)


def _check_positions(positions: str | None, max_position_embeddings: int) -> str:
    """The ``model.positions`` kind, checked against the learned table size (``None``: from the table size)."""
    if positions is None:
        return "learned" if max_position_embeddings > 0 else "none"
    if positions not in POSITIONS:
        raise ValueError(f"model.positions must be one of {list(POSITIONS)}, got {positions!r}")
    if positions == "learned" and max_position_embeddings <= 0:
        raise ValueError("model.positions=learned needs model.max_position_embeddings > 0 (the table size, e.g. ${model.l_max})")
    if positions != "learned" and max_position_embeddings > 0:
        raise ValueError(f"model.max_position_embeddings={max_position_embeddings} sizes a learned position table, but "
                         f"model.positions={positions}: set model.max_position_embeddings=0")
    return positions


def _builds_attention(factory: MixerFactory) -> bool:
    """Whether ``factory`` (a class or a ``functools.partial`` of one) builds :class:`Attention`."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    return isinstance(target, type) and issubclass(target, Attention)


#: keys of a ``model`` config that are not LMHeadModel arguments (the preset's name; ``compile``, applied by train.py)
NON_MODEL_KEYS = {"name", "compile"}
#: what the backbone passes to every mixer factory itself; a config may not set these
#: (``rotary`` follows ``model.positions``)
_MIXER_CALL_ARGS = {"d_model", "layer_idx", "l_max", "device", "dtype", "rotary"}


def build_model(model_cfg: dict[str, Any], **overrides: Any) -> LMHeadModel:
    """Build the LM from a plain, resolved ``model`` config; ``overrides`` (e.g. ``device="meta"``) win.

    Nothing is instantiated by name: ``mixer._target_`` must be a registered mixer and every option a
    plain value that the class declares (:mod:`serengeti.registry`), so a config read from a checkpoint
    cannot run code, and a misspelt option fails here with a one-line :class:`UnsafeConfigError`.
    """
    import serengeti.mixers  # noqa: F401  (registers the built-in mixers)
    from serengeti.errors import UnsafeConfigError
    from serengeti.registry import MIXERS, build, check_options

    cfg = {k: v for k, v in dict(model_cfg).items() if k not in NON_MODEL_KEYS}
    mixer_cfg = cfg.pop("mixer", None)
    if not isinstance(mixer_cfg, dict) or "_target_" not in mixer_cfg:
        raise UnsafeConfigError("model.mixer must be a config with a _target_ (pick one from configs/model/mixer/)")
    mixer = build(mixer_cfg, MIXERS, "model.mixer", exclude=_MIXER_CALL_ARGS, require_partial=True)
    check_options(LMHeadModel, cfg, "model", exclude={"mixer"})
    if isinstance(cfg.get("attn_cfg"), dict):
        check_options(Attention, cfg["attn_cfg"], "model.attn_cfg", exclude=_MIXER_CALL_ARGS)
    return LMHeadModel(mixer=mixer, **{**cfg, **overrides})


def build_checked(model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                  source: str | os.PathLike) -> LMHeadModel:
    """The model a stored config describes, with ``state`` loaded, after checking the config against
    the weights' shapes.

    A stored config's sizes are not trusted: ``n_layer`` must be the number of layers in the weights,
    and the model is first built on the meta device (no memory), stopped once it registers more
    parameters and buffers than the weights hold, and compared shape by shape. Only then is it allocated.

    Raises:
        CheckpointError: naming ``source`` and the first key that disagrees.
    """
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    n_layer = model_cfg.get("n_layer")
    if layers and n_layer != max(layers) + 1:
        raise CheckpointError(f"{source}: model.n_layer={n_layer!r} in its config, but its weights hold "
                              f"{max(layers) + 1} layers")
    with torch.device("meta"):  # no memory: the shapes are checked before the real build allocates
        check_weights(_build_bounded(model_cfg, state, source), state, source)
    model = _build_bounded(model_cfg, state, source)
    load_weights(model, state, source)
    return model


def _build_bounded(model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str | os.PathLike):
    try:
        with _at_most_registered(state, source):
            return build_model(dict(model_cfg))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source}: cannot build the model from its config ({first_line(e)})") from e


@contextlib.contextmanager
def _at_most_registered(state: Mapping[str, torch.Tensor], source: str | os.PathLike, slack: int = 64):
    """Stop a model build that registers ``slack`` more parameters and buffers than ``state`` holds (a
    config describing far more than its weights: too many layers, filters or heads) before it takes minutes."""
    count = 0

    def hook(module, name, value):
        nonlocal count
        count += 1
        if count > len(state) + slack:
            raise CheckpointError(f"{source}: its config describes more tensors than the {len(state)} its weights "
                                  f"hold (stopped building at {type(module).__name__}.{name})")

    handles = [nn_module.register_module_parameter_registration_hook(hook),
               nn_module.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """GPT-2 init: Linear/Embedding N(0, 0.02), zero bias; ``out_proj``/``fc2`` weights N(0, 0.02/sqrt(2 n_layer)).

    Mixers keep their own init for their own parameters: only ``nn.Linear``/``nn.Embedding`` are touched,
    and a mixer whose Linear must keep a custom init marks it with ``_no_reinit = True``.
    """
    if getattr(module, "_no_reinit", False):
        return
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    _init_output_projections(module, n_layer, initializer_range)


def _init_lecun(module: nn.Module, n_layer: int, initializer_range: float | None = None) -> None:
    """The Flax defaults of the S5 authors' JAX LM (docs/architecture.md); ``initializer_range`` is unused.

    Linear weights and the short conv's taps: truncated normal (±2σ) with std 1/sqrt(fan_in)
    (fan_in = in_features, resp. the K taps of the depthwise conv), zero bias; Embedding
    N(0, 1/d); ``out_proj``/``fc2`` weights N(0, 0.02/sqrt(2 n_layer)) as in GPT-2. Against
    the gpt2 init at d_model 64 the gated products x_0 ⊙ S5(x_1 ⊙ v) start ~20x larger, and
    Hyena-S5 learns associative recall far sooner (experiments.md, Hyena-S5).
    """
    if getattr(module, "_no_reinit", False):
        return
    if isinstance(module, (nn.Linear, ShortConv)):
        fan_in = module.weight[0].numel()  # Linear (out, in) -> in; depthwise conv (C, 1, K) -> K
        lecun_normal_(module.weight, fan_in)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)
    _init_output_projections(module, n_layer, 0.02)


def _init_output_projections(module: nn.Module, n_layer: int, std: float) -> None:
    """GPT-2's residual-branch rescale: children named ``out_proj``/``fc2`` get N(0, std/sqrt(2 n_layer))."""
    for name, child in module.named_children():
        if name in ("out_proj", "fc2") and isinstance(child, nn.Linear) and not getattr(child, "_no_reinit", False):
            nn.init.normal_(child.weight, std=std / math.sqrt(2 * n_layer))


INIT_SCHEMES = {"gpt2": _init_weights, "lecun": _init_lecun}
