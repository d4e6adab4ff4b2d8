"""benchmarks/gpu_check.py: refuses in one line without CUDA; --dry-run lists every check anywhere."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from entry_runs import run_in_process, run_subprocess

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check runs instead of refusing")
def test_refuses_in_one_line_without_cuda(tmp_path):
    res = run_subprocess("benchmarks/gpu_check.py", ["--json", str(tmp_path / "out.json")], timeout=120)
    assert res.returncode == 2
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("gpu_check: no CUDA GPU visible")
    assert not (tmp_path / "out.json").exists()


def test_dry_run_lists_every_check():
    res = run_in_process("benchmarks/gpu_check.py", ["--dry-run"])  # the refusal above runs a real interpreter
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train", "attention", "distributed", "speed", "throughput"]
    for mixer in ("attention", "h3", "hyena", "hyena_s5", "longconv", "s5"):
        assert mixer in lines[0]
    assert "65536" in lines[3] and "owt/" in lines[4]


def test_the_checked_models_build_from_the_configs():
    """The configurations the GPU checks build (tiny here, on CPU): a config error shows up without a GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 32))
    for name, overrides in gpu_check.MIXERS.items():
        heads = ["model.mixer.num_heads=4"] if name == "attention" else []
        model = gpu_check.build_lm(overrides + heads, device="cpu", d_model=32, n_layer=1, d_inner=None, vocab_size=64, l_max=32)
        assert model(x).shape == (2, 32, 64), name
    for name in gpu_check.MODELS_125M:
        cfg = gpu_check._compose([f"experiment=owt/{name}"])
        assert (cfg.model.d_model, cfg.model.n_layer, cfg.dataset.seq_len) == (768, 12, 1024)
