"""benchmarks/roofline.py: the FLOP formulas equal what the ops actually run, and the script runs end to end.

Oracles: torch's ``FlopCounterMode`` for the matmul FLOPs and a dispatch mode that sees every FFT
the mixers call (its size, its rows, real or complex). No absolute times are asserted.
"""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_path = Path(__file__).parents[1] / "benchmarks" / "roofline.py"
_spec = importlib.util.spec_from_file_location("bench_roofline", _path)
roofline = sys.modules.setdefault("bench_roofline", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(roofline)

pytestmark = pytest.mark.usefixtures("one_thread")


class FFTFlops(TorchDispatchMode):
    """Sums ``roofline.fft_flops`` over every FFT dispatched (r2c / c2r real, c2c complex)."""

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if name.startswith("_fft_"):
            signal = args[0] if name.startswith("_fft_r2c") else out  # the real / full-length side
            self.flops += roofline.fft_flops(signal.shape[-1], signal.numel() // signal.shape[-1], name.startswith("_fft_c2c"))
        return out


class _Args:
    num_heads = 4


# L = 256: H3's shift filter takes its FFT path; L = 1100 (B 2, 36 chunk rows): its Toeplitz path
@pytest.mark.parametrize("L", [256, 1100])
@pytest.mark.parametrize("name", roofline.TRAIN_MIXERS)
def test_training_formulas_count_what_runs(name, L):
    B, D = 2, 32
    torch.manual_seed(0)
    mixer = roofline.BUILDERS[name](D, L, _Args()).train()
    x = torch.randn(B, L, D, requires_grad=True)
    flop_counter, fft_counter = FlopCounterMode(display=False), FFTFlops()
    with flop_counter, fft_counter:
        mixer(x).backward(torch.randn(B, L, D))
    work = roofline.train_work(name, mixer, B, L)
    counted_mm = flop_counter.get_total_flops()
    if name == "attention":  # torch's counter has no formula for CPU SDPA: compare the projections
        counted_mm += 6 * B * L * L * D
    # the short depthwise convolution's few FLOPs are the only matmul work the formulas leave out
    assert counted_mm == pytest.approx(work.matmul, rel=0.02)
    assert fft_counter.flops == pytest.approx(work.fft, rel=1e-9, abs=1.0)


@pytest.mark.parametrize("name", roofline.GEN_MODELS)
def test_step_weights_are_what_one_step_multiplies(name):
    from generation import build  # benchmarks/ is on sys.path once roofline is loaded

    model = build(name, d_model=32, n_layer=2, vocab=100, l_max=64)
    state = model.allocate_state(1, max_len=8)
    with torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long), state=state, num_last_tokens=1)
        counter = FlopCounterMode(display=False)
        with counter:
            model.step(torch.zeros(1, dtype=torch.long), state)
    weights = roofline.step_weights(model)
    work = roofline.step_work(model, 4)
    # 2 FLOPs per weight, of which biases, norms and the short conv are not matmuls; the state
    # work (``other``) holds the S5's B̄u / C̃x products, elementwise for the other mixers
    assert work.matmul == 2 * weights and work.bytes >= 4 * weights
    assert 0.8 * work.matmul <= counter.get_total_flops() <= work.matmul + work.other


def test_bound_picks_the_binding_ceiling():
    c = roofline.Ceilings(matmul={1: 1e10}, copy={1: 1e9}, triad={1: 1e9}, fft={1024: 5e9, 8192: 2e9}, fft_threads=1)
    assert c.fft_at(2048) == 5e9 and c.fft_at(16384) == 2e9
    t, binding = roofline.Work(matmul=1e10, fft=2e9, n=8192, bytes=1e6).bound(c, 1)
    assert binding == "compute" and t == pytest.approx(1.0 + 1.0)
    t, binding = roofline.Work(matmul=1e6, fft=0.0, n=1, bytes=3e9).bound(c, 1)
    assert binding == "memory" and t == pytest.approx(3.0)
    assert roofline.fft_flops(8, 2) == 2 * 2.5 * 8 * 3 and roofline.fft_flops(8, 1, complex_=True) == 5 * 8 * math.log2(8)


def test_script_prints_a_table_and_plot(tmp_path, capsys):
    rows = roofline.main(["--lengths", "128", "--mixers", "hyena", "attention", "--gen-models", "hyena_s5",
                          "--vocabs", "64", "--context", "16", "--steps", "2", "--repeats", "1", "--d-model", "32",
                          "--n-layer", "1", "--stream-mib", "1", "--matmul-n", "128", "--min-time", "0.01", "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    assert "| train hyena L=128 |" in out and "| step hyena_s5 V=64 C=16 |" in out and "load " in out
    assert len(rows) == 3 and all(r["fraction"] > 0 and math.isfinite(r["fraction"]) for r in rows)
    assert (tmp_path / "r.png").stat().st_size > 0
