"""The LM backbone: block order, init, tying, vocab padding, hybrids, causality, step == forward."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from serengeti.mixers import Attention
from serengeti.models.backbone import LMHeadModel


def tiny_lm(**kw) -> LMHeadModel:
    args = dict(d_model=32, n_layer=2, vocab_size=13, mixer=functools.partial(Attention, num_heads=2), l_max=64,
                embed_dropout=0.0)
    args.update(kw)
    return LMHeadModel(**args)


def test_forward_backward_one_batch():
    torch.manual_seed(0)
    model = tiny_lm(pad_vocab_size_multiple=8)
    x = torch.randint(0, 13, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 16) and model.padded_vocab_size == 16
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_head_tied_to_embedding_and_gpt2_init():
    torch.manual_seed(0)
    n_layer = 4
    model = tiny_lm(d_model=256, n_layer=n_layer, vocab_size=5000)
    assert model.lm_head.weight is model.word_embeddings.weight
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    assert std(model.word_embeddings.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].mixer.Wqkv.weight) == pytest.approx(0.02, rel=0.05)
    rescaled = 0.02 / math.sqrt(2 * n_layer)
    assert std(model.layers[0].mixer.out_proj.weight) == pytest.approx(rescaled, rel=0.05)
    assert std(model.layers[1].mlp.fc2.weight) == pytest.approx(rescaled, rel=0.05)
    assert std(model.layers[1].mlp.fc1.weight) == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.layers[0].mlp.fc1.bias) == 0


def test_lecun_init_matches_the_flax_defaults():
    """init_scheme=lecun: Linear and short-conv taps truncated normal with std 1/sqrt(fan_in) cut at 2 std,
    Embedding std 1/sqrt(d), out_proj/fc2 GPT-2's 0.02/sqrt(2 n_layer), zero biases; S5 keeps its own init."""
    from serengeti.mixers import HyenaS5

    torch.manual_seed(0)
    n_layer, d = 2, 256
    hyena_s5 = functools.partial(HyenaS5, ssm_size=8, blocks=1, activation="half_glu2")
    model = tiny_lm(d_model=d, n_layer=n_layer, vocab_size=5000, init_scheme="lecun", mixer=hyena_s5)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    mixer = model.layers[0].mixer
    assert std(model.word_embeddings.weight) == pytest.approx(d ** -0.5, rel=0.05)
    for w, fan_in in [(mixer.in_proj.weight, d), (model.layers[1].mlp.fc1.weight, d), (mixer.ssm[0].out2.weight, d),
                      (mixer.short_filter.weight, 3)]:
        assert std(w) == pytest.approx(fan_in ** -0.5, rel=0.05)
        assert w.abs().max().item() <= 2 * fan_in ** -0.5 / 0.8796 + 1e-6  # truncated at 2 sigma of the raw normal
    assert std(model.layers[1].mlp.fc2.weight) == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)
    assert std(mixer.out_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)
    assert torch.count_nonzero(mixer.short_filter.bias) == 0 and torch.count_nonzero(mixer.in_proj.bias) == 0
    torch.manual_seed(0)
    s5 = tiny_lm(d_model=d, n_layer=n_layer, vocab_size=5000, mixer=hyena_s5)
    torch.testing.assert_close(s5.layers[0].mixer.ssm[0].B, mixer.ssm[0].B)  # the S5's own parameters are untouched


