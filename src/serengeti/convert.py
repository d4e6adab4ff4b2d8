"""Convert published H3 / Hyena checkpoints (HazyResearch safari and H3 layouts) to serengeti.

Sources:

* ``safari-h3``: ``SSMLMHeadModel`` of the H3 repository (and safari's H3 LMs) — the released
  H3-125M / 355M / 1.3B / 2.7B ``model.pt`` files (``huggingface.co/danfu09/H3-*``): H3 blocks plus
  attention blocks (``mixer.Wqkv``) at some indices.
* ``safari-hyena``: safari's ``ConvLMHeadModel`` with Hyena blocks — e.g. Hyena-small 153M
  (``huggingface.co/Zymrael/hyena-small-150b-tok``).

Both are GPT-2-style backbones whose names map one-to-one onto :class:`~serengeti.models.backbone.
LMHeadModel` once the ``backbone.`` prefix is dropped (``backbone.embeddings.word_embeddings`` ->
``word_embeddings``, ``backbone.layers.i.{norm1,norm2,mlp.fc1,mlp.fc2}`` -> ``layers.i.…``,
``backbone.ln_f`` -> ``ln_f``; ``lm_head.weight`` is tied to the embedding and must equal it).
Mixer parameters:

==========================================  =======================  =========================================
reference (per layer ``backbone.layers.i.mixer.``)  serengeti (``layers.i.mixer.``)  conversion
==========================================  =======================  =========================================
H3 ``q_proj k_proj v_proj output_linear``   same                     copied
H3 ``ssm_k_kernel.kernel.B`` (D, N)         ``ssm_k_B`` (D, N)       copied (shift-SSM input vector)
H3 ``ssm_k_kernel.kernel.C`` (1, D, N)      ``ssm_k_C`` (D, N)       channel axis (must be 1) dropped
H3 ``ssm_k_D``, ``D``                       same                     copied
H3 ``kernel.kernel.C`` (1, H, N/2, 2)       ``C`` (H, N/2, 2)        channel axis dropped; used as stored
H3 ``kernel.kernel.log_dt`` (H,)            ``log_dt``               copied
H3 ``kernel.kernel.inv_A_real`` (S, N/2)    ``log_neg_A_real`` (H, N/2)  Re A = -exp(.) in both; rows tiled
H3 ``kernel.kernel.A_imag`` (S, N/2)        ``A_imag`` (H, N/2)      rows tiled
H3 ``kernel.kernel.B`` (S, N/2, 2)          ``B`` (H, N/2, 2)        rows tiled
attention ``Wqkv out_proj``                 same                     copied (layout ``(three heads head_dim)``)
Hyena ``in_proj out_proj short_filter``     same                     copied
Hyena ``filter_fn.{bias, pos_emb.z, pos_emb.t, implicit_filter.*, modulation.deltas}``  same  copied
==========================================  =======================  =========================================

Notes on parametrisation (exact conversions, no refitting):

* The reference stores the diagonal SSM's ``C`` as the real view of a complex tensor that was
  conjugated once at initialisation; its kernel uses the stored value directly
  (``K[l] = 2 Re Σ_n B_n C_n Δ/(1 − ΔA_n/2) · Ā_n^l``), as ours does, so it is copied unchanged.
* ``inv_A_real`` is ``log(−Re A)`` (the reference's default ``real_type='exp'``), identical to our
  ``log_neg_A_real``. With ``n_ssm`` = S < H independent (A, B) pairs the reference tiles row
  ``h % S`` to channel ``h``; we store the tiled (H, ·) tensors (the tie is not kept in training).
* Assumed (not recorded in a state dict): H3 diagonal SSM ``mode='diag'`` with bilinear
  discretisation (all released configs); Hyena ``normalized=False``, ``shift=0``, one head,
  ``inner_factor=1``, identity activation. Hyena's exponential modulation switch is not
  recoverable from the weights (``deltas`` is stored either way): pass ``modulate`` explicitly.
  safari trains Hyena-small with ``modulate: True`` but its LAMBADA eval config sets ``False``.
* Legacy names of the oldest checkpoints (``s4seq.encoder.``, ``embedding.``, ``backbone.norm``
  with post-norm LayerNorm positions, separate ``q_proj/k_proj/v_proj`` in attention layers,
  ``output_linear`` in Hyena) are remapped first, following the references' own ``load_state_dict``.
* Rotary attention (H3-2.7B ``model-2attn-rotary.pt``) is not supported: conversion stops with an error.

Usage::

    python -m serengeti.convert --from safari-h3 H3-125M/model.pt out/h3-125m --tokenizer ../shared/data/gpt2
    python -m serengeti.convert --from safari-hyena hyena-small.ckpt out/hyena-small --modulate false
    python evaluate.py ckpt=out/h3-125m ...

The output directory (``model.safetensors`` + ``config.json`` [+ ``tokenizer.json``]) is loadable
by :func:`serengeti.models.pretrained.load_model`.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

GPT2_VOCAB = 50257
# width -> attention heads of the released H3 models (H3 README: 125M 768/12, 355M 1024/16,
# 1.3B 2048/16, 2.7B 2560/20)
H3_HEADS = {768: 12, 1024: 16, 2048: 16, 2560: 20}


class ConversionError(ValueError):
    """The input is not a checkpoint of the expected layout; the message names the file and key."""


# --- reading -------------------------------------------------------------------------------------

def load_reference_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference state dict in ``path``, read with ``torch.load(weights_only=True)``.

    Accepts a plain state dict, a Lightning checkpoint (``state_dict`` with ``model.`` prefixes),
    or a dict with the state dict under ``model``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"input checkpoint not found: {path}")
    from serengeti.errors import CheckpointError
    from serengeti.io.checkpoint import load_weights_only

    try:
        obj = load_weights_only(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = {k[len("model."):] if k.startswith("model.") else k: v for k, v in obj["state_dict"].items()}
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConversionError(f"{path}: no tensors found")
    return state


def _layer_count(sd: Mapping[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def remap_legacy(sd: Mapping[str, torch.Tensor], *, hyena: bool = False) -> dict[str, torch.Tensor]:
    """Rename the oldest reference checkpoints' keys to the current reference layout.

    ``s4seq.encoder.`` -> ``backbone.``, ``embedding.`` -> ``backbone.embeddings.word_embeddings.``;
    a ``backbone.norm`` (old post-norm blocks: Mixer/MLP -> Dropout -> Add -> LN) moves every
    LayerNorm one position later: old ``norm`` -> ``layers.0.norm1``, old ``layers.l.norm1`` ->
    ``layers.l.norm2``, old ``layers.l-1.norm2`` -> ``layers.l.norm1``, old last ``norm2`` ->
    ``ln_f``. Attention layers with separate ``q_proj/k_proj/v_proj`` (and no SSM kernel) get a
    fused ``Wqkv``; for Hyena, ``mixer.output_linear`` -> ``mixer.out_proj``.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^s4seq\.encoder\.", "backbone.", k)
        k = re.sub(r"^embedding\.", "backbone.embeddings.word_embeddings.", k)
        k = re.sub(r"^backbone\.norm\.", "backbone.ln_0.", k)
        if hyena:
            k = re.sub(r"^(backbone\.layers\.\d+\.mixer\.)output_linear\.", r"\1out_proj.", k)
        out[k] = v
    n = _layer_count(out)
    if "backbone.ln_0.weight" in out:
        moved = {}
        for p in ("weight", "bias"):
            moved[f"backbone.layers.0.norm1.{p}"] = out.pop(f"backbone.ln_0.{p}")
            moved[f"backbone.ln_f.{p}"] = out.pop(f"backbone.layers.{n - 1}.norm2.{p}")
            for l in range(n):
                moved[f"backbone.layers.{l}.norm2.{p}"] = out.pop(f"backbone.layers.{l}.norm1.{p}")
                if l > 0:
                    moved[f"backbone.layers.{l}.norm1.{p}"] = out.pop(f"backbone.layers.{l - 1}.norm2.{p}")
        out.update(moved)
    for l in range(n):
        m = f"backbone.layers.{l}.mixer."
        if f"{m}q_proj.weight" in out and f"{m}kernel.kernel.log_dt" not in out and not hyena:
            for p in ("weight", "bias"):
                if f"{m}q_proj.{p}" in out:
                    out[f"{m}Wqkv.{p}"] = torch.cat([out.pop(f"{m}{x}_proj.{p}") for x in "qkv"], dim=0)
    return out


