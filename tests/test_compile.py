"""model.compile=true: each residual block compiled in place; compiled == eager for every mixer (fwd and bwd)."""
from __future__ import annotations

import pytest
import torch

from conftest import MIXERS, build_mixer, compose_cfg, tiny_overrides
from serengeti.training.run import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, L = 32, 64


def test_model_compile_compiles_every_block_and_keeps_parameter_names(tmp_path):
    _, plain = prepare(compose_cfg(tiny_overrides(tmp_path), output_dir=tmp_path))
    _, compiled = prepare(compose_cfg(tiny_overrides(tmp_path) + ["model.compile=true"], output_dir=tmp_path))
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    assert plain.model.layers[0]._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints and FSDP see the plain names


def test_eager_regions_are_marked():
    from serengeti.ops.scan import linear_scan
    from serengeti.ops.ssm_kernel import power_tables

    for fn in (linear_scan, power_tables):
        assert getattr(fn, "_torchdynamo_disable", False), f"{fn.__name__} is not marked torch.compiler.disable"


@pytest.mark.slow  # inductor compiles C++ on CPU: 20-90 s per mixer on a 2-core machine
@pytest.mark.parametrize("name", list(MIXERS))
def test_compiled_mixer_matches_eager(name):
    mixer = build_mixer(name, D_MODEL, L)
    x = torch.randn(2, L, D_MODEL, requires_grad=True)
    g = torch.randn(2, L, D_MODEL, generator=torch.Generator().manual_seed(1))

    def fwd_bwd(fn):
        x.grad = None
        mixer.zero_grad()
        y = fn(x)
        (y * g).sum().backward()  # a random upstream gradient: no cancellation that float32 sums would amplify
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in mixer.parameters() if p.grad is not None]

    y, gx, gp = fwd_bwd(mixer)
    torch._dynamo.reset()
    yc, gxc, gpc = fwd_bwd(torch.compile(mixer))
    assert (yc - y).abs().max() <= 1e-5
    assert (gxc - gx).abs().max() <= 1e-5
    assert len(gp) == len(gpc) and all((a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()) for a, b in zip(gpc, gp))