def _ks_statistic(sample: torch.Tensor, std: float) -> float:
    """Kolmogorov-Smirnov distance sup |F_n - Phi_std| between a flat sample and N(0, std^2), in float64."""
    x, _ = torch.sort(sample.detach().double().flatten() / std)
    n = x.numel()
    cdf = torch.special.ndtr(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def _ks_critical(n: int, alpha: float = 1e-3) -> float:
    """Asymptotic KS critical value at level ``alpha``: sqrt(-ln(alpha / 2) / 2) / sqrt(n)."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


@pytest.mark.parametrize("init_scheme, std", [("lecun", 64 ** -0.5), ("gpt2", 0.02)])
def test_tied_embedding_follows_the_embedding_init(init_scheme, std):
    """The tied LM head is not re-initialised as a Linear: the word embedding is N(0, std^2) by a KS test
    (lecun: std 1/sqrt(d); gpt2: initializer_range), and the KS check does reject lecun's truncated Linear law."""
    from serengeti.ops.init import lecun_normal_

    torch.manual_seed(0)
    d = 64
    model = tiny_lm(d_model=d, vocab_size=4000, init_scheme=init_scheme)
    weight = model.word_embeddings.weight
    assert model.lm_head.weight is weight
    assert _ks_statistic(weight, std) < _ks_critical(weight.numel())
    truncated = lecun_normal_(torch.empty(4000, d), fan_in=d)  # what the re-initialised head used to leave
    assert _ks_statistic(truncated, d ** -0.5) > 3 * _ks_critical(truncated.numel())


def test_unknown_init_scheme_is_rejected():
    with pytest.raises(ValueError, match="model.init_scheme"):
        tiny_lm(init_scheme="xavier")


def test_max_seq_len_is_the_tightest_bound_of_mixers_and_positions():
    """Hyena's filters live on l_max positions; S5, Hyena-S5, H3, the long convolution and position-free
    attention take any length, and really run past l_max, causally (the first outputs equal a short run's)."""
    from serengeti.mixers import H3, Hyena, HyenaS5, LongConv

    assert tiny_lm(l_max=24, mixer=functools.partial(Hyena, filter_order=8)).max_seq_len == 24
    assert tiny_lm(l_max=24, attn_layer_idx=[1], mixer=functools.partial(Hyena, filter_order=8)).max_seq_len == 24
    assert tiny_lm(l_max=24, max_position_embeddings=20).max_seq_len == 20
    x = torch.randint(0, 13, (2, 60))
    for mixer in (functools.partial(HyenaS5, ssm_size=4, blocks=1), functools.partial(H3, d_state=4),
                  functools.partial(LongConv, channels=1), functools.partial(Attention, num_heads=2)):
        torch.manual_seed(0)
        model = tiny_lm(l_max=24, mixer=mixer).eval()
        assert model.max_seq_len is None
        torch.testing.assert_close(model(x)[:, :24], model(x[:, :24]), rtol=1e-5, atol=1e-5)


def test_block_order_matches_reference():
    """Recompute the forward by hand in the reference order: dropout -> add -> LN -> mixer -> dropout -> add -> LN -> MLP."""
    torch.manual_seed(0)
    model = tiny_lm().eval()
    x = torch.randint(0, 13, (2, 9))
    h, residual = model.word_embeddings(x), None
    for layer in model.layers:
        residual = h if residual is None else h + residual
        h = layer.mixer(layer.norm1(residual))
        residual = h + residual
        h = layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.norm2(residual)), approximate="tanh"))
    expected = model.lm_head(model.ln_f(h + residual))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_hybrid_uses_attention_at_given_indices():
    from serengeti.mixers.base import Mixer

    class Identity(Mixer):
        def forward(self, x, state=None):
            return x

    def factory(d_model, *, layer_idx, l_max, device=None, dtype=None):
        return Identity(d_model, layer_idx=layer_idx, l_max=l_max)

    model = tiny_lm(n_layer=4, mixer=factory, attn_layer_idx=[1, 3], attn_cfg={"num_heads": 4, "dropout": 0.1})
    kinds = [type(layer.mixer).__name__ for layer in model.layers]
    assert kinds == ["Identity", "Attention", "Identity", "Attention"]
    assert model.layers[1].mixer.num_heads == 4 and model.layers[1].mixer.dropout == 0.1
    with pytest.raises(ValueError, match="attn_layer_idx"):
        tiny_lm(n_layer=2, attn_layer_idx=[2])


def test_invalid_heads_message_names_key():
    with pytest.raises(ValueError, match="num_heads.*model.d_model"):
        tiny_lm(mixer=functools.partial(Attention, num_heads=5))


