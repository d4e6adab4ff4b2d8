"""Per-token decode time through ``transformers``' ``model.generate`` vs ``serengeti.generate``, at a 2K prompt.

    python benchmarks/hf_generation.py                        # every mixer + a hybrid, 4 layers, d_model 256
    python benchmarks/hf_generation.py --models h3 hyena --prompt 2048 --new-tokens 64 --device cuda

Each model is the repository's LM (``configs/model/<name>.yaml``; ``attention`` is ``transformer_pp``,
rotary attention in every block) at 4 layers, d_model 256, the GPT-2 vocabulary and
``l_max`` = prompt + new tokens, saved with ``save_pretrained`` and loaded back with
``AutoModelForCausalLM.from_pretrained``. Both paths decode greedily after the same random prompt
(batch 1, float32, eval mode): native = :func:`serengeti.generate` (``decode_s`` over its steps),
HF = ``model.generate(do_sample=False)`` timed from its first new token (a stopping criterion notes
the time; it never stops) to its return, over the same number of steps. On CUDA wall time, synchronised
at the timing points only; on the CPU the thread's CPU time (``time.thread_time``), so other processes
of a busy machine do not count (run with ``OMP_NUM_THREADS=1``). Paths and models are interleaved over ``--rounds`` rounds; printed per model: the
ratio HF / native of the median per-token times (target <= 1.2) and whether the tokens were equal.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

import serengeti  # noqa: F401  (registers model_type "serengeti" with AutoModelForCausalLM)
from serengeti.models.generation import generate
from serengeti.models.backbone import build_model

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
MODELS = {"attention": ["model=transformer_pp"], "h3": ["model=h3"], "hyena": ["model=hyena"],
          "longconv": ["model=longconv"], "hyena_s5": ["model=hyena_s5"],
          "hybrid_h3": ["model=hybrid_h3", "model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=4"]}


class _FirstToken(StoppingCriteria):
    """Notes when ``generate`` has its first new token (after the prefill); never stops."""

    def __init__(self, clock) -> None:
        self.clock, self.t = clock, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.t is None:
            self.t = self.clock()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def export(name: str, out: Path, *, d_model: int, n_layer: int, vocab: int, l_max: int) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*MODELS[name], f"model.d_model={d_model}", f"model.n_layer={n_layer}",
                                                       f"model.vocab_size={vocab}", f"model.l_max={l_max}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    return build_model(model_cfg).save_pretrained(out / name, config={"model": model_cfg})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    def clock() -> float:
        if device.type != "cuda":
            return time.thread_time()  # CPU time of this thread: a busy machine's other processes do not count
        torch.cuda.synchronize(device)
        return time.perf_counter()

    n = args.new_tokens
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in args.models:
            folder = export(name, Path(tmp), d_model=args.d_model, n_layer=args.n_layer, vocab=args.vocab,
                            l_max=args.prompt + n)
            models[name] = AutoModelForCausalLM.from_pretrained(folder, device_map=device)
        times = {name: {"native": [], "hf": []} for name in models}
        equal = {}
        for _ in range(args.rounds):
            for name, hf in models.items():
                gen = generate(hf.backbone, prompt, n, temperature=0.0, clock=clock)
                times[name]["native"].append(gen.decode_s / (n - 1))
                first = _FirstToken(clock)
                out = hf.generate(prompt, max_new_tokens=n, do_sample=False, stopping_criteria=StoppingCriteriaList([first]))
                times[name]["hf"].append((clock() - first.t) / (n - 1))
                equal[name] = torch.equal(out[:, args.prompt:], gen.tokens)
    print(f"device={device.type} prompt={args.prompt} new_tokens={n} d_model={args.d_model} n_layer={args.n_layer} "
          f"vocab={args.vocab} rounds={args.rounds}")
    print(f"{'model':<10} {'HF/native per token':>20} {'tokens equal':>13}")
    for name, t in times.items():
        ratio = statistics.median(t["hf"]) / statistics.median(t["native"])
        print(f"{name:<10} {ratio:>20.3f} {str(equal[name]):>13}")


if __name__ == "__main__":
    main()
