"""The checkpoint and export file formats, read and written without executing pickled code.

Two formats are read:

* a Lightning ``.ckpt`` written by ``train.py``: ``torch.load(weights_only=True)``; the plain run
  config is ``ckpt["hyper_parameters"]["cfg"]`` (stored by :class:`~serengeti.training.lm_task.LMTask`) and
  the weights are ``ckpt["state_dict"]`` under the ``model.`` prefix;
* an exported directory: ``model.safetensors`` + ``config.json`` holding the
  resolved ``model`` config, the ``dataset`` config and a ``tokenizer`` record, plus
  ``tokenizer.json`` for BPE tokenizers, so the directory is self-contained.

The config dict returned by :func:`read_checkpoint` always has ``model``; ``dataset`` and ``tokenizer``
are present when the checkpoint recorded them. A tokenizer record (written and read by
:mod:`serengeti.data.tokenizers`) is one of::

    {"kind": "char", "chars": "...", "eos": bool, "vocab_size": V, "fingerprint": ...}
    {"kind": "bpe", "name": "gpt2" | path | {vocab, merges}, "eos_token": ..., "vocab_size": V, "fingerprint": ...}
    {"kind": "ids", "vocab_size": V}       # synthetic tasks: no text, token ids are the interface

This module knows files, not models: it takes and gives state dicts and plain configs. Building
the model from them is :meth:`serengeti.models.backbone.LMHeadModel.from_pretrained`;
:mod:`serengeti.models.pretrained` adds the tokenizer (``load_model``) and ``export``.

Public API: :func:`read_checkpoint`, :func:`load_weights_only`, :func:`load_weights`, :func:`save_pretrained`,
:func:`check_export_target`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from serengeti.errors import CheckpointError
from serengeti.io.atomic import input_clash, no_space, replace_dir, temp_path

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
#: every file an export may hold
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME)
FORMAT_VERSION = 1
#: what ``config.json`` tells ``transformers`` (serengeti.models.hf registers these names)
HF_MODEL_TYPE = "serengeti"
HF_ARCHITECTURE = "SerengetiForCausalLM"


# -- reading ---------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(cfg, state_dict)`` of a ``.ckpt`` file or an exported directory; weights on CPU.

    Raises:
        CheckpointError: missing path, unreadable/truncated file, or no serengeti config inside.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .ckpt from train.py or a directory "
                              f"written by `evaluate.py task=export`, with {WEIGHTS_NAME} + {CONFIG_NAME})")
    if path.is_dir():
        cfg, state = _read_export(path)
        check_stored_config(cfg, path)
        return cfg, state
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: no 'hyper_parameters.cfg.model' (not written by serengeti's train.py?)")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path}: 'state_dict' holds no 'model.*' weights")
    check_stored_config(cfg, path)
    return cfg, state


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled code
    (even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set, which yields to an explicit argument).

    Raises:
        CheckpointError: naming the file, for a truncated or foreign file or one carrying code.
    """
    check_inflation(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first_line(e)})") from e


#: a .ckpt may declare at most this many bytes beyond its own size (torch.save stores members uncompressed)
INFLATION_SLACK = 1 << 20


