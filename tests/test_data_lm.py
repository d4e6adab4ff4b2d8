"""Language-modeling data: real tokenizer and text, token cache atomicity, DDP build, clear errors.

Tests marked with ``needs_shared`` read ``../shared/data`` (GPT-2 files, WikiText, Tiny
Shakespeare; see its README) and skip when it is absent.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serengeti.data.sources import LocalFiles, in_carved_validation
from serengeti.data.text import TextFiles, TinyShakespeare, WikiText
from serengeti.data.token_cache import cache_paths, ensure_tokens, read_cache, write_tokens
from serengeti.data.tokenizers import CharTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SERENGETI_SHARED_DATA", ROOT.parent / "shared" / "data"))
GPT2 = SHARED / "gpt2"
WT_RAW = SHARED / "wikitext" / "wikitext-2-raw"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
needs_shared = pytest.mark.skipif(not (GPT2 / "tokenizer.json").is_file() or not (WT_RAW / "wiki.valid.raw").is_file(),
                                  reason=f"shared test data not found at {SHARED} (set SERENGETI_SHARED_DATA)")


# -- tokenizer and real text ------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("spec", ["dir", "tokenizer.json", "vocab+merges"])
def test_gpt2_tokenizer_loaders_agree_with_published_ids(spec):
    arg = {"dir": str(GPT2), "tokenizer.json": str(GPT2 / "tokenizer.json"),
           "vocab+merges": {"vocab": str(GPT2 / "vocab.json"), "merges": str(GPT2 / "merges.txt")}}[spec]
    tok = load_tokenizer(arg)
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    # ids from the shared-data README, checked there against tiktoken
    assert tok.encode_batch(["Hello world", "foo<|endoftext|>bar"]) == [[15496, 995], [21943, 50256, 5657]]


@needs_shared
def test_tinyshakespeare_token_counts_match_published(tmp_path):
    gpt2 = TextFiles(train=str(SHAKESPEARE), tokenizer=str(GPT2), add_eos=False, seq_len=128, batch_size=2,
                     cache_dir=str(tmp_path))
    assert len(gpt2.load_split("train")) == 338_025  # README (tiktoken r50k_base on the whole file)
    char = TinyShakespeare(path=str(SHAKESPEARE), split_fractions=(1.0, 0.0, 0.0), seq_len=128, batch_size=2,
                           cache_dir=str(tmp_path), val_split=None, test_split=None)
    tokens = char.load_split("train")
    assert char.vocab_size == 65 and len(tokens) == 1_115_394
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert char.tokenizer.decode(np.asarray(tokens.tokens)) == text


WT_KW = dict(path=str(WT_RAW), name="wikitext-2-raw-v1", tokenizer=str(GPT2), seq_len=64, batch_size=3,
             train_split="validation", val_split="validation", test_split=None)


@pytest.fixture(scope="module")
def wt_cache(tmp_path_factory):
    """A cache directory holding the GPT-2 tokens of the WikiText validation text, built once here."""
    if not (GPT2 / "tokenizer.json").is_file() or not (WT_RAW / "wiki.valid.raw").is_file():
        pytest.skip(f"shared test data not found at {SHARED} (set SERENGETI_SHARED_DATA)")
    cache = str(tmp_path_factory.mktemp("wt_cache"))
    dm = WikiText(**WT_KW, cache_dir=cache)
    dm.setup("fit")
    assert dm.tokens["train"].built and not dm.tokens["val"].built, "the same split is tokenized once"
    return cache, dm


@needs_shared
def test_wikitext_count_and_exact_round_trip(wt_cache):
    _, dm = wt_cache
    arr = dm.tokens["train"]
    assert arr.tokens.dtype == np.uint16
    lines = (WT_RAW / "wiki.valid.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [line for line in lines if line.strip()]
    assert len(lines) == 3760 and len(rows) == 3760 - 1299  # README: lines (blank)
    # independent count: transformers' tokenizer object called row by row (ours: batched backend)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(GPT2))
    expected = sum(len(hf(r, add_special_tokens=False)["input_ids"]) for r in rows) + len(rows)
    assert len(arr) == expected == arr.meta["num_tokens"]
    tokens = np.asarray(arr.tokens).astype(np.int64)
    eos = np.flatnonzero(tokens == dm.tokenizer.eos_id)
    assert len(eos) == len(rows) and eos[-1] == len(tokens) - 1
    docs = np.split(tokens, eos + 1)[:-1]
    decoded = [hf.decode(d[:-1].tolist(), clean_up_tokenization_spaces=False) for d in docs]
    assert decoded == rows, "decode(encode(row)) == row for every non-empty line"


@needs_shared
def test_second_run_reuses_the_cache(wt_cache):
    cache, first = wt_cache
    second = WikiText(**WT_KW, cache_dir=cache)
    second.setup("fit")
    assert not any(t.built for t in second.tokens.values()), "memory-mapped, not re-tokenized"
    for role in ("train", "val"):
        assert np.array_equal(first.tokens[role].tokens, second.tokens[role].tokens)
    # a different setting is a different cache entry
    third = WikiText(**{**WT_KW, "add_eos": False}, cache_dir=cache)
    third.setup("fit")
    assert third.tokens["train"].built and len(third.tokens["train"]) < len(first.tokens["train"])


@needs_shared
def test_wikitext_offline_has_no_train_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.train_split=validation"):
        WikiText(path=str(WT_RAW), tokenizer=str(GPT2), seq_len=64, batch_size=2, cache_dir=str(tmp_path))


@needs_shared
def test_wikitext_batches(wt_cache):
    cache, _ = wt_cache
    dm = WikiText(**{**WT_KW, "batch_size_eval": 5}, cache_dir=cache)
    dm.setup("fit")
    assert dm.vocab_size == 50257 and dm.l_max == 64
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    scored = sum(int((y != -100).sum()) for _, y in dm.val_dataloader())
    assert scored == len(dm.tokens["val"]) - 1


# -- token cache ------------------------------------------------------------------------------

def _write_docs(path: Path, n: int = 50) -> list[str]:
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghij \n"), size=int(rng.integers(20, 200)))) for _ in range(n)]
    path.write_text("".join(d.replace("\n", " ") + "\n" for d in docs), encoding="utf-8")
    return [d.replace("\n", " ") + "\n" for d in docs]


def test_cache_roundtrip_and_corruption_rebuilds(tmp_path):
    paths, build, expected, calls = _toy_cache(tmp_path)
    arr = read_cache(paths)
    assert len(calls) == 1 and arr.meta["num_documents"] == 2
    assert np.asarray(arr.tokens).tolist() == expected
    assert not ensure_tokens(paths, build).built and len(calls) == 1
    with open(paths.bin, "r+b") as f:  # a truncated file must never be used
        f.truncate(4)
    assert read_cache(paths) is None
    again = ensure_tokens(paths, build)
    assert again.built and len(calls) == 2 and np.asarray(again.tokens).tolist() == expected


def _toy_cache(tmp_path: Path):
    """A built three-document cache entry, its expected ids, and a counter of builds."""
    docs = ["hello world\n", "", "abc\n"]
    tok = CharTokenizer.from_text("".join(docs), eos=True)
    paths = cache_paths(tmp_path, "toy", "train", {"x": 1})
    calls = []

    def build():
        calls.append(1)
        return write_tokens(iter(docs), tok, paths, add_eos=True, spec={"x": 1}, batch_docs=2)

    expected = tok.encode_batch(["hello world\n"])[0] + [tok.eos_id] + tok.encode_batch(["abc\n"])[0] + [tok.eos_id]
    ensure_tokens(paths, build)
    return paths, build, expected, calls


def test_cache_metadata_records_checksum_and_id_range(tmp_path):
    import hashlib

    paths, _, expected, _ = _toy_cache(tmp_path)
    meta = json.loads(paths.meta.read_text())
    assert meta["sha256"] == hashlib.sha256(paths.bin.read_bytes()).hexdigest()  # hashlib over the whole file
    assert (meta["min_id"], meta["max_id"]) == (min(expected), max(expected))


def test_same_size_corruption_is_detected_and_rebuilt(tmp_path, caplog):
    paths, build, expected, calls = _toy_cache(tmp_path)
    assert not ensure_tokens(paths, build).built  # intact: reused
    with open(paths.bin, "r+b") as f:  # flip one token in place: same size, same metadata
        f.seek(2)
        f.write(bytes([f.read(1)[0] ^ 0x01]))
    assert paths.bin.stat().st_size == 2 * len(expected)
    with caplog.at_level("WARNING", logger="serengeti.data.token_cache"):
        again = ensure_tokens(paths, build)
    assert "does not match its metadata (checksum); rebuilding" in caplog.text
    assert again.built and len(calls) == 2 and np.asarray(again.tokens).tolist() == expected


def test_cache_without_checksum_or_with_ids_beyond_the_vocabulary_is_rebuilt(tmp_path, caplog):
    paths, build, expected, calls = _toy_cache(tmp_path)
    meta = json.loads(paths.meta.read_text())
    paths.meta.write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))  # an older cache entry
    with caplog.at_level("WARNING", logger="serengeti.data.token_cache"):
        assert ensure_tokens(paths, build).built and len(calls) == 2
    assert "written before checksums were recorded" in caplog.text
    meta = json.loads(paths.meta.read_text())
    paths.meta.write_text(json.dumps({**meta, "max_id": meta["vocab_size"]}))
    assert read_cache(paths) is None
    assert np.asarray(ensure_tokens(paths, build).tokens).tolist() == expected and len(calls) == 3


def _slow_build(cache: str, midway) -> None:
    tok = CharTokenizer("ab", eos=True)
    paths = cache_paths(cache, "toy", "train", {"slow": 1})

    def docs():
        for i in range(10**6):
            if i == 50:
                midway.set()
            if i >= 50:
                time.sleep(0.05)
            yield "ab" * 100

    write_tokens(docs(), tok, paths, add_eos=True, spec={"slow": 1}, batch_docs=1)


def test_killed_builder_leaves_no_usable_cache_and_next_run_rebuilds(tmp_path):
    ctx = multiprocessing.get_context("fork")
    midway = ctx.Event()
    proc = ctx.Process(target=_slow_build, args=(str(tmp_path), midway))
    proc.start()
    paths = cache_paths(tmp_path, "toy", "train", {"slow": 1})
    try:
        assert midway.wait(timeout=60)
        temporaries = list(paths.bin.parent.glob("*.tmp-*"))
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0, "the builder was writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert not paths.meta.exists() and not paths.bin.exists()
    assert read_cache(paths) is None
    tok = CharTokenizer("ab", eos=True)
    arr = ensure_tokens(paths, lambda: write_tokens(iter(["ab"] * 3), tok, paths, add_eos=True, spec={"slow": 1}))
    assert arr.built and np.asarray(arr.tokens).tolist() == [0, 1, 2] * 3
    assert not list(paths.bin.parent.glob("*.tmp-*")), "the dead builder's temporary file is removed"


def _ddp_worker(rank: int, world: int, port: int, cache: str, text_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = TextFiles(train=text_path, validation=text_path, unit="line", tokenizer="char", add_eos=True,
                       seq_len=16, batch_size=2, cache_dir=cache)
        dm.setup("fit")
        result = {role: {"built": t.built, "sum": int(np.asarray(t.tokens, dtype=np.int64).sum()), "n": len(t)}
                  for role, t in dm.tokens.items()}
        result["train_batches"] = len(dm.train_dataloader())
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_ddp_build_makes_one_cache(tmp_path):
    text = tmp_path / "corpus.txt"
    _write_docs(text, 400)
    cache = tmp_path / "cache"
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, str(cache), str(text), str(tmp_path)), nprocs=2,
                                          join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for role in ("train", "val"):
        assert r0[role]["built"] and not r1[role]["built"], "rank 0 builds, rank 1 waits and reuses"
        assert r0[role]["sum"] == r1[role]["sum"] and r0[role]["n"] == r1[role]["n"]
    assert r0["train_batches"] == r1["train_batches"] > 0
    names = sorted(p.name.split("-")[0] for p in (cache / "text_files").glob("*.bin"))
    assert names == ["train", "validation"], "one cache file per split"
    assert len(list((cache / "text_files").glob("*.json"))) == 2 and not list((cache / "text_files").glob("*.tmp-*"))


# -- sources ----------------------------------------------------------------------------------

def test_carved_validation_is_disjoint_and_seeded(tmp_path):
    files = []
    for i in range(400):
        f = tmp_path / f"doc{i:03d}.txt"
        f.write_text(f"document {i}")
        files.append(f)
    src = LocalFiles("owt", {"train": str(tmp_path / "*.txt")}, val_ratio=0.1, val_seed=7)
    train, val = list(src.documents("train")), list(src.documents("validation"))
    assert sorted(train + val) == sorted(f.read_text() for f in files) and not set(train) & set(val)
    assert 15 <= len(val) <= 70
    assert [i for i in range(400) if in_carved_validation(i, 0.1, 7)] == [int(d.split()[1]) for d in val]
    shards = [list(src.documents("train", s, 3)) for s in range(3)]
    assert sorted(sum(shards, [])) == sorted(train)


# -- errors -----------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        TextFiles(train=str(missing), tokenizer="char", seq_len=8, batch_size=1, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset.path"):
        WikiText(path=str(tmp_path / "absent"), seq_len=8, batch_size=1, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset.tokenizer"):
        TextFiles(train=str(missing.with_name("x")), tokenizer=str(tmp_path / "no_tokenizer_dir/"), seq_len=8,
                  batch_size=1, cache_dir=str(tmp_path))


def test_empty_split_is_an_error(tmp_path):
    full, empty = tmp_path / "train.txt", tmp_path / "valid.txt"
    full.write_text("some text here\n" * 20)
    empty.write_text("\n\n")
    dm = TextFiles(train=str(full), validation=str(empty), unit="line", tokenizer="char", seq_len=8, batch_size=1,
                   cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"dataset.val_split='validation' of text_files is empty"):
        dm.setup("fit")


def test_seq_len_longer_than_split_names_the_key(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("short text\n")
    dm = TextFiles(train=str(f), tokenizer="char", seq_len=64, batch_size=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"dataset.seq_len=64 is longer than the dataset.train_split='train'"):
        dm.setup("fit")


def test_vocab_size_mismatch_with_model(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh" * 10)
    dm = TextFiles(train=str(f), tokenizer="char", add_eos=True, seq_len=8, batch_size=1, cache_dir=str(tmp_path))
    assert dm.vocab_size == 9
    dm.check_model_vocab(16)
    with pytest.raises(ValueError, match=r"model.vocab_size=8 is smaller than the vocabulary of dataset.tokenizer"):
        dm.check_model_vocab(8)


def test_train_prepare_names_the_key_for_vocab_mismatch_and_missing_file(tmp_path):
    from conftest import compose_cfg
    from serengeti.errors import ConfigError
    from serengeti.training.run import prepare

    f = tmp_path / "t.txt"
    f.write_text("abcdefgh" * 10)
    base = ["dataset=text_files", "dataset.tokenizer=char", "dataset.seq_len=8", "dataset.batch_size=1",
            f"dataset.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"model.vocab_size=8 is smaller than the dataset's vocabulary \(9\)"):
        prepare(compose_cfg(base + [f"dataset.train={f}", "model.vocab_size=8"]))
    cfg = compose_cfg(base + [f"dataset.train={f}"])
    datamodule, task = prepare(cfg)
    assert cfg.model.vocab_size == datamodule.vocab_size == 9 and task.model.lm_head.out_features == 9
    missing = tmp_path / "absent.txt"
    with pytest.raises(ConfigError, match=rf"dataset: .*not found: {missing}"):
        prepare(compose_cfg(base + [f"dataset.train={missing}"]))
