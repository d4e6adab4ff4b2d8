"""Tokenization throughput and token-cache reuse of the LM data pipeline, on real WikiText text.

    python benchmarks/tokenization.py                          # ../shared/data, both raw splits
    python benchmarks/tokenization.py --data /path/to/shared/data --repeats 3

Three measurements in one run, all on the raw WikiText validation + test text with the GPT-2
BPE tokenizer from ``<data>/gpt2``:

1. cold: a fresh datamodule (``WikiText``, train role = validation split, val role = test split)
   in an empty cache directory; ``setup("fit")`` tokenizes both splits into memory-mapped caches.
   MB/s = UTF-8 bytes of the documents / tokenize-and-write seconds (the caches' own timing).
2. warm: a second datamodule with the same settings and cache directory; ``setup("fit")`` only
   memory-maps the caches (it must not tokenize: checked).
3. baseline: the same documents through ``transformers.AutoTokenizer`` called once per document
   (the row-at-a-time way), for a ratio against the pipeline's batched Rust ``encode_batch``;
   the token counts of both must agree.

Times are medians over ``--repeats`` (a fresh cache directory per cold repeat). The Rust backend
uses ``RAYON_NUM_THREADS`` threads (default: all cores); the machine's load is printed because a
shared machine slows every number alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from serengeti.data.text import WikiText

ROOT = Path(__file__).resolve().parents[1]


def make_datamodule(data: Path, cache_dir: str) -> WikiText:
    return WikiText(path=str(data / "wikitext" / "wikitext-2-raw"), name="wikitext-2-raw-v1",
                    tokenizer=str(data / "gpt2"), seq_len=256, batch_size=4, cache_dir=cache_dir,
                    train_split="validation", val_split="test", test_split=None)


def setup_seconds(data: Path, cache_dir: str) -> tuple[float, float, WikiText]:
    """(wall s, process CPU s) to build a datamodule and run ``setup("fit")`` (tokenizer loading included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    dm = make_datamodule(data, cache_dir)
    dm.setup("fit")
    return time.perf_counter() - t0, time.process_time() - c0, dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SERENGETI_SHARED_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not (args.data / "gpt2").is_dir():
        raise SystemExit(f"--data {args.data}: no gpt2/ tokenizer directory there (see shared/data/README.md)")
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset (all cores)')}")

    cold, cold_cpu, tok_s, mb, n_tokens = [], [], [], 0.0, 0
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            cache = os.path.join(root, f"cold{r}")
            seconds, cpu, dm = setup_seconds(args.data, cache)
            arrays = [dm.tokens["train"], dm.tokens["val"]]
            assert all(a.built for a in arrays), "the cold run must tokenize"
            cold.append(seconds)
            cold_cpu.append(cpu)
            tok_s.append(sum(a.meta["build_seconds"] for a in arrays))
            mb = sum(a.meta["num_bytes"] for a in arrays) / 1e6
            n_tokens = sum(len(a) for a in arrays)
        warm, warm_cpu = [], []
        for _ in range(args.repeats):
            seconds, cpu, dm = setup_seconds(args.data, cache)
            assert not any(a.built for a in dm.tokens.values()), "the warm run re-tokenized"
            warm.append(seconds)
            warm_cpu.append(cpu)
        docs = [d for split in ("validation", "test") for d in dm.source.documents(split)]

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(args.data / "gpt2"), trust_remote_code=False)
    base, base_cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        counts = [len(hf(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs if d]  # + EOS
        base.append(time.perf_counter() - t0)
        base_cpu.append(time.process_time() - c0)
    assert sum(counts) == n_tokens, f"baseline counts {sum(counts)} tokens, the pipeline {n_tokens}"

    med = statistics.median
    cold_s, tok, warm_s, base_s = med(cold), med(tok_s), med(warm), med(base)
    print(f"text: WikiText raw validation + test, {mb:.2f} MB, {len(docs)} rows, {n_tokens:,} GPT-2 tokens (EOS per row)")
    print(f"pipeline tokenize+write : {tok:6.2f} s wall  {mb / tok:6.2f} MB/s   "
          f"(cold setup incl. tokenizer load: {cold_s:.2f} s wall, {med(cold_cpu):.2f} s CPU = {mb / med(cold_cpu):.2f} MB/CPU-s)")
    print(f"baseline one call/row   : {base_s:6.2f} s wall  {mb / base_s:6.2f} MB/s   ({med(base_cpu):.2f} s CPU); "
          f"pipeline/baseline speed {base_s / tok:.2f}x")
    print(f"cache reuse (warm setup): {warm_s:6.3f} s wall ({med(warm_cpu):.3f} s CPU)  cold/warm {cold_s / warm_s:.1f}x  "
          "(no re-tokenization)")
    print(f"runs: {args.repeats}; cold {np.round(cold, 2).tolist()} s, warm {np.round(warm, 3).tolist()} s")

if __name__ == "__main__":
    main()