def check_inflation(path: str | os.PathLike) -> None:
    """Refuse a zip-format checkpoint whose members would inflate to more than the file itself holds.

    ``torch.save`` writes its zip members uncompressed, so what they declare adds up to about the
    file's size; a deflated member (a zip bomb: megabytes that inflate to gigabytes) is refused from
    the zip's central directory alone, before ``torch.load`` inflates anything. Legacy (non-zip)
    files are left to ``torch.load``.

    Raises:
        CheckpointError: naming the file, the declared and the actual size.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (or unreadable): torch.load says what is wrong with it
    size = os.path.getsize(path)
    if declared > size + INFLATION_SLACK:
        raise CheckpointError(f"{path}: its zip members would inflate to {declared / 1e6:.1f} MB from a "
                              f"{size / 1e6:.1f} MB file (compressed members; torch.save writes none); not loaded")


def _read_export(root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{root}: no {WEIGHTS_NAME} in the directory")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no {CONFIG_NAME} beside {WEIGHTS_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except Exception as e:
        raise CheckpointError(f"{cfg_path}: cannot parse the config ({first_line(e)})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: expected a mapping with a 'model' section")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot read the weights ({type(e).__name__}: {first_line(e)})") from e
    return cfg, state


def first_line(e: BaseException) -> str:
    """The first line of an error's message (colour codes removed, at most 300 characters)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours parts of its weights-only message
    return (text.strip().splitlines() or [""])[0][:300]


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: name}`` for state-dict entries that share storage with an earlier entry (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        storage = id(t) if t.is_meta else t.untyped_storage().data_ptr()  # meta tensors have no address
        key = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "boolean"
    return "floating-point" if t.is_floating_point() else "complex" if t.is_complex() else "integer"


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str | os.PathLike,
                optional: Any = ()) -> None:
    """Refuse ``state`` unless it fits ``expected`` (a model's ``state_dict()``): the same keys (those in
    ``optional``, e.g. tied aliases, may be absent), shapes and kinds of dtype (a float tensor stays
    floating-point: no bool, integer or complex in its place), and finite values in every float or
    complex tensor.

    Raises:
        CheckpointError: one line naming ``source``, the first mismatching key (in the model's order)
            and, when there are more, how many are missing, unexpected and mis-shaped, by name.
    """
    problems, missing, shapes = [], [], []
    for name, t in expected.items():
        if name not in state:
            if name not in optional:
                missing.append(name)
                problems.append((name, "missing from the checkpoint"))
        elif not torch.is_tensor(state[name]):
            problems.append((name, f"a {type(state[name]).__name__} in the checkpoint, not a tensor"))
        elif tuple(state[name].shape) != tuple(t.shape):
            shapes.append(name)
            problems.append((name, f"shape {tuple(state[name].shape)} in the checkpoint, {tuple(t.shape)} in the model"))
        elif _kind(state[name]) != _kind(t):
            problems.append((name, f"{state[name].dtype} in the checkpoint, the model expects a {_kind(t)} tensor "
                                   f"({t.dtype})"))
    unexpected = [k for k in state if k not in expected]
    problems += [(k, "not a parameter of the model") for k in unexpected]
    if problems:
        key, why = problems[0]
        more = ""
        if len(problems) > 1:
            counts = [f"{len(ks)} {what} ({_names(ks)})" for what, ks in
                      (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if ks]
            more = f" ({len(problems) - 1} more mismatching keys; in all: {'; '.join(counts) or 'see the dtypes'})"
        raise CheckpointError(f"{source}: weights do not match the model built from its config: "
                              f"first mismatching key {key!r}: {why}{more}")
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or Inf ({bad} of {t.numel()} values); "
                                  "non-finite weights are not loaded")