def test_model_is_causal():
    torch.manual_seed(0)
    model = tiny_lm(max_position_embeddings=64).double().eval()
    x = torch.randint(0, 13, (2, 20))
    y = x.clone()
    y[:, 11:] = (y[:, 11:] + 1) % 13
    torch.testing.assert_close(model(x)[:, :11], model(y)[:, :11], rtol=0, atol=1e-12)


def test_generation_state_step_equals_forward():
    torch.manual_seed(0)
    model = tiny_lm(max_position_embeddings=64).eval()
    x = torch.randint(0, 13, (2, 12))
    full = model(x)
    state = model.allocate_state(2, max_len=12)
    prefill = model(x[:, :5], state=state)
    torch.testing.assert_close(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        torch.testing.assert_close(model.step(x[:, t], state), full[:, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model.step(x[:, 0], state)


# --- Transformer++ options: model.positions, model.norm, model.mlp ------------------------------------------
def _option_mixers():
    """One small factory per causal mixer; the non-attention ones run as hybrids (attention in block 1),
    so that rotary positions act in every model."""
    from serengeti.mixers import H3, Hyena, HyenaS5, LongConv, S5

    return {
        "attention": (functools.partial(Attention, num_heads=2), []),
        "h3": (functools.partial(H3, d_state=8), [1]),
        "hyena": (functools.partial(Hyena, filter_order=8), [1]),
        "longconv": (functools.partial(LongConv, channels=1, dropout=0.0, kernel_dropout=0.0), [1]),
        "s5": (functools.partial(S5, ssm_size=8, blocks=2), [1]),
        "hyena_s5": (functools.partial(HyenaS5, ssm_size=8, blocks=2), [1]),
    }


@pytest.mark.parametrize("name", sorted(_option_mixers()))
def test_step_equals_forward_with_rotary_rmsnorm_swiglu(name):
    """Prefill then one token at a time gives the forward's logits, in float64, for every mixer with the
    Transformer++ options on (the attention blocks rotate by absolute position through the KV cache)."""
    mixer, attn_layer_idx = _option_mixers()[name]
    torch.manual_seed(0)
    model = tiny_lm(mixer=mixer, attn_layer_idx=attn_layer_idx, attn_cfg={"num_heads": 2}, positions="rotary",
                    norm="rmsnorm", mlp="swiglu", bias=False, l_max=24, dtype=torch.float64).eval()
    assert any(layer.mixer.rotary for layer in model.layers if isinstance(layer.mixer, Attention))
    assert isinstance(model.layers[0].norm1, torch.nn.RMSNorm) and isinstance(model.ln_f, torch.nn.RMSNorm)
    x = torch.randint(0, 13, (2, 20))
    full = model(x)
    state = model.allocate_state(2, max_len=20)
    torch.testing.assert_close(model(x[:, :6], state=state), full[:, :6], rtol=1e-10, atol=1e-10)
    for t in range(6, 20):
        torch.testing.assert_close(model.step(x[:, t], state), full[:, t], rtol=1e-10, atol=1e-10)


def test_rotary_model_is_causal_and_runs_past_the_training_length():
    torch.manual_seed(0)
    model = tiny_lm(positions="rotary", l_max=16).double().eval()
    assert model.max_seq_len is None
    x = torch.randint(0, 13, (2, 40))
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 1) % 13
    torch.testing.assert_close(model(x)[:, :25], model(y)[:, :25], rtol=0, atol=1e-12)


def test_swiglu_and_rmsnorm_by_hand():
    """Block 0 of a Transformer++ recomputed: RMSNorm = x / sqrt(mean x^2 + eps) * w, SwiGLU = fc2(a * silu(g))."""
    torch.manual_seed(0)
    model = tiny_lm(norm="rmsnorm", mlp="swiglu", d_inner=96, n_layer=1).double().eval()
    block = model.layers[0]
    assert block.mlp.fc1.weight.shape == (2 * 64, 32) and block.mlp.fc2.weight.shape == (32, 64)  # 2/3 * 96 = 64
    with torch.no_grad():
        block.norm2.weight.uniform_(0.5, 1.5)
    r = torch.randn(3, 32, dtype=torch.float64)
    rms = (r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)) * block.norm2.weight
    torch.testing.assert_close(block.norm2(r), rms, rtol=0, atol=1e-12)
    w1, b1 = block.mlp.fc1.weight, block.mlp.fc1.bias
    a, g = r @ w1[:64].T + b1[:64], r @ w1[64:].T + b1[64:]
    expected = (a * g * torch.sigmoid(g)) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    torch.testing.assert_close(block.mlp(r), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_inner, hidden", [(3072, 2048), (256, 168), (128, 88), (6, 8)])
def test_swiglu_width_rule(d_inner, hidden):
    from serengeti.models.backbone import swiglu_hidden

    assert swiglu_hidden(d_inner) == hidden
    if d_inner >= 128:  # three D x hidden matrices hold the GELU MLP's two D x d_inner within 5 %
        assert abs(3 * hidden / (2 * d_inner) - 1) < 0.05


def test_positions_options_are_checked():
    with pytest.raises(ValueError, match="model.positions must be one of"):
        tiny_lm(positions="alibi")
    with pytest.raises(ValueError, match=r"model.positions=learned needs model.max_position_embeddings > 0"):
        tiny_lm(positions="learned")
    with pytest.raises(ValueError, match=r"model.max_position_embeddings=64 .* model.positions=rotary"):
        tiny_lm(positions="rotary", max_position_embeddings=64)
    from serengeti.mixers import H3

    with pytest.raises(ValueError, match="model.positions=rotary .* model.attn_layer_idx is empty"):
        tiny_lm(positions="rotary", mixer=functools.partial(H3, d_state=4))
    with pytest.raises(ValueError, match="model.norm must be one of"):
        tiny_lm(norm="batchnorm")
    with pytest.raises(ValueError, match="model.mlp must be one of"):
        tiny_lm(mlp="relu")


def test_configs_before_the_options_keep_their_meaning():
    """A model config without positions/norm/mlp (every checkpoint and export written before them) builds the
    model it always did: learned positions iff max_position_embeddings > 0, LayerNorm with bias, GELU MLP;
    the weight names and shapes are unchanged, so those checkpoints load."""
    from serengeti.models.backbone import build_model

    old = {"d_model": 32, "n_layer": 2, "vocab_size": 13, "l_max": 16, "max_position_embeddings": 16,
           "mixer": {"_target_": "serengeti.mixers.Attention", "_partial_": True, "num_heads": 2}}
    model = build_model(old)
    assert model.positions == "learned" and model.position_embeddings.weight.shape == (16, 32)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.0.norm1.bias"] == (32,) and shapes["ln_f.bias"] == (32,)
    assert shapes["layers.1.mlp.fc1.weight"] == (128, 32) and shapes["layers.1.mlp.fc2.weight"] == (32, 128)
    assert not any(layer.mixer.rotary for layer in model.layers)
    assert build_model({**old, "max_position_embeddings": 0}).positions == "none"


def test_rotary_is_set_by_model_positions_not_by_the_mixer_config():
    """One key for one choice: a config that sets attention's rotary itself is refused, naming the key."""
    from serengeti.models.backbone import build_model
    from serengeti.errors import UnsafeConfigError

    attention = {"_target_": "serengeti.mixers.Attention", "_partial_": True}
    cfg = {"d_model": 32, "n_layer": 1, "vocab_size": 13, "l_max": 16, "mixer": attention}
    with pytest.raises(UnsafeConfigError, match="model.mixer.rotary"):
        build_model({**cfg, "mixer": {**attention, "rotary": True}})
    with pytest.raises(UnsafeConfigError, match="model.attn_cfg.rotary"):
        build_model({**cfg, "attn_cfg": {"rotary": True}})
    assert build_model({**cfg, "positions": "rotary"}).layers[0].mixer.rotary
