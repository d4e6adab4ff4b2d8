"""evaluate.py's tasks: ``evaluate`` (loss/perplexity/accuracy), ``generate``, ``export``, ``lm_eval``.

Each task takes the composed ``configs/evaluate.yaml`` and returns a dict of results;
:func:`main` turns bad input into a one-line error and a non-zero exit. Settings and output paths
are checked before any model is loaded (:func:`check_settings`), so nothing is computed for a run
that could not report its result.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from serengeti.data.text import ROLE_KEYS
from serengeti.errors import CheckpointError, ConfigError, EvalError
from serengeti.evaluate.perplexity import build_datamodule, check_position_buckets, evaluate_model
from serengeti.io.atomic import atomic_write_text, input_clash
from serengeti.io.checkpoint import TOKENIZER_NAME, check_export_target
from serengeti.io.run_record import RECORD_NAME, RESOLVED_CONFIG_NAME
from serengeti.models.generation import MAX_NEW_TOKENS, check_memory, generate
from serengeti.models.pretrained import export, load_model
from serengeti.training.config_checks import Rule, check_choice, check_rule, lightning_precisions
from serengeti.training.run_dirs import remove_fresh_run_dir

log = logging.getLogger("serengeti")


SETTINGS = (
    Rule("seed", "int", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    Rule("batch_size", "int", lambda v: v >= 1, "an integer >= 1", nullable=True),
    Rule("seq_len", "int", lambda v: v >= 1, "an integer >= 1 (null = the dataset's)", nullable=True),
    Rule("max_new_tokens", "int", lambda v: 1 <= v <= MAX_NEW_TOKENS, f"an integer >= 1 and <= {MAX_NEW_TOKENS}"),
    Rule("temperature", "number", lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    Rule("top_k", "int", lambda v: v >= 1, "an integer >= 1", nullable=True),
    Rule("top_p", "number", lambda v: 0 < v <= 1, "a number in (0, 1]", nullable=True),
    Rule("num_samples", "int", lambda v: v >= 1, "an integer >= 1"),
    Rule("num_fewshot", "int", lambda v: v >= 0, "an integer >= 0", nullable=True),
    Rule("limit", "number", lambda v: v > 0, "a number > 0 (a count, or a fraction of each task)", nullable=True),
)


def check_settings(cfg: DictConfig) -> None:
    """Refuse bad settings and unwritable outputs in one line (:class:`EvalError`), before any work."""
    try:
        for rule in SETTINGS:
            check_rule(cfg, rule)
        check_choice(cfg, "split", ("val", "test"))
        check_choice(cfg, "precision", lightning_precisions() or (cfg.precision,))
    except ConfigError as e:
        raise EvalError(str(e)) from None
    check_position_buckets(cfg.get("position_buckets"))
    _device(cfg)
    task = cfg.get("task")
    if task in ("evaluate", "lm_eval"):
        default = Path(cfg.paths.output_dir) / ("metrics.json" if task == "evaluate" else "lm_eval.json")
        out = Path(cfg.out) if cfg.get("out") else default
        if (clash := input_clash(out, input_paths(cfg))) is not None:
            raise EvalError(f"out={out} would overwrite the input {clash}: give another path for the JSON file")
        if out.is_dir():
            raise EvalError(f"out={out} is a directory: give the path of the JSON file to write")
        check_writable(out.parent, "out" if cfg.get("out") else "paths.output_dir")
    elif task == "export" and cfg.get("out"):
        check_export_target(cfg.out, overwrite=bool(cfg.get("overwrite")), inputs=input_paths(cfg))
        check_writable(Path(cfg.out), "out")


def input_paths(cfg: DictConfig) -> dict[str, Any]:
    """``{setting: value}`` of everything this command reads: the checkpoint, the tokenizer, the lm_eval
    task folder and the dataset's string settings but its cache (values that are no path are skipped
    by :func:`serengeti.io.atomic.input_clash`)."""
    inputs = {key: cfg.get(key) for key in ("ckpt", "tokenizer", "include_path")}
    dataset = cfg.get("dataset")
    if OmegaConf.is_dict(dataset):
        for key, value in _leaves("dataset", OmegaConf.to_container(dataset, resolve=True)):
            if isinstance(value, str) and not key.endswith("cache_dir"):
                inputs[key] = value
    return inputs


def _leaves(prefix: str, value: Any):
    """``(dotted key, value)`` of every leaf of nested dicts and lists."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        yield prefix, value
        return
    for k, v in items:
        yield from _leaves(f"{prefix}.{k}" if isinstance(value, dict) else f"{prefix}[{k}]", v)


