"""Training-step speed-up of ``model.compile=true`` for every mixer, as eager/compiled ratios from one run.

    python benchmarks/compile_speed.py                          # d_model 64, 2 layers, L 256, batch 8, CPU fp32
    python benchmarks/compile_speed.py --mixers hyena h3 --seq-len 1024 --json out.json

Each mixer's LM is built from the real configs (``model=<name>``, dropout off), copied, and one copy
gets :func:`serengeti.training.compiling.compile_backbone`. One step is forward, cross-entropy, backward and an
AdamW update. Compilation (the first calls) is timed separately; then eager and compiled steps
alternate for ``--repeats`` rounds so that load changes on a shared machine hit both alike, and each
entry is the median. ``speedup`` = eager step time / compiled step time (> 1: compiling helps).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see serengeti/runtime.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from serengeti.models.backbone import build_model  # noqa: E402
from serengeti.training.compiling import compile_backbone  # noqa: E402
from serengeti.config_catalog import mixer_names, mixer_overrides  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
#: mixer -> overrides of train.yaml that select it
MIXERS = {name: mixer_overrides(name, CONFIG_DIR) for name in mixer_names(CONFIG_DIR)}  # configs/model/mixer/


def build_lm(name: str, d_model: int, n_layer: int, seq_len: int, vocab: int) -> torch.nn.Module:
    """The LM of ``model=<name>`` at the given shape, every dropout off."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=MIXERS[name])
    cfg.model.update(d_model=d_model, n_layer=n_layer, d_inner=None, l_max=seq_len, vocab_size=vocab,
                     embed_dropout=0.0, resid_dropout=0.0)  # before resolving: positions follow l_max
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["mixer"] = {k: (0.0 if "dropout" in k else v) for k, v in model["mixer"].items()}
    if model.get("attn_cfg"):
        model["attn_cfg"]["dropout"] = 0.0
    torch.manual_seed(0)
    return build_model(model)


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (one eager and one compiled step each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_model {a.d_model}, {a.n_layer} layers, "
          f"L {a.seq_len}, batch {a.batch}, fp32 CPU; step = forward + CE + backward + AdamW")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
    rows = []
    print(f"{'mixer':10s} {'compile s':>9s} {'eager ms':>9s} {'compiled ms':>11s} {'speedup':>7s}")
    for name in a.mixers:
        eager = build_lm(name, a.d_model, a.n_layer, a.seq_len, a.vocab)
        compiled = compile_backbone(copy.deepcopy(eager))
        torch._dynamo.reset()
        step_e, step_c = make_step(eager, x, y), make_step(compiled, x, y)
        step_e()
        t = time.perf_counter()
        step_c(), step_c()  # the first calls compile (forward, then backward graphs)
        compile_s = time.perf_counter() - t
        times_e, times_c = [], []
        for _ in range(a.repeats):
            times_e.append(step_e())
            times_c.append(step_c())
        me, mc = statistics.median(times_e), statistics.median(times_c)
        rows.append({"mixer": name, "compile_s": compile_s, "eager_ms": 1e3 * me, "compiled_ms": 1e3 * mc, "speedup": me / mc})
        print(f"{name:10s} {compile_s:9.1f} {1e3 * me:9.1f} {1e3 * mc:11.1f} {me / mc:7.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "torch": torch.__version__, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
