"""``model.compile=true``: torch.compile the backbone, one residual block at a time.

Each :class:`~serengeti.models.backbone.Block` is compiled in place with ``nn.Module.compile``, so parameter
names (checkpoints, FSDP's per-block wrapping, optimizer groups) are those of the plain model, and
identical blocks share one compiled graph. The embedding and the LM head stay eager (a gather and one
matmul: nothing to fuse). Two regions run eagerly inside the compiled blocks, marked where they are
defined with ``torch.compiler.disable``: :func:`serengeti.ops.scan.linear_scan` (S5 and Hyena-S5: a
loop over time, or a custom autograd function, on complex states) and
:func:`serengeti.ops.ssm_kernel.power_tables` (H3: complex128 tables filled in place). The FFT
convolutions (Hyena, H3, LongConv) compile: inductor calls the FFT kernels inside the graph.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def compile_backbone(model: nn.Module, **options: Any) -> nn.Module:
    """Compile every block of ``model.layers`` in place (``options``: torch.compile arguments); returns ``model``."""
    for block in model.layers:
        block.compile(**options)
    return model
