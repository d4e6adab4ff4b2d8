"""shakespeare_char: nanoGPT's split, the plain config options it needs, and equal parameter counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from conftest import SHARED_DATA, compose_cfg
from serengeti.config_resolvers import val_epochs
from serengeti.data.text import TinyShakespeare
from serengeti.models.backbone import LMHeadModel, MLP, build_model
from serengeti.training.optim import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
needs_text = pytest.mark.skipif(not TEXT.is_file(), reason=f"Tiny Shakespeare not found at {TEXT} (shared/data beside the repo)")
MIXERS = ["transformer", "transformer_pp", "h3", "hyena", "hyena_s5", "longconv", "hybrid"]


@needs_text
def test_split_is_nanogpts(tmp_path):
    """Train = first int(0.9 n) characters, validation = the rest, ids = ranks in the sorted character set."""
    text = TEXT.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # nanoGPT data/shakespeare_char/prepare.py
    chars = sorted(set(text))
    dm = TinyShakespeare(path=str(TEXT), split_fractions=[0.9, 0.1, 0.0], test_split="validation", seq_len=64,
                         batch_size=12, cache_dir=str(tmp_path))
    assert dm.vocab_size == len(chars) == 65
    for role, part in (("train", text[:cut]), ("val", text[cut:]), ("test", text[cut:])):
        expected = np.array([chars.index(c) for c in part[:2000]] + [chars.index(c) for c in part[-50:]])
        tokens = dm.role_tokens(role)
        assert len(tokens) == len(part)
        np.testing.assert_array_equal(np.concatenate([tokens[:2000], tokens[-50:]]), expected)


@needs_text
def test_empty_test_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"dataset\.test_split='test' is empty"):
        TinyShakespeare(path=str(TEXT), split_fractions=[0.9, 0.1, 0.0], seq_len=64, batch_size=12, cache_dir=str(tmp_path))


def test_experiment_config_is_nanogpts_setting():
    cfg = compose_cfg(["experiment=shakespeare_char/transformer"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.mixer.num_heads) == (4, 128, 4)
    assert (cfg.dataset.seq_len, cfg.dataset.batch_size, cfg.trainer.max_steps) == (64, 12, 2000)
    assert list(cfg.dataset.split_fractions) == [0.9, 0.1, 0.0] and cfg.dataset.test_split == "validation"
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.weight_decay) == (1e-3, [0.9, 0.99], 0.1)
    assert cfg.optimizer.weight_decay_policy == "matrices"
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps, cfg.scheduler.min_lr_ratio) == ("cosine", 100, 0.1)
    assert (cfg.trainer.gradient_clip_val, cfg.model.embed_dropout, cfg.model.resid_dropout) == (1.0, 0.0, 0.0)
    assert (cfg.model.gelu, cfg.model.bias, cfg.model.mixer.bias) == ("exact", False, False)
    assert cfg.trainer.val_check_interval == 250 and cfg.trainer.check_val_every_n_epoch is None


def _non_position_params(name: str, l_max: int) -> int:
    cfg = compose_cfg([f"experiment=shakespeare_char/{name}"])
    with open_dict(cfg):
        cfg.model.vocab_size, cfg.model.l_max = 65, l_max
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    pos = model.position_embeddings.weight.numel() if model.position_embeddings is not None else 0
    return sum(p.numel() for p in model.parameters()) - pos


def test_nanogpt_parameter_count():
    """nanoGPT (bias=False) 4x128 at vocab 65: 4 * 12 * 128^2 weights + 65 * 128 embedding + 9 LayerNorm gains."""
    assert _non_position_params("transformer", 64) == 4 * 12 * 128**2 + 65 * 128 + 9 * 128


@pytest.mark.parametrize("l_max", [64, 1024])
def test_mixers_have_equal_parameter_counts(l_max):
    """Within 5 % of the Transformer, except the long convolution at 1024, whose explicit kernels
    (2 per channel, l_max taps) grow with the context: exactly 4 * 2 * 128 * (1024 - 64) more."""
    counts = {m: _non_position_params(m if l_max == 64 else f"long/{m}", l_max) for m in MIXERS}
    ref = counts["transformer"]
    if l_max == 1024:
        assert counts.pop("longconv") == _non_position_params("longconv", 64) + 4 * 2 * 128 * (1024 - 64)
    assert all(abs(n / ref - 1) <= 0.05 for n in counts.values()), counts


def test_long_context_keeps_the_token_budget():
    short, long = compose_cfg(["experiment=shakespeare_char/hyena"]), compose_cfg(["experiment=shakespeare_char/long/hyena"])
    tokens = lambda c: c.dataset.seq_len * c.dataset.batch_size * c.trainer.max_steps  # noqa: E731
    assert long.dataset.seq_len == 1024 and tokens(long) == tokens(short) == 1_536_000


def test_matrices_weight_decay_policy():
    """Decayed = exactly nanoGPT's rule (p.dim() >= 2: Linear weights and embeddings); tags still win."""
    model = LMHeadModel(d_model=16, n_layer=2, vocab_size=11, mixer=lambda d, **kw: nn.Linear(d, d), bias=True,
                        max_position_embeddings=8)
    model.layers[0].mixer.weight._optim = {"weight_decay": 0.0}
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, policy="matrices")
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    expected = {n for n, p in model.named_parameters() if p.dim() >= 2} - {"layers.0.mixer.weight"}
    assert decayed == expected
    assert {"word_embeddings.weight", "position_embeddings.weight", "layers.1.mlp.fc1.weight"} <= decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_gelu_options_against_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    for gelu, act in (("exact", lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))),
                      ("tanh", lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3))))):
        mlp = MLP(8, 16, gelu=gelu)
        expected = act(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        torch.testing.assert_close(mlp(x), expected)
    with pytest.raises(ValueError, match="model.gelu"):
        MLP(8, 16, gelu="relu")


def test_bias_off_removes_mlp_and_layernorm_biases():
    model = LMHeadModel(d_model=16, n_layer=2, vocab_size=11, mixer=lambda d, **kw: nn.Identity(), bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    with_bias = LMHeadModel(d_model=16, n_layer=2, vocab_size=11, mixer=lambda d, **kw: nn.Identity())
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in model.parameters()) == 2 * (2 * 16 + 64 + 16) + 16


def test_val_check_interval_is_the_one_key():
    assert val_epochs(250) is None and val_epochs(None) == 1 and val_epochs(0.5) == 1
    cfg = compose_cfg(["trainer.val_check_interval=100"])
    assert cfg.trainer.check_val_every_n_epoch is None
    assert compose_cfg([]).trainer.check_val_every_n_epoch == 1