def check_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """:func:`check_state` of ``state`` against ``model`` (tied entries may be absent). ``model`` may
    be on the meta device: shapes and dtypes are compared, the values checked are ``state``'s."""
    check_state(state, model.state_dict(), source, optional=_tied_aliases(model))


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``state`` into ``model`` after :func:`check_weights`.

    Raises:
        CheckpointError: naming ``source`` and what does not fit.
    """
    check_weights(model, state, source)
    full = dict(state)
    for alias, name in _tied_aliases(model).items():
        full.setdefault(alias, full[name])
    model.load_state_dict(full, strict=True)


def check_stored_config(cfg: Mapping, source: str | os.PathLike) -> None:
    """Refuse a stored config with a NaN or infinite number anywhere in its ``model`` section (the
    command line refuses them too) or a tokenizer record that is not one of the shapes in the module
    docstring (:func:`check_tokenizer_record`).

    Raises:
        CheckpointError: naming ``source`` and the key.
    """
    import math

    def walk(node: Any, key: str) -> None:
        if isinstance(node, float) and not math.isfinite(node):
            raise CheckpointError(f"{source}: {key}={node!r} in the stored config: expected a finite number")
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            walk(v, f"{key}.{k}")

    walk(cfg["model"], "model")
    check_tokenizer_record(cfg.get("tokenizer"), source)


_RECORD_FIELDS = {"char": {"chars": (str, "a string of characters"), "eos": (bool, "true or false")},
                  "bpe": {"name": ((str, dict), "a tokenizer name, path or {vocab, merges}"),
                          "vocab_size": (int, "an integer >= 1")},
                  "ids": {"vocab_size": (int, "an integer >= 1")}}


def check_tokenizer_record(record: Any, source: str | os.PathLike) -> None:
    """Refuse a stored tokenizer record that is not one of the shapes in the module docstring.

    Raises:
        CheckpointError: naming ``source`` and the field.
    """
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{source}: the tokenizer record is a {type(record).__name__}, expected a mapping with 'kind'")
    kind = record.get("kind")
    if kind not in _RECORD_FIELDS:
        raise CheckpointError(f"{source}: tokenizer.kind={kind!r}: expected one of {sorted(_RECORD_FIELDS)}")
    for name, (types, what) in _RECORD_FIELDS[kind].items():
        value = record.get(name)
        ok = isinstance(value, types) and not (types is int and isinstance(value, bool)) and \
            not (types is int and value < 1)
        if not ok:
            raise CheckpointError(f"{source}: tokenizer.{name}={value!r} (kind {kind}): expected {what}")
    if not isinstance(record.get("eos_token", ""), str):
        raise CheckpointError(f"{source}: tokenizer.eos_token={record['eos_token']!r}: expected a string")


# -- writing ---------------------------------------------------------------------------------------

def check_export_target(out: str | os.PathLike, *, overwrite: bool, inputs: Mapping[str, Any] = {},
                        key: str = "out") -> None:
    """Raise :class:`CheckpointError` unless an export may be written to ``out``.

    ``out`` must not touch any of ``inputs`` (``{setting: path}``, e.g. the checkpoint being
    read). An existing empty directory is used as it is. Anything else at ``out`` is replaced only with
    ``overwrite``, and only when it is an export written by serengeti (nothing but its marker files:
    ``config.json`` with ``"format": "serengeti"``, ``model.safetensors``, optionally
    ``tokenizer.json`` and ``tokenizer_config.json``) — never
    a run directory, another directory, a file or a symbolic link.
    """
    out = Path(out).expanduser()
    if (clash := input_clash(out, inputs)) is not None:
        raise CheckpointError(f"{key}={out} would overwrite the input {clash}; choose another directory")
    if not os.path.lexists(out) or _is_empty_dir(out):
        return
    if not overwrite:
        raise CheckpointError(f"{key}={out} already exists (pass overwrite=true to replace an export)")
    why = _not_an_export(out)
    if why is not None:
        raise CheckpointError(f"{key}={out} is not an export written by serengeti ({why}); "
                              "overwrite replaces nothing else: choose another directory")


def _not_an_export(path: Path) -> str | None:
    """Why ``path`` may not be replaced as an export, or ``None`` (an export of ours, or an empty directory)."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file"
    names = sorted(os.listdir(path))
    if not names:
        return None
    foreign = [n for n in names if n not in EXPORT_FILES]
    if foreign:
        return f"it holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
    if WEIGHTS_NAME not in names or CONFIG_NAME not in names:
        return f"no {WEIGHTS_NAME} + {CONFIG_NAME}"
    try:
        marker = json.loads((path / CONFIG_NAME).read_text()).get("format")
    except Exception:
        marker = None
    return None if marker == "serengeti" else f"its {CONFIG_NAME} is not serengeti's"