def check_writable(directory: Path, key: str) -> None:
    """Raise :class:`EvalError` unless a file can be created in ``directory`` (made and removed again if missing)."""
    missing = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        for d in reversed(missing):
            d.mkdir()
        fd, tmp = tempfile.mkstemp(prefix=".serengeti-write-test-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise EvalError(f"{key}: cannot write into {directory} ({e.strerror or e})") from None
    finally:
        for d in missing:
            if d.is_dir():
                d.rmdir()


def _ckpt(cfg: DictConfig) -> str:
    if not cfg.get("ckpt"):
        raise EvalError("ckpt is not set: pass ckpt=<.ckpt from train.py or an exported directory>")
    return str(cfg.ckpt)


def _device(cfg: DictConfig) -> str:
    device = str(cfg.get("device") or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvalError(f"device={device!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device={device!r}: CUDA is not available here; use device=cpu (or auto)")
    return device


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a temporary file in the same directory, then rename. Called after the results are printed."""
    try:
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as e:  # e.g. the disk filled up during a long evaluation
        raise EvalError(f"cannot write {path} ({e.strerror or e}); the results are printed above") from None


def _write_scored_config(path: Path, ckpt: str, cfg: DictConfig, ckpt_cfg: dict, dataset_cfg: dict) -> None:
    """Beside the metrics JSON, what was scored: ``ckpt``, ``split``, the checkpoint's ``model`` and the
    ``dataset`` as scored (e.g. at another ``seq_len``), so that ``serengeti.report`` groups evaluations as it
    groups training runs (``--by ckpt,dataset.seq_len``)."""
    scored = {"ckpt": ckpt, "split": str(cfg.split), "model": ckpt_cfg.get("model"), "dataset": dataset_cfg}
    try:
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(scored)))
    except OSError as e:
        raise EvalError(f"cannot write {path} ({e.strerror or e}); the results are printed above") from None


def _print_table(title: str, rows: dict[str, Any]) -> None:
    from serengeti.training.callbacks.progress import console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    console().print(table)


def _only_split(dataset_cfg: dict, split: str) -> dict:
    """The dataset config with every role but ``split`` set to null, so that scoring needs no train split.

    A character vocabulary is built from the text of all roles, so char datasets keep them (the
    vocabulary must match the checkpoint's); a BPE tokenizer does not depend on the data.
    """
    if split not in ("val", "test") or dataset_cfg.get("tokenizer") == "char":
        return dataset_cfg
    return {**dataset_cfg, **{key: None for role, key in ROLE_KEYS.items() if role != split and key in dataset_cfg}}


#: string settings of a recorded dataset that name no place; every other string (or list or mapping holding
#: one) may name a file, a folder, a cache or a hub id
PLACELESS_KEYS = frozenset({"_target_", "eos_token", "text_field", "train_split", "val_split", "test_split", "task",
                            "train_targets"})


def _names_a_place(key: str, value: Any) -> bool:
    if key in PLACELESS_KEYS or (key == "tokenizer" and value == "char"):
        return False
    if isinstance(value, (list, tuple)):
        return any(_names_a_place("", v) for v in value)
    return isinstance(value, (str, dict))


def _placeless(recorded: dict, given: dict, root: Path, cache_dir: str) -> dict:
    """An export's recorded dataset without the places it names: they come from the command line.

    The cache goes under the user's ``paths.cache_dir`` (with the datamodule's own folder name), a BPE
    tokenizer is the export's ``tokenizer.json``; data files, folders and hub ids must be given as
    ``+dataset.<key>=...``, else :class:`EvalError` names the keys.
    """
    kept = {k: v for k, v in recorded.items() if not _names_a_place(k, v)}
    dropped = [k for k, v in recorded.items() if _names_a_place(k, v) and k not in given]
    if "cache_dir" in recorded:
        kept["cache_dir"] = cache_dir
    if "tokenizer" in dropped and (root / TOKENIZER_NAME).is_file():
        kept["tokenizer"] = str(root / TOKENIZER_NAME)
    missing = [k for k in dropped if k not in kept and k != "name"]
    if missing:
        keys = ", ".join(f"dataset.{k}" for k in missing)
        raise EvalError(f"{root} is an export, whose recorded places are not used ({keys}): give them on the command "
                        f"line (+dataset.{missing[0]}=...) or pass dataset=<name>")
    return kept


def scoring_dataset(cfg: DictConfig, ckpt_cfg: dict, path: str) -> dict:
    """The plain dataset config to score on.

    ``dataset=<name>`` (a config with a ``_target_``) replaces the checkpoint's dataset; without one,
    the recorded dataset is used, with the keys of a partial ``dataset`` (``+dataset.key=value``)
    replaced, and ``seq_len`` replaces ``dataset.seq_len``. A synthetic task scored at another length
    than the recorded one draws only its test examples (``num_examples=0``): its test set is new at
    that length anyway, and the training examples (``num_examples`` sequences of the new length) are
    not needed. At the recorded length the test set is the one training scored.
    """
    given = OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") is not None else {}
    recorded = ckpt_cfg.get("dataset")
    if "_target_" in given:
        dataset_cfg = given
    elif recorded is not None:
        if Path(path).is_dir():  # an export may come from anyone: its recorded places are not used
            recorded = _placeless(recorded, given, Path(path), str(cfg.paths.cache_dir))
        dataset_cfg = {**recorded, **given}
    else:
        raise EvalError(f"{path} records no dataset: pass dataset=<name> (one of configs/dataset/)")
    if cfg.get("seq_len") is not None:
        dataset_cfg["seq_len"] = int(cfg.seq_len)
    other_length = recorded is not None and dataset_cfg.get("seq_len") != recorded.get("seq_len")
    if other_length and "num_examples" in dataset_cfg:
        dataset_cfg["num_examples"] = 0
    return _only_split(dataset_cfg, str(cfg.split))


def recorded_tokenizer(path: str, ckpt_cfg: dict) -> str | None:
    """The BPE tokenizer the model was trained with, as a local ``dataset.tokenizer`` spec: the export's
    ``tokenizer.json``, or the recorded name when it is a local file or directory; else ``None``."""
    record = ckpt_cfg.get("tokenizer") or {}
    if record.get("kind") != "bpe":
        return None
    exported = Path(path) / TOKENIZER_NAME
    if Path(path).is_dir() and exported.is_file():
        return str(exported)
    name = record.get("name")
    return name if isinstance(name, str) and Path(name).expanduser().exists() else None


def _with_model_tokenizer(dataset_cfg: dict, path: str, ckpt_cfg: dict, override: Any) -> dict:
    """``dataset_cfg`` with the tokenizer that matches the model: ``tokenizer=`` when given, else the one
    recorded with the checkpoint (:func:`recorded_tokenizer`), so scoring needs no hub; char vocabularies
    (built from the data) are left alone."""
    if dataset_cfg.get("tokenizer") == "char":
        return dataset_cfg
    spec = override if override is not None else recorded_tokenizer(path, ckpt_cfg)
    if spec is None or spec == dataset_cfg.get("tokenizer"):
        return dataset_cfg
    source = "tokenizer=" if override is not None else "the checkpoint's own tokenizer"
    print(f"[serengeti] tokenizer: {spec} ({source}, instead of dataset.tokenizer={dataset_cfg.get('tokenizer')!r})")
    return {**dataset_cfg, "tokenizer": spec}


def announce_eval_cap(cfg: DictConfig, dataset_cfg: dict) -> None:
    """Say when only a prefix of the split is scored (``dataset.max_eval_tokens``), and whether the cap came
    with the checkpoint's recorded dataset rather than from this command."""
    cap = dataset_cfg.get("max_eval_tokens")
    if cap is None:
        return
    given = cfg.get("dataset") is not None and "max_eval_tokens" in cfg.dataset
    origin = "set for this evaluation" if given else "recorded with the checkpoint's dataset"
    print(f"[serengeti] dataset.max_eval_tokens={cap} ({origin}): only the first {cap:,} tokens of the {cfg.split} "
          "split are scored; +dataset.max_eval_tokens=null scores all of it")


def scored_data(datamodule, split: str) -> dict:
    """``{"tokens": targets scored, "data": [files or hub dataset]}`` of a language-modeling datamodule's
    ``split`` (``val``/``test``); empty for synthetic tasks (their size is in their config)."""
    tokens = getattr(datamodule, "tokens", {})
    if not isinstance(tokens, dict) or split not in tokens:
        return {}
    source, name = datamodule.source, datamodule.roles[split]
    if hasattr(source, "files"):
        data = [str(f) for f in source.files(name)]
    elif hasattr(source, "hf_name"):
        data = [f"hf:{source.hf_name}" + (f"/{source.hf_config}" if source.hf_config else "") + f":{name}"]
    else:
        data = [str(getattr(source, "path", source.name))]
    return {"tokens": len(tokens[split]) - 1, "data": data}  # every target after the first token, once


def task_evaluate(cfg: DictConfig) -> dict:
    """Loss, perplexity and accuracy on ``split`` of the dataset (:func:`scoring_dataset`: the checkpoint's,
    optionally at another ``seq_len``, unless ``dataset=`` is given), and with ``position_buckets`` the loss
    per bucket of positions in the window."""
    path = _ckpt(cfg)
    model, ckpt_cfg, _ = load_model(path, load_tokenizer=False)
    dataset_cfg = _with_model_tokenizer(scoring_dataset(cfg, ckpt_cfg, path), path, ckpt_cfg, cfg.get("tokenizer"))
    start = time.time()
    announce_eval_cap(cfg, dataset_cfg)
    datamodule = build_datamodule(dataset_cfg, cfg.get("batch_size"))
    metrics = evaluate_model(model, ckpt_cfg, datamodule, split=cfg.split, device=_device(cfg),
                             precision=str(cfg.precision), position_buckets=cfg.get("position_buckets"))
    scored = scored_data(datamodule, str(cfg.split))
    result = {"ckpt": path, "dataset": dataset_cfg.get("_target_"), "split": cfg.split,
              "seq_len": dataset_cfg.get("seq_len"), **scored, "max_eval_tokens": dataset_cfg.get("max_eval_tokens"),
              **metrics, "wall_s": time.time() - start,
              "metrics": dict(metrics), "n_params": sum(p.numel() for p in model.parameters())}
    if scored.get("tokens") is not None:
        print(f"[serengeti] scored {scored['tokens']:,} tokens of the {cfg.split} split ({', '.join(scored['data'])}) "
              f"at seq_len {dataset_cfg.get('seq_len')}")
    name = str(dataset_cfg.get("_target_")).rsplit(".", 1)[-1]
    _print_table(f"{Path(path).name} on {name} (seq_len {dataset_cfg.get('seq_len')}, {cfg.split})", metrics)
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "metrics.json"
    if out.name == RECORD_NAME:  # a run record: serengeti.report reads it with the config beside it
        _write_scored_config(out.parent / RESOLVED_CONFIG_NAME, path, cfg, ckpt_cfg, dataset_cfg)
    _write_json(out, result)
    print(f"[serengeti] metrics written to {out}")
    return result


def _prompt_ids(cfg: DictConfig, tokenizer, vocab_size: int) -> list[int]:
    prompt = cfg.get("prompt")
    if prompt is None or str(prompt) == "":
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise EvalError('prompt is empty: pass prompt="..." (token ids separated by spaces for this checkpoint)'
                            if tokenizer is None else 'prompt is empty: pass prompt="..."')
        return [eos]  # unconditional sampling starts after an end-of-text token
    if tokenizer is None:
        try:
            ids = [int(t) for t in str(prompt).split()]
        except ValueError:
            raise EvalError(f"prompt={prompt!r}: this checkpoint has no text tokenizer (synthetic task); give token ids "
                            "separated by spaces, e.g. prompt='3 1 4'") from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise EvalError(f"prompt token ids {bad} are outside the vocabulary [0, {vocab_size})")
        return ids
    try:
        return tokenizer.encode_batch([str(prompt)])[0]
    except ValueError as e:
        raise EvalError(f"prompt: {e}") from None


def task_generate(cfg: DictConfig) -> dict:
    """Sample ``max_new_tokens`` after ``prompt`` with the recurrent mode (KV cache / SSM state / conv history)."""
    path = _ckpt(cfg)
    device = _device(cfg)
    model, _, tokenizer = load_model(path, device=device, tokenizer=cfg.get("tokenizer"))
    ids = _prompt_ids(cfg, tokenizer, model.vocab_size)
    limit = model.length_limit()  # None: the model takes any length (S5, Hyena-S5, H3, position-free attention)
    max_len = None if limit is None else limit[0]
    if limit is not None and len(ids) > max_len:
        raise EvalError(f"prompt has {len(ids)} tokens, longer than the model's maximum sequence length {max_len}: {limit[1]}")
    if max_len is not None and len(ids) + cfg.max_new_tokens - 1 > max_len:
        raise EvalError(f"prompt ({len(ids)} tokens) + max_new_tokens={cfg.max_new_tokens} exceeds the model's maximum "
                        f"sequence length {max_len}: lower max_new_tokens to at most {max_len - len(ids) + 1}")
    n = int(cfg.get("num_samples") or 1)
    try:
        check_memory(model, n, len(ids), int(cfg.max_new_tokens), device)
    except ValueError as e:
        raise EvalError(str(e)) from None
    prompt = torch.tensor([ids] * n, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    try:
        gen = generate(model, prompt, int(cfg.max_new_tokens), temperature=float(cfg.temperature), top_k=cfg.get("top_k"),
                       top_p=cfg.get("top_p"), generator=g, max_len=max_len)
    except ValueError as e:
        raise EvalError(str(e)) from None
    decode: Callable = tokenizer.decode if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    texts = [decode(row.tolist()) for row in gen.tokens.cpu()]
    prompt_text = str(cfg.get("prompt") or "")
    for text in texts:
        print(prompt_text + ("" if tokenizer is not None else " ") + text if prompt_text else text)
        print("-" * 40)
    tok_s = n * (gen.tokens.shape[1] - 1) / gen.decode_s if gen.decode_s > 0 else math.nan
    print(f"[serengeti] prompt {len(ids)} tokens, prefill {1e3 * gen.prefill_s:.1f} ms, "
          f"{gen.ms_per_token:.2f} ms/token, {tok_s:.1f} tokens/s")
    return {"prompt_ids": ids, "tokens": gen.tokens.tolist(), "texts": texts, "prefill_s": gen.prefill_s,
            "ms_per_token": gen.ms_per_token, "tokens_per_s": tok_s}


def task_export(cfg: DictConfig) -> dict:
    """Write ``out`` = ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``) from ``ckpt``."""
    path = _ckpt(cfg)
    if not cfg.get("out"):
        raise EvalError("out is not set: pass out=<directory to write the exported model to>")
    out = export(path, cfg.out, overwrite=bool(cfg.get("overwrite")))  # checks what out may replace
    print(f"[serengeti] exported {path} -> {out}")
    return {"ckpt": path, "out": str(out)}


def task_lm_eval(cfg: DictConfig) -> dict:
    """Zero-shot downstream tasks through the lm-evaluation-harness adapter."""
    from serengeti.evaluate.lm_eval_adapter import run_lm_eval

    path = _ckpt(cfg)
    model, _, tokenizer = load_model(path, device=_device(cfg), tokenizer=cfg.get("tokenizer"))
    if tokenizer is None:
        raise EvalError(f"{path} has no text tokenizer (synthetic task); lm_eval needs one: pass tokenizer=<spec>")
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True) if OmegaConf.is_config(cfg.get("tasks")) else cfg.get("tasks")
    try:
        results = run_lm_eval(model, tokenizer, tasks, num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"),
                              batch_size=int(cfg.get("batch_size") or 8), device=_device(cfg),
                              include_path=cfg.get("include_path"), prefix_token_id=cfg.get("prefix_token_id"))
    except (ImportError, ValueError) as e:  # lm_eval is an optional extra; bad include_path / prefix_token_id / text
        raise EvalError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    metrics = results.get("results", {})
    for task_name, values in metrics.items():
        _print_table(task_name, {k: v for k, v in values.items() if isinstance(v, (int, float))})
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "lm_eval.json"
    _write_json(out, json.loads(json.dumps(metrics, default=str)))
    return metrics


TASKS: dict[str, Callable[[DictConfig], dict]] = {
    "evaluate": task_evaluate, "generate": task_generate, "export": task_export, "lm_eval": task_lm_eval,
}


def run(cfg: DictConfig) -> dict:
    """Run ``cfg.task``; raises :class:`EvalError` / :class:`CheckpointError` on bad input."""
    task = cfg.get("task")
    if task not in TASKS:
        raise EvalError(f"task={task!r} is not one of {sorted(TASKS)}")
    check_settings(cfg)
    return TASKS[task](cfg)


def main(cfg: DictConfig) -> float | None:
    """Hydra task function: the evaluation loss (task=evaluate), else None; bad input exits with its message."""
    try:
        result = run(cfg)
    except (EvalError, CheckpointError, ConfigError) as e:  # ConfigError: a dataset file that cannot be read
        remove_fresh_run_dir(cfg.paths.get("output_dir"))
        raise SystemExit(f"error: {e}") from None
    value = result.get(f"{cfg.get('split')}/loss") if cfg.get("task") == "evaluate" else None
    return None if value is None else float(value)
