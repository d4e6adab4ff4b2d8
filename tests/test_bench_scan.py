"""benchmarks/scan.py: every baseline computes the same S5 layer as ours (so its ratios compare like with like)."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench_scan", Path(__file__).parents[1] / "benchmarks" / "scan.py")
bench_scan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_scan)


@pytest.mark.parametrize("ssm_size, conj_sym", [(8, False), (8, True)])
def test_baselines_match_our_layer(ssm_size, conj_sym):
    m_auto, m_log = bench_scan.build(4, ssm_size, conj_sym)
    methods = bench_scan.make_methods(m_auto, m_log, ["ours", "log", "loop", "fft", "assoc"])
    u = torch.randn(2, 50, 4, requires_grad=True)
    ref = methods["ours"](u)
    g_ref = torch.autograd.grad(ref.square().sum(), [u, m_auto.B])
    for name in ("log", "loop", "fft", "assoc"):
        y = methods[name](u)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        if name != "log":  # log uses its own (identical) copy of the parameters
            for a, b in zip(torch.autograd.grad(y.square().sum(), [u, m_auto.B]), g_ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bench_prints_a_ratio_table(capsys):
    med = bench_scan.bench(1, 40, 4, 8, True, ["ours", "loop"], repeats=1)
    assert set(med) == {"ours", "loop"} and all(t > 0 for t in med.values())
    text = bench_scan.table([("tiny", med)], ["ours", "loop"])
    assert "loop / ours" in text and "| tiny |" in text