def export_contents(model: torch.nn.Module, cfg: Mapping, tokenizer: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What an export holds: the tensors of ``model.safetensors`` (tied weights once) and ``{name: text}`` of
    ``config.json`` and the tokenizer files.

    ``config.json`` keeps ``format``/``version``/``model``/``dataset``/``tokenizer`` (what
    :func:`read_checkpoint` reads) and adds the keys ``transformers`` reads (``model_type``
    ``"serengeti"``, ``architectures``, ``vocab_size``, ``eos_token_id``; :mod:`serengeti.models.hf`).
    ``tokenizer.json`` + ``tokenizer_config.json`` (for ``AutoTokenizer``) are the tokenizer's own
    ``transformers_files`` (:mod:`serengeti.data.tokenizers`; this module knows no tokenizer class):
    pass the BPE tokenizer, or the character vocabulary of the record
    (:func:`serengeti.data.tokenizers.recorded_tokenizer` gives either).
    """
    aliases = _tied_aliases(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in aliases}
    config = {"format": "serengeti", "version": FORMAT_VERSION,
              **{k: cfg[k] for k in ("model", "dataset", "tokenizer") if cfg.get(k) is not None},
              "model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE],
              "vocab_size": int(getattr(model, "vocab_size", 0)) or None}
    texts = {}
    if tokenizer is not None and hasattr(tokenizer, "eos_id"):
        if tokenizer.eos_id is not None:
            config["eos_token_id"] = int(tokenizer.eos_id)
        if callable(getattr(tokenizer, "transformers_files", None)):
            texts = tokenizer.transformers_files(getattr(model, "max_seq_len", None))
    texts[CONFIG_NAME] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return tensors, texts


def _write_contents(root: Path, tensors: Mapping[str, torch.Tensor], texts: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(root / WEIGHTS_NAME), metadata={"format": "pt"})
    for name, text in texts.items():
        (root / name).write_text(text)
    _apply_umask(root)  # mkdtemp makes 0700 and safetensors 0600: give the files the modes of any new file


def save_pretrained(model: torch.nn.Module, cfg: Mapping, out: str | os.PathLike, *, tokenizer: Any = None,
                    overwrite: bool = False, inputs: Mapping[str, Any] = {}) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ tokenizer files) to ``out`` atomically.

    The directory is assembled under a temporary name beside ``out`` and swapped into place
    (:func:`serengeti.io.atomic.replace_dir`), so ``out`` always holds the old export or the complete
    new one. Tied weights are stored once. An existing empty directory is used as it is.

    Args:
        model: the LM. cfg: plain config with ``model`` (``dataset``/``tokenizer`` kept when present).
        out: target directory. tokenizer: a BPE tokenizer whose ``tokenizer.json`` is written too
            (see :func:`export_contents`).
        overwrite: replace an existing export at ``out`` (:func:`check_export_target` says which may be).
        inputs: ``{setting: path}`` that ``out`` must not touch (the checkpoint being read).
    """
    out = Path(out).expanduser()
    check_export_target(out, overwrite=overwrite, inputs=inputs)
    out = Path(os.path.abspath(out))  # "." or "..": a name to put the temporary directory beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, texts = export_contents(model, cfg, tokenizer)
    tmp = temp_path(out)  # named after this process; a killed export's directory is removed here
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_contents(tmp, tensors, texts)
        if os.path.lexists(out):
            replace_dir(tmp, out)
        else:
            os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):  # safetensors' own error
            raise CheckpointError(f"out={out}: {no_space(out).strerror}") from None
        raise
    return out


def save_into(model: torch.nn.Module, cfg: Mapping, out: str | os.PathLike, *, tokenizer: Any = None,
              replace_foreign: bool = True) -> Path:
    """Write the files of an export into the directory ``out`` the way ``transformers`` does: ``out`` is
    created if missing, and other files in it are left alone. Returns ``out``.

    Each file is written under a temporary name and renamed into place, ``config.json`` last. Files
    of an earlier export of ours in ``out`` are replaced (and ours that the new export lacks, e.g. a
    tokenizer, removed). ``replace_foreign=False`` refuses, naming them, when ``out`` holds another
    model's files of the same names (a ``config.json`` that is not ours, a foreign ``tokenizer.json``).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; save_pretrained writes a directory")
    tensors, texts = export_contents(model, cfg, tokenizer)
    names = [WEIGHTS_NAME, *sorted(set(texts) - {CONFIG_NAME}), CONFIG_NAME]
    ours = is_export(out)
    if not ours and not replace_foreign:
        clash = [n for n in names if (out / n).exists()]
        if clash:
            raise CheckpointError(f"{out} holds another model's {', '.join(clash)}; not replacing them "
                                  "(save elsewhere, or pass overwrite=True to replace them)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-tmp-", dir=out))
    try:
        _write_contents(tmp, tensors, texts)
        for name in names:
            os.replace(tmp / name, out / name)
        if ours:
            for stale in set(EXPORT_FILES) - set(names):
                (out / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_export(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a directory holding an export of ours (its ``config.json`` says ``format: serengeti``)."""
    try:
        cfg = json.loads((Path(root) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == "serengeti"


def _is_empty_dir(path: Path) -> bool:
    return not path.is_symlink() and path.is_dir() and not any(path.iterdir())


def _apply_umask(root: Path) -> None:
    """Set ``root`` and the files in it to 0777 / 0666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (root, *root.iterdir()):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
