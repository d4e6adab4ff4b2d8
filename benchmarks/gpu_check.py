"""GPU acceptance check: one command, a few minutes, a JSON record of what works and how fast.

    python benchmarks/gpu_check.py                        # everything below; writes gpu_check.json
    python benchmarks/gpu_check.py --dry-run              # list the checks without running them (any machine)
    python benchmarks/gpu_check.py --only train attention --json out.json

Checks, in order (each one's result or error is recorded; the exit code is 1 if any failed):

* ``train``: every mixer (attention, h3, hyena, hyena_s5, longconv, s5) trains a small LM for a
  few AdamW steps on one fixed batch under bf16 autocast; the loss must fall.
* ``attention``: flash-attn (when installed) against PyTorch SDPA on the same bf16 q, k, v.
* ``distributed`` (>= 2 GPUs): ``train.py`` with ``trainer=ddp`` and ``trainer=fsdp`` on 2 GPUs,
  a few steps each, and ``evaluate.py`` on the FSDP run's ``last.ckpt``.
* ``speed``: forward+backward time of each mixer (d_model 768, batch 1, bf16) against SDPA
  attention at L = 2K .. 64K, as ratios measured in one run.
* ``throughput``: training tokens/s of the 125M models (``experiment=owt/<model>``: d_model 768,
  12 layers, seq_len 1024, bf16) at batch 8.

Budget: about 8 minutes on one recent GPU (the per-check ``--max-seconds`` guard stops a check's
remaining sizes when it runs long). On a machine without CUDA it refuses in one line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serengeti.config_catalog import mixer_names, mixer_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
MIXERS = {name: mixer_overrides(name, CONFIG_DIR) for name in mixer_names(CONFIG_DIR)}  # configs/model/mixer/
MODELS_125M = ["transformer", "h3", "hybrid_h3", "hyena", "hyena_s5"]
LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536]
CHECKS = ["train", "attention", "distributed", "speed", "throughput"]


def plan(lengths: list[int]) -> dict[str, str]:
    """What each check runs, in words (the --dry-run listing)."""
    return {
        "train": f"{len(MIXERS)} mixers ({', '.join(MIXERS)}): d_model 128, 2 layers, L 512, batch 8, "
                 "20 AdamW steps on one batch in bf16 autocast; pass if the last loss < 0.8 x the first",
        "attention": "flash_attn_func vs F.scaled_dot_product_attention (causal, bf16, B 2, L 2048, 12 heads of 64); "
                     "pass if max |diff| <= 2e-2 (skipped when flash-attn is not installed)",
        "distributed": "if >= 2 GPUs: train.py trainer=ddp and trainer=fsdp with trainer.devices=2, 10 steps each on "
                       "the default task, then evaluate.py on the FSDP last.ckpt",
        "speed": f"fwd+bwd ms of each mixer vs SDPA attention, d_model 768, batch 1, bf16, L = {lengths}",
        "throughput": f"tokens/s of experiment=owt/{{{','.join(MODELS_125M)}}} (125M, seq 1024, bf16), batch 8, "
                      "3 warm-up + 10 timed steps",
    }


# --- helpers ------------------------------------------------------------------------------------------------

def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_lm(overrides: list[str], device: str = "cuda", **shape):
    """The LM a composed config describes (``shape`` overrides model keys), every dropout off, on ``device``."""
    import torch
    from omegaconf import OmegaConf, open_dict

    from serengeti.models.backbone import build_model

    cfg = _compose(overrides)
    with open_dict(cfg):
        cfg.model.update(shape)
        cfg.model.embed_dropout = cfg.model.resid_dropout = 0.0
        for key in cfg.model.mixer:
            if "dropout" in key:
                cfg.model.mixer[key] = 0.0
    torch.manual_seed(0)
    return build_model(OmegaConf.to_container(cfg.model, resolve=True)).to(device)


def _train_steps(model, x, y, steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up), timed with CUDA events."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# --- the checks ---------------------------------------------------------------------------------------------

def check_train(args) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (8, 512), generator=g).cuda()
    y = torch.roll(x, -1, dims=1)  # learnable: predict the next token of a fixed batch
    out = {}
    for name, overrides in MIXERS.items():
        model = build_lm(overrides, d_model=128, n_layer=2, d_inner=None, vocab_size=64, l_max=512)
        losses = _train_steps(model, x, y, steps=20)
        out[name] = {"first_loss": losses[0], "last_loss": losses[-1], "ok": losses[-1] < 0.8 * losses[0]}
        print(f"  train {name:9s} loss {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if out[name]['ok'] else 'FAILED'}", flush=True)
    return {"mixers": out, "ok": all(r["ok"] for r in out.values())}


def check_attention(args) -> dict:
    import torch
    import torch.nn.functional as F

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        print("  attention: flash-attn not installed, skipped", flush=True)
        return {"skipped": "flash-attn not installed", "ok": True}
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 2048, 12, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flash = flash_attn_func(q, k, v, causal=True)  # (B, L, H, d)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    diff = (flash.float() - sdpa.float()).abs().max().item()
    t_flash = _cuda_time(lambda: flash_attn_func(q, k, v, causal=True), 10)
    t_sdpa = _cuda_time(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True), 10)
    print(f"  attention: max |flash - sdpa| = {diff:.2e}; flash {1e3 * t_flash:.2f} ms, sdpa {1e3 * t_sdpa:.2f} ms", flush=True)
    return {"max_abs_diff": diff, "flash_ms": 1e3 * t_flash, "sdpa_ms": 1e3 * t_sdpa, "ok": diff <= 2e-2}


def _run(cmd: list[str], cwd: str, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled"}
    t = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
    return {"cmd": " ".join(cmd[1:]), "returncode": res.returncode, "seconds": time.time() - t, "tail": tail,
            "ok": res.returncode == 0}


def check_distributed(args) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        print("  distributed: fewer than 2 GPUs, skipped", flush=True)
        return {"skipped": f"{torch.cuda.device_count()} GPU", "ok": True}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["trainer.devices=2", "trainer.max_steps=10", "logger=none", "trainer.enable_progress_bar=false",
                  "dataset.num_examples=512", "dataset.num_test_examples=64"]
        for strategy in ("ddp", "fsdp"):
            run_dir = Path(tmp) / strategy
            out[strategy] = _run([sys.executable, str(ROOT / "train.py"), f"trainer={strategy}", *common,
                                  f"hydra.run.dir={run_dir}"], tmp, timeout=240)
            print(f"  distributed {strategy}: {'ok' if out[strategy]['ok'] else 'FAILED'} ({out[strategy]['seconds']:.0f} s)", flush=True)
        ckpt = Path(tmp) / "fsdp" / "checkpoints" / "last.ckpt"
        out["evaluate_fsdp_ckpt"] = _run([sys.executable, str(ROOT / "evaluate.py"), f"ckpt={ckpt}",
                                          f"hydra.run.dir={Path(tmp) / 'eval'}"], tmp, timeout=120)
        print(f"  evaluate.py on the FSDP checkpoint: {'ok' if out['evaluate_fsdp_ckpt']['ok'] else 'FAILED'}", flush=True)
    return {**out, "ok": all(r["ok"] for r in out.values())}


def check_speed(args) -> dict:
    import torch

    rows, started, too_slow = {}, time.time(), set()
    for L in args.lengths:
        if time.time() - started > args.max_seconds:
            print(f"  speed: stopped before L={L} (--max-seconds {args.max_seconds})", flush=True)
            break
        x = torch.randn(1, L, 768, device="cuda", requires_grad=True)
        gy = torch.randn(1, L, 768, device="cuda")
        row = {}
        for name, overrides in MIXERS.items():
            if name in too_slow:  # over 5 s at a shorter length: skip the longer ones
                row[name] = None
                continue
            heads = ["model.mixer.num_heads=12"] if name == "attention" else []  # head dim 64, as the 125M models
            mixer = build_lm(overrides + heads, d_model=768, n_layer=1, vocab_size=64, l_max=L).layers[0].mixer

            def fwd_bwd():
                x.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = mixer(x)
                y.float().backward(gy)

            try:
                row[name] = 1e3 * _cuda_time(fwd_bwd, 5)
            except torch.OutOfMemoryError:
                row[name] = None
            if row[name] is None or row[name] > 5000:
                too_slow.add(name)
            del mixer
            torch.cuda.empty_cache()
        rows[L] = row
        ref = row["attention"]
        ratios = "  ".join(f"{n}={ref / t:.2f}x" for n, t in row.items() if n != "attention" and t and ref)
        print(f"  speed L={L}: attention {ref if ref is None else round(ref, 2)} ms; attention/mixer: {ratios}", flush=True)
    return {"ms": rows, "ok": bool(rows)}


def check_throughput(args) -> dict:
    import torch

    out = {}
    for name in MODELS_125M:
        model = build_lm([f"experiment=owt/{name}"], vocab_size=50257, l_max=1024)
        x = torch.randint(0, 50257, (8, 1024), device="cuda")
        _train_steps(model, x, x, steps=3)
        torch.cuda.synchronize()
        t = time.time()
        _train_steps(model, x, x, steps=10)
        torch.cuda.synchronize()
        out[name] = 10 * 8 * 1024 / (time.time() - t)
        print(f"  throughput owt/{name:10s} {out[name]:,.0f} tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return {"tokens_per_s": out, "ok": True}


RUNNERS = {"train": check_train, "attention": check_attention, "distributed": check_distributed,
           "speed": check_speed, "throughput": check_throughput}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=CHECKS, default=CHECKS, help="run only these checks")
    p.add_argument("--lengths", nargs="+", type=int, default=LENGTHS, help="sequence lengths of the speed check")
    p.add_argument("--max-seconds", type=float, default=150, help="the speed check stops adding lengths after this")
    p.add_argument("--json", default="gpu_check.json", help="where the results go")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = p.parse_args(argv)
    steps = plan(args.lengths)
    if args.dry_run:
        for name in args.only:
            print(f"{name}: {steps[name]}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or --dry-run to list the checks", file=sys.stderr)
        return 2
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_check on {device}, torch {torch.__version__}", flush=True)
    record = {"device": device, "torch": torch.__version__, "checks": {}}
    started = time.time()
    for name in args.only:
        t = time.time()
        try:
            result = RUNNERS[name](args)
        except Exception as e:  # record it and go on: one broken check must not hide the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: FAILED {result['error']}", flush=True)
        record["checks"][name] = {**result, "seconds": time.time() - t}
    record["seconds"] = time.time() - started
    Path(args.json).write_text(json.dumps(record, indent=1))
    failed = [n for n, r in record["checks"].items() if not r["ok"]]
    print(f"gpu_check: {len(record['checks']) - len(failed)}/{len(record['checks'])} checks passed in "
          f"{record['seconds']:.0f} s{'; failed: ' + ', '.join(failed) if failed else ''}; results in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