# --- shared backbone -----------------------------------------------------------------------------

class _Taker:
    """Pops reference tensors by name, with errors naming the file and the key."""

    kind = "reference"

    def __init__(self, sd: Mapping[str, torch.Tensor], source: str) -> None:
        self.sd, self.source = dict(sd), source

    def has(self, key: str) -> bool:
        return key in self.sd

    def peek(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ConversionError(f"{self.source}: expected key {key!r} is missing (not a {self.kind} checkpoint?)")
        return self.sd[key]

    def take(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        t = self.peek(key)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.source}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        del self.sd[key]
        return t

    def finish(self) -> None:
        if self.sd:
            keys = sorted(self.sd)
            hint = " (rotary attention is not supported)" if any("rotary" in k for k in keys) else ""
            raise ConversionError(f"{self.source}: {len(keys)} unconverted key(s), first {keys[0]!r}{hint}")


def _pad_multiple(vocab_size: int, rows: int, source: str) -> int:
    for m in (1, 8, 16, 32, 64, 128, 256):
        if math.ceil(vocab_size / m) * m == rows:
            return m
    raise ConversionError(f"{source}: embedding has {rows} rows; vocab_size={vocab_size} does not pad to it "
                          "with a multiple of 1, 8, ..., 256 (pass --vocab-size)")


def _backbone(t: _Taker, vocab_size: int | None) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """Embedding, norms, MLPs and head: ``(model cfg, our tensors, per-layer mixer prefixes)``."""
    emb = t.take("backbone.embeddings.word_embeddings.weight")
    rows, d_model = emb.shape
    n_layer = _layer_count(t.sd)
    if n_layer == 0:
        raise ConversionError(f"{t.source}: no backbone.layers.* keys")
    if vocab_size is None:
        vocab_size = GPT2_VOCAB if rows == math.ceil(GPT2_VOCAB / 8) * 8 else rows
    if vocab_size > rows:
        raise ConversionError(f"{t.source}: vocab_size={vocab_size} exceeds the embedding's {rows} rows")
    ours = {"word_embeddings.weight": emb}
    pos = "backbone.embeddings.position_embeddings.weight"
    max_pos = 0
    if t.has(pos):
        ours["position_embeddings.weight"] = t.take(pos)
        max_pos = ours["position_embeddings.weight"].shape[0]
    if t.has("lm_head.weight"):
        head = t.take("lm_head.weight", emb.shape)
        if not torch.equal(head, emb):
            raise ConversionError(f"{t.source}: lm_head.weight differs from the embedding; serengeti ties them")
    d_inner = t.peek("backbone.layers.0.mlp.fc1.weight").shape[0]
    for i in range(n_layer):
        for name, shape in (("norm1.weight", (d_model,)), ("norm1.bias", (d_model,)), ("norm2.weight", (d_model,)),
                            ("norm2.bias", (d_model,)), ("mlp.fc1.weight", (d_inner, d_model)), ("mlp.fc1.bias", (d_inner,)),
                            ("mlp.fc2.weight", (d_model, d_inner)), ("mlp.fc2.bias", (d_model,))):
            ours[f"layers.{i}.{name}"] = t.take(f"backbone.layers.{i}.{name}", shape)
    for p in ("weight", "bias"):
        ours[f"ln_f.{p}"] = t.take(f"backbone.ln_f.{p}", (d_model,))
    cfg = {"d_model": int(d_model), "n_layer": n_layer, "d_inner": int(d_inner), "vocab_size": int(vocab_size),
           "pad_vocab_size_multiple": _pad_multiple(vocab_size, rows, t.source), "max_position_embeddings": int(max_pos),
           "embed_dropout": 0.0, "resid_dropout": 0.0, "layer_norm_epsilon": 1e-5, "attn_layer_idx": [],
           "attn_cfg": {"num_heads": 1, "dropout": 0.0}, "l_max": None}
    return cfg, ours, [f"backbone.layers.{i}.mixer." for i in range(n_layer)]


def _attention(t: _Taker, src: str, dst: str, ours: dict) -> None:
    for name in ("Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"):
        if t.has(src + name):
            ours[dst + name] = t.take(src + name)


def _attention_layers(t: _Taker, prefixes: list[str]) -> list[int]:
    return [i for i, p in enumerate(prefixes) if t.has(p + "Wqkv.weight")]


def _num_heads(num_heads: int | None, d_model: int, source: str) -> int:
    if num_heads is None:
        if d_model not in H3_HEADS:
            raise ConversionError(f"{source}: has attention layers and d_model={d_model} is not a released width; "
                                  "pass --num-heads")
        num_heads = H3_HEADS[d_model]
    if d_model % num_heads:
        raise ConversionError(f"{source}: --num-heads {num_heads} does not divide d_model={d_model}")
    return int(num_heads)


def _split_layers(t: "_Taker", vocab_size: int | None, none_msg: str) -> tuple[dict, dict, list[str], list[int], list[int]]:
    """Backbone keys, then the block prefixes split into attention blocks and mixer blocks (at least one)."""
    cfg, ours, prefixes = _backbone(t, vocab_size)
    attn = _attention_layers(t, prefixes)
    mixers = [i for i in range(len(prefixes)) if i not in attn]
    if not mixers:
        raise ConversionError(f"{t.source}: {none_msg}")
    return cfg, ours, prefixes, attn, mixers


def _finish_attention(t: "_Taker", prefixes: list[str], attn: list[int], cfg: dict, ours: dict,
                      num_heads: int | None) -> None:
    """Convert the attention blocks, check no reference key is left, and record the hybrid config."""
    for i in attn:
        _attention(t, prefixes[i], f"layers.{i}.mixer.", ours)
    t.finish()
    if attn:
        cfg["attn_layer_idx"] = attn
        cfg["attn_cfg"] = {"num_heads": _num_heads(num_heads, cfg["d_model"], t.source), "dropout": 0.0}


# --- H3 ------------------------------------------------------------------------------------------

def convert_h3_state(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>", vocab_size: int | None = None,
                     num_heads: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reference ``SSMLMHeadModel`` state dict -> ``(serengeti model cfg, serengeti state dict)``."""
    t = _Taker(remap_legacy(sd), source)
    t.kind = "H3 (safari-h3)"
    cfg, ours, prefixes, attn, ssm_layers = _split_layers(t, vocab_size, "no H3 layers (no mixer.kernel.kernel.* keys)")
    D = cfg["d_model"]
    first = prefixes[ssm_layers[0]]
    N = t.peek(first + "ssm_k_kernel.kernel.B").shape[-1]
    H = t.peek(first + "D").shape[0]
    if D % H:
        raise ConversionError(f"{source}: {first}D has {H} entries, which does not divide d_model={D}")
    N2 = N // 2
    for i in ssm_layers:
        p, q = prefixes[i], f"layers.{i}.mixer."
        for name in ("q_proj", "k_proj", "v_proj", "output_linear"):
            ours[f"{q}{name}.weight"] = t.take(f"{p}{name}.weight", (D, D))
            ours[f"{q}{name}.bias"] = t.take(f"{p}{name}.bias", (D,))
        ours[q + "ssm_k_B"] = t.take(p + "ssm_k_kernel.kernel.B", (D, N))
        ours[q + "ssm_k_C"] = t.take(p + "ssm_k_kernel.kernel.C", (1, D, N))[0]
        ours[q + "ssm_k_D"] = t.take(p + "ssm_k_D", (D,))
        ours[q + "D"] = t.take(p + "D", (H,))
        ours[q + "log_dt"] = t.take(p + "kernel.kernel.log_dt", (H,))
        ours[q + "C"] = t.take(p + "kernel.kernel.C", (1, H, N2, 2))[0]
        S = t.peek(p + "kernel.kernel.inv_A_real").shape[0]
        if H % S:
            raise ConversionError(f"{source}: {p}kernel.kernel.inv_A_real has {S} rows, which does not divide H={H}")
        tile = lambda x: x.repeat(H // S, *([1] * (x.dim() - 1)))  # row h <- reference row h % S
        ours[q + "log_neg_A_real"] = tile(t.take(p + "kernel.kernel.inv_A_real", (S, N2)))
        ours[q + "A_imag"] = tile(t.take(p + "kernel.kernel.A_imag", (S, N2)))
        ours[q + "B"] = tile(t.take(p + "kernel.kernel.B", (S, N2, 2)))
    _finish_attention(t, prefixes, attn, cfg, ours, num_heads)
    cfg["mixer"] = {"_target_": "serengeti.mixers.H3", "_partial_": True, "d_state": int(N), "head_dim": D // H}
    return cfg, ours


# --- Hyena ---------------------------------------------------------------------------------------

def convert_hyena_state(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>", vocab_size: int | None = None,
                        num_heads: int | None = None, modulate: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reference ``ConvLMHeadModel`` (Hyena layers) state dict -> ``(serengeti model cfg, state dict)``."""
    t = _Taker(remap_legacy(sd, hyena=True), source)
    t.kind = "Hyena (safari-hyena)"
    cfg, ours, prefixes, attn, hy = _split_layers(t, vocab_size, "no Hyena layers (no mixer.filter_fn.* keys)")
    D = cfg["d_model"]
    first = prefixes[hy[0]]
    order = t.peek(first + "in_proj.weight").shape[0] // D - 1
    _, l_max, emb_dim = t.peek(first + "filter_fn.pos_emb.z").shape
    filter_order = t.peek(first + "filter_fn.implicit_filter.0.weight").shape[0]
    linears = sorted({int(m.group(1)) for k in t.sd
                      if (m := re.match(re.escape(first) + r"filter_fn\.implicit_filter\.(\d+)\.weight$", k))})
    num_inner_mlps = len(linears) - 2
    short = t.peek(first + "short_filter.weight").shape[-1]
    C, F_ = (order + 1) * D, D * (order - 1)
    if order < 2 or num_inner_mlps < 0 or linears != list(range(0, 2 * len(linears), 2)):
        raise ConversionError(f"{source}: {first}: unsupported Hyena shape (order {order}, filter layers {linears})")
    for i in hy:
        p, q = prefixes[i], f"layers.{i}.mixer."
        ours[q + "in_proj.weight"] = t.take(p + "in_proj.weight", (C, D))
        ours[q + "in_proj.bias"] = t.take(p + "in_proj.bias", (C,))
        ours[q + "out_proj.weight"] = t.take(p + "out_proj.weight", (D, D))
        ours[q + "out_proj.bias"] = t.take(p + "out_proj.bias", (D,))
        ours[q + "short_filter.weight"] = t.take(p + "short_filter.weight", (C, 1, short))
        ours[q + "short_filter.bias"] = t.take(p + "short_filter.bias", (C,))
        f, g = p + "filter_fn.", q + "filter_fn."
        ours[g + "bias"] = t.take(f + "bias", (F_,))
        ours[g + "pos_emb.z"] = t.take(f + "pos_emb.z", (1, l_max, emb_dim))
        ours[g + "pos_emb.t"] = t.take(f + "pos_emb.t", (1, l_max, 1))
        ours[g + "modulation.deltas"] = t.take(f + "modulation.deltas", (1, 1, F_))
        widths = [emb_dim] + [filter_order] * (len(linears) - 1) + [F_]
        for j, idx in enumerate(linears):
            out_dim = widths[j + 1]
            ours[f"{g}implicit_filter.{idx}.weight"] = t.take(f"{f}implicit_filter.{idx}.weight", (out_dim, widths[j]))
            if idx != linears[-1]:
                ours[f"{g}implicit_filter.{idx}.bias"] = t.take(f"{f}implicit_filter.{idx}.bias", (out_dim,))
        # one Sin module after every hidden Linear: its freq appears under each index (same tensor)
        sin_idx = [idx + 1 for idx in linears[:-1]]
        freqs = [t.take(f"{f}implicit_filter.{s}.freq", (1, filter_order)) for s in sin_idx if t.has(f"{f}implicit_filter.{s}.freq")]
        if not freqs:
            raise ConversionError(f"{source}: {f}implicit_filter.{sin_idx[0]}.freq is missing")
        if any(not torch.equal(x, freqs[0]) for x in freqs):
            raise ConversionError(f"{source}: {f}implicit_filter.*.freq differ; the reference shares one Sin module")
        for s in sin_idx:
            ours[f"{g}implicit_filter.{s}.freq"] = freqs[0]
    _finish_attention(t, prefixes, attn, cfg, ours, num_heads)
    cfg["l_max"] = int(l_max)
    cfg["mixer"] = {"_target_": "serengeti.mixers.Hyena", "_partial_": True, "order": int(order),
                    "filter_order": int(filter_order), "emb_dim": int(emb_dim), "num_inner_mlps": int(num_inner_mlps),
                    "short_filter_order": int(short), "modulate": bool(modulate), "shift": 0.0,
                    "lr_pos_emb": 1e-5, "dropout": 0.0}
    return cfg, ours


CONVERTERS: dict[str, Callable[..., tuple[dict, dict]]] = {
    "safari-h3": convert_h3_state,
    "safari-hyena": convert_hyena_state,
}


# --- end to end ----------------------------------------------------------------------------------

def _tokenizer_for(spec: str | None, vocab_size: int) -> tuple[Any, dict | None]:
    from serengeti.data.tokenizers import DEFAULT_EOS_TOKEN, load_tokenizer, tokenizer_record

    if spec is not None:
        tok = load_tokenizer(spec)
        if tok.vocab_size != vocab_size:
            raise ConversionError(f"--tokenizer {spec} has {tok.vocab_size} ids, the model's vocab_size is {vocab_size}")
        return tok, tokenizer_record(tok)
    if vocab_size == GPT2_VOCAB:  # the released models use the GPT-2 tokenizer
        return None, {"kind": "bpe", "name": "gpt2", "eos_token": DEFAULT_EOS_TOKEN, "vocab_size": GPT2_VOCAB}
    return None, None


def convert(source_format: str, in_path: str | os.PathLike, out_dir: str | os.PathLike, *, vocab_size: int | None = None,
            num_heads: int | None = None, modulate: bool | None = None, tokenizer: str | None = None,
            overwrite: bool = False) -> Path:
    """Convert a reference checkpoint file to an exported serengeti directory; returns its path.

    The model is built from the inferred config and loaded strictly (every parameter must be
    filled) before anything is written; the directory is written atomically by
    :func:`serengeti.io.checkpoint.save_pretrained`.
    """
    from serengeti.io.checkpoint import check_export_target, load_weights, save_pretrained
    from serengeti.training.lm_task import build_model

    if source_format not in CONVERTERS:
        raise ConversionError(f"--from {source_format!r}: expected one of {sorted(CONVERTERS)}")
    inputs = {"input": in_path, "--tokenizer": tokenizer}
    check_export_target(out_dir, overwrite=overwrite, inputs=inputs, key="out_dir")  # before reading gigabytes
    sd = load_reference_state(in_path)
    kwargs: dict[str, Any] = {"source": str(in_path), "vocab_size": vocab_size, "num_heads": num_heads}
    if source_format == "safari-hyena":
        kwargs["modulate"] = True if modulate is None else modulate
    elif modulate is not None:
        raise ConversionError("--modulate applies to --from safari-hyena only")
    model_cfg, state = CONVERTERS[source_format](sd, **kwargs)
    model = build_model(dict(model_cfg))
    dtype = model.word_embeddings.weight.dtype
    load_weights(model, {k: v.to(dtype) for k, v in state.items()}, in_path)
    tok, record = _tokenizer_for(tokenizer, model_cfg["vocab_size"])
    cfg = {"model": model_cfg, "tokenizer": record}
    return save_pretrained(model, cfg, out_dir, tokenizer=tok, overwrite=overwrite, inputs=inputs)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    ap = _OneLineParser(prog="python -m serengeti.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS),
                    help="layout of the input checkpoint")
    ap.add_argument("input", help="reference checkpoint (.pt / .ckpt), read with torch.load(weights_only=True)")
    ap.add_argument("out_dir", help="exported directory to write (model.safetensors + config.json)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="tokenizer vocabulary (default: 50257 for a 50264-row GPT-2 embedding, else the row count)")
    ap.add_argument("--num-heads", type=int, default=None,
                    help="attention heads of hybrid layers (default: the released H3 models' value for the width)")
    ap.add_argument("--modulate", type=_bool, default=None,
                    help="Hyena exponential modulation on/off (not stored in the weights; default true)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json or a local GPT-2 directory to copy into the export")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export at out_dir (nothing else)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.source_format, args.input, args.out_dir, vocab_size=args.vocab_size,
                      num_heads=args.num_heads, modulate=args.modulate, tokenizer=args.tokenizer,
                      overwrite=args.overwrite)
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"[serengeti.convert] error: {e}", file=sys.stderr)
        return 2
    print(f"[serengeti.convert] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
