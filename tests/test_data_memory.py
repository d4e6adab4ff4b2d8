"""Bounded memory of tokenization: long texts in pieces with the same ids, large files streamed, .tokens refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from serengeti.data import sources
from serengeti.data.text import TextFiles, WikiText
from serengeti.data.sources import DataFileError, LocalFiles, TextStream
from serengeti.data.token_cache import cache_paths, write_tokens
from serengeti.data.tokenizers import CharTokenizer, load_tokenizer, safe_cut, text_pieces

GPT2 = SHARED_DATA / "gpt2"
TEXTS = [SHARED_DATA / "tinyshakespeare" / "input.txt", SHARED_DATA / "wikitext" / "wikitext-2-raw" / "wiki.test.raw"]


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return load_tokenizer(str(GPT2))


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: p.name)
def test_pieces_give_the_ids_of_the_whole_text(gpt2, path):
    """The oracle: the ids of the whole text in one call. 3,000-character pieces (hundreds of cuts) give the same."""
    text = path.read_text(encoding="utf-8")
    whole = gpt2.encode_batch([text])[0]
    pieces = list(text_pieces([text[i:i + 7001] for i in range(0, len(text), 7001)], 3000))
    assert len(pieces) > 300 and max(map(len, pieces)) <= 3000 and "".join(pieces) == text
    assert [i for ids in gpt2.encode_batch(pieces) for i in ids] == whole


def test_safe_cut_prefers_a_newline_then_a_space_else_the_limit():
    assert safe_cut("abcdef\ngh ij", 11) == 7  # after the newline between two non-spaces
    assert safe_cut("abcdef ghij", 10) == 6  # before the space between two non-spaces
    assert safe_cut("abcdefghijkl", 10) == 10  # no safe place: the limit
    assert safe_cut("ab  \n\n  cdefgh", 12) == 12  # runs of whitespace are never cut
    assert list(text_pieces([""], 4)) == [""]


def test_long_document_in_pieces_is_one_document_with_one_eos(gpt2, tmp_path):
    text = TEXTS[0].read_text(encoding="utf-8")[:200_000]
    docs = ["", text, "short"]
    paths = cache_paths(tmp_path, "t", "train", {"x": 1})
    meta = write_tokens(docs, gpt2, paths, add_eos=True, spec={}, piece_chars=5000)
    ids = np.fromfile(paths.bin, dtype=meta["dtype"]).tolist()
    eos = gpt2.eos_id
    assert ids == gpt2.encode_batch([text])[0] + [eos] + gpt2.encode_batch(["short"])[0] + [eos]
    assert meta["num_documents"] == 2 and meta["num_bytes"] == len(text.encode()) + 5


def test_large_file_is_streamed_with_the_same_tokens(monkeypatch, tmp_path):
    text = "".join(f"line {i} of the file\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 1000)
    docs = list(LocalFiles("t", {"train": str(tmp_path / "big.txt")}).documents("train"))
    assert len(docs) == 1 and isinstance(docs[0], TextStream)
    stream = TextStream(tmp_path / "big.txt", "w", chunk_chars=999)
    assert str(stream) == text and max(len(c) for c in stream) == 999
    dm = TextFiles(train=str(tmp_path / "big.txt"), tokenizer="char", add_eos=False, seq_len=8, batch_size=2,
                   cache_dir=str(tmp_path / "cache"))
    tokens = np.asarray(dm.load_split("train").tokens)
    assert dm.tokenizer.decode(tokens) == text


def test_streamed_file_errors_name_the_file(monkeypatch, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 500 + b"\xff\xfe broken")
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 100)
    (doc,) = LocalFiles("t", {"train": str(bad)}).documents("train")
    with pytest.raises(DataFileError, match=r"bad\.txt is not UTF-8 text \(byte 0xff"):
        list(doc)


def test_wikitext_tokens_files_are_refused_by_name(tmp_path):
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        (tmp_path / name).write_text(" = Valkyria = \n")
    with pytest.raises(ValueError, match=r"pre-tokenized WikiText files wiki.test.tokens, wiki.valid.tokens .*<unk>"):
        WikiText(path=str(tmp_path), tokenizer="char", seq_len=4, batch_size=1, train_split="validation")


_PEAK = """
import json, resource, sys
from pathlib import Path
from serengeti.data.text import TextFiles
dm = TextFiles(train=sys.argv[1], tokenizer=sys.argv[2], seq_len=64, batch_size=2, cache_dir=sys.argv[3],
               val_split=None, test_split=None)
n = len(dm.load_split("train"))
print(json.dumps({"tokens": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_of_tokenizing(path: Path, tokenizer: str, cache: Path, limit_mb: int | None = None,
                           timeout_s: float = 900) -> dict:
    """Tokenize ``path`` (dataset=text_files) in a fresh process; its token count and peak RSS in MB.
    ``limit_mb``: an address-space limit (RLIMIT_AS) for the child; exceeding it fails the child."""
    def limit():
        if limit_mb is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), tokenizer, str(cache)], env=env, capture_output=True,
                         text=True, timeout=timeout_s, preexec_fn=limit)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_size_of_one_file(gpt2, tmp_path):
    """One 8 MB and one 64 MB .txt file (one document each), GPT-2 BPE: peak RSS within 64 MB of each other."""
    base = TEXTS[0].read_text(encoding="utf-8")
    sizes = {}
    for mb in (8, 64):
        path = tmp_path / f"{mb}.txt"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(mb * 1_000_000 // len(base)):
                f.write(base)
        sizes[mb] = peak_rss_of_tokenizing(path, str(GPT2), tmp_path / f"cache{mb}")
    assert sizes[64]["tokens"] > 7 * sizes[8]["tokens"]
    assert sizes[64]["peak_mb"] - sizes[8]["peak_mb"] < 64, sizes
