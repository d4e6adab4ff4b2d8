"""Converters from the reference (safari / H3) checkpoint layouts, checked against float64 reference
forwards written here from the equations in docs/mixers.md (direct convolutions, step-by-step SSM)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from serengeti.convert import ConversionError, convert, main, remap_legacy
from serengeti.models.pretrained import load_model

ROWS, VOCAB = 40, 37  # embedding rows (padded to a multiple of 8) and tokenizer vocabulary
D, D_INNER = 8, 20


# --- reference state dicts with random values --------------------------------------------------

def _lin(sd, name, out_dim, in_dim, g, bias=True):
    sd[name + ".weight"] = torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim)
    if bias:
        sd[name + ".bias"] = 0.1 * torch.randn(out_dim, generator=g)


def ref_backbone(n_layer, g):
    sd = {"backbone.embeddings.word_embeddings.weight": torch.randn(ROWS, D, generator=g)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"] = 1 + 0.2 * torch.randn(D, generator=g)
            sd[p + n + ".bias"] = 0.2 * torch.randn(D, generator=g)
        _lin(sd, p + "mlp.fc1", D_INNER, D, g)
        _lin(sd, p + "mlp.fc2", D, D_INNER, g)
    sd["backbone.ln_f.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    sd["backbone.ln_f.bias"] = 0.2 * torch.randn(D, generator=g)
    sd["lm_head.weight"] = sd["backbone.embeddings.word_embeddings.weight"].clone()
    return sd


def ref_h3_layer(sd, p, g, N=8, head_dim=1, n_ssm=None):
    H = D // head_dim
    S = n_ssm or H
    for n in ("q_proj", "k_proj", "v_proj", "output_linear"):
        _lin(sd, p + n, D, D, g)
    sd[p + "ssm_k_kernel.kernel.B"] = torch.randn(D, N, generator=g)  # trained B, not e_1
    sd[p + "ssm_k_kernel.kernel.C"] = (torch.rand(1, D, N, generator=g) * 2 - 1) / math.sqrt(N)
    sd[p + "ssm_k_D"] = torch.randn(D, generator=g)
    sd[p + "kernel.kernel.C"] = 0.7 * torch.randn(1, H, N // 2, 2, generator=g)
    sd[p + "kernel.kernel.log_dt"] = torch.rand(H, generator=g) * math.log(100) + math.log(1e-3)
    sd[p + "kernel.kernel.B"] = torch.randn(S, N // 2, 2, generator=g)
    sd[p + "kernel.kernel.inv_A_real"] = torch.log(0.2 + 0.8 * torch.rand(S, N // 2, generator=g))
    sd[p + "kernel.kernel.A_imag"] = math.pi * torch.arange(N // 2).float() + 0.3 * torch.randn(S, N // 2, generator=g)
    sd[p + "D"] = torch.randn(H, generator=g)


def ref_attn_layer(sd, p, g):
    _lin(sd, p + "Wqkv", 3 * D, D, g)
    _lin(sd, p + "out_proj", D, D, g)


def ref_hyena_layer(sd, p, g, order=2, l_max=16, emb_dim=5, width=6, inner=2, short=3):
    C, Fc = (order + 1) * D, D * (order - 1)
    _lin(sd, p + "in_proj", C, D, g)
    _lin(sd, p + "out_proj", D, D, g)
    sd[p + "short_filter.weight"] = torch.randn(C, 1, short, generator=g) / math.sqrt(short)
    sd[p + "short_filter.bias"] = 0.1 * torch.randn(C, generator=g)
    f = p + "filter_fn."
    sd[f + "bias"] = torch.randn(Fc, generator=g)
    sd[f + "pos_emb.z"] = torch.randn(1, l_max, emb_dim, generator=g)
    sd[f + "pos_emb.t"] = torch.linspace(0, 1, l_max)[None, :, None]
    sd[f + "modulation.deltas"] = -torch.rand(1, 1, Fc, generator=g) * 10
    _lin(sd, f + "implicit_filter.0", width, emb_dim, g)
    freq = 1 + torch.rand(1, width, generator=g)
    for j in range(inner):
        _lin(sd, f"{f}implicit_filter.{2 * j + 2}", width, width, g)
    _lin(sd, f"{f}implicit_filter.{2 * inner + 2}", Fc, width, g, bias=False)
    for j in range(inner + 1):
        sd[f"{f}implicit_filter.{2 * j + 1}.freq"] = freq  # one shared Sin module


# --- float64 reference forwards (from the equations) --------------------------------------------

def r(sd, k):
    return sd[k].double()


def linear(sd, name, x):
    y = x @ r(sd, name + ".weight").T
    return y + r(sd, name + ".bias") if name + ".bias" in sd else y


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_conv(k, u):
    """y[..., c, t] = sum_{s<=t} k[c, t-s] u[..., c, s] (direct O(L^2))."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(t + 1):
            y[..., t] += k[:, t - s] * u[..., s]
    return y


def h3_ref(sd, p, u, head_dim=1):
    """H3 block mixer: u (B, L, D) -> (B, L, D)."""
    q, k, v = (linear(sd, p + n, u).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))  # (B, D, L)
    Bs, Cs = r(sd, p + "ssm_k_kernel.kernel.B"), r(sd, p + "ssm_k_kernel.kernel.C")[0]
    N = Bs.shape[1]
    taps = torch.stack([sum(Bs[:, n] * Cs[:, n + j] for n in range(N - j)) for j in range(N)], dim=1)  # (D, N)
    taps = F.pad(taps, (0, max(0, u.shape[1] - N)))[:, : u.shape[1]]
    ks = causal_conv(taps, k) + r(sd, p + "ssm_k_D")[:, None] * k
    H, hd = D // head_dim, head_dim
    # kv[b, d1, d2, h, t] = ks[b, h*hd + d1, t] * v[b, h*hd + d2, t]
    kv = torch.einsum("bhit,bhjt->bijht", ks.reshape(-1, H, hd, ks.shape[-1]), v.reshape(-1, H, hd, v.shape[-1]))
    S = sd[p + "kernel.kernel.inv_A_real"].shape[0]
    rows = torch.arange(H) % S
    A = torch.complex(-torch.exp(r(sd, p + "kernel.kernel.inv_A_real")), r(sd, p + "kernel.kernel.A_imag"))[rows]
    Bc = torch.view_as_complex(r(sd, p + "kernel.kernel.B").contiguous())[rows]
    Cc = torch.view_as_complex(r(sd, p + "kernel.kernel.C")[0].contiguous())
    dt = torch.exp(r(sd, p + "kernel.kernel.log_dt"))[:, None]
    dA = (1 + dt * A / 2) / (1 - dt * A / 2)
    dB = dt * Bc / (1 - dt * A / 2)
    x = torch.zeros(*kv.shape[:-1], A.shape[-1], dtype=torch.complex128)
    y = torch.zeros_like(kv)
    for t in range(kv.shape[-1]):  # step-by-step recurrence
        x = dA * x + dB * kv[..., t, None]
        y[..., t] = 2 * (Cc * x).sum(-1).real + r(sd, p + "D") * kv[..., t]
    out = torch.einsum("bhit,bijht->bjht", q.reshape(-1, H, hd, q.shape[-1]), y)  # (B, d2, H, L)
    out = out.reshape(out.shape[0], D, -1)  # channel d2 * H + h
    return linear(sd, p + "output_linear", out.transpose(1, 2))


def attn_ref(sd, p, u, num_heads):
    Bn, L, _ = u.shape
    hd = D // num_heads
    qkv = linear(sd, p + "Wqkv", u).reshape(Bn, L, 3, num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(Bn, L, D)
    return linear(sd, p + "out_proj", y)


def hyena_ref(sd, p, u, order, modulate):
    Bn, L, _ = u.shape
    z = linear(sd, p + "in_proj", u).transpose(1, 2)  # (B, C, L)
    w, b = r(sd, p + "short_filter.weight")[:, 0], r(sd, p + "short_filter.bias")
    K = w.shape[-1]
    zc = b[:, None].expand_as(z).clone()
    for t in range(L):
        for i in range(K):
            if t + i - (K - 1) >= 0:
                zc[..., t] += w[:, i] * z[..., t + i - (K - 1)]
    xs = list(zc.split(D, dim=1))
    f = p + "filter_fn."
    h = r(sd, f + "pos_emb.z")[0, :L]
    lin = sorted(int(k.split(".")[-2]) for k in sd if k.startswith(f + "implicit_filter.") and k.endswith(".weight"))
    for idx in lin[:-1]:
        h = torch.sin(r(sd, f"{f}implicit_filter.{idx + 1}.freq") * linear(sd, f"{f}implicit_filter.{idx}", h))
    h = linear(sd, f"{f}implicit_filter.{lin[-1]}", h)  # (L, D*(N-1))
    if modulate:
        h = h * torch.exp(-r(sd, f + "pos_emb.t")[0, :L] * r(sd, f + "modulation.deltas")[0].abs())
    h, beta = h.T, r(sd, f + "bias")
    v = xs[-1]
    n = order - 1
    for o in range(n):
        v = v * xs[order - 1 - o]
        ch = torch.arange(D) * n + o  # layout (d o)
        v = causal_conv(h[ch], v) + beta[ch][:, None] * v
    return linear(sd, p + "out_proj", (xs[0] * v).transpose(1, 2))


def lm_ref(sd, ids, mixers):
    """Full LM: embedding -> pre-norm blocks -> ln_f -> tied head. mixers[i](prefix, x) -> y."""
    h = r(sd, "backbone.embeddings.word_embeddings.weight")[ids]
    residual = None
    ln = lambda x, n: F.layer_norm(x, (D,), r(sd, n + ".weight"), r(sd, n + ".bias"), 1e-5)
    for i, mix in enumerate(mixers):
        p = f"backbone.layers.{i}."
        residual = h if residual is None else h + residual
        h = mix(p + "mixer.", ln(residual, p + "norm1"))
        residual = h + residual
        h = linear(sd, p + "mlp.fc2", gelu_tanh(linear(sd, p + "mlp.fc1", ln(residual, p + "norm2"))))
    return ln(h + residual, "backbone.ln_f") @ r(sd, "backbone.embeddings.word_embeddings.weight").T


def converted_logits(tmp_path, src, sd, ids, **kw):
    torch.save(sd, tmp_path / "ref.pt")
    out = convert(src, tmp_path / "ref.pt", tmp_path / "out", vocab_size=VOCAB, overwrite=True, **kw)
    model, cfg, tok = load_model(out)
    assert tok is None and model.vocab_size == VOCAB
    return model.double()(ids), cfg


IDS = torch.tensor([[3, 17, 0, 36, 5, 5, 21, 9, 30, 2, 11, 39], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.mark.parametrize("head_dim,n_ssm", [(1, None), (2, 2)])
def test_h3_hybrid_matches_reference_forward(tmp_path, head_dim, n_ssm):
    g = torch.Generator().manual_seed(head_dim)
    sd = ref_backbone(2, g)
    ref_h3_layer(sd, "backbone.layers.0.mixer.", g, head_dim=head_dim, n_ssm=n_ssm)
    ref_attn_layer(sd, "backbone.layers.1.mixer.", g)
    got, cfg = converted_logits(tmp_path, "safari-h3", sd, IDS, num_heads=2)
    assert cfg["model"]["attn_layer_idx"] == [1] and cfg["model"]["mixer"]["head_dim"] == head_dim
    want = lm_ref(sd, IDS, [lambda p, x: h3_ref(sd, p, x, head_dim), lambda p, x: attn_ref(sd, p, x, 2)])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("order,modulate", [(2, True), (3, False)])
def test_hyena_matches_reference_forward(tmp_path, order, modulate):
    g = torch.Generator().manual_seed(order)
    sd = ref_backbone(2, g)
    for i in range(2):
        ref_hyena_layer(sd, f"backbone.layers.{i}.mixer.", g, order=order)
    got, cfg = converted_logits(tmp_path, "safari-hyena", sd, IDS, modulate=modulate)
    assert cfg["model"]["l_max"] == 16 and cfg["model"]["mixer"]["order"] == order
    want = lm_ref(sd, IDS, [lambda p, x: hyena_ref(sd, p, x, order, modulate)] * 2)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def _to_legacy(sd, n_layer):
    """The oldest reference layout: s4seq.encoder prefix, post-norm LayerNorm positions, split q/k/v."""
    old = {}
    for k, v in sd.items():
        old[k] = v
    shifted = {"backbone.norm": "backbone.layers.0.norm1", f"backbone.layers.{n_layer - 1}.norm2": "backbone.ln_f"}
    for l in range(n_layer):
        shifted[f"backbone.layers.{l}.norm1"] = f"backbone.layers.{l}.norm2"
        if l > 0:
            shifted[f"backbone.layers.{l - 1}.norm2"] = f"backbone.layers.{l}.norm1"
    new = {k: v for k, v in old.items() if not any(k.startswith(n + ".") for n in shifted.values())}
    for o, n in shifted.items():
        for p in ("weight", "bias"):
            new[f"{o}.{p}"] = old[f"{n}.{p}"]
    emb = new.pop("backbone.embeddings.word_embeddings.weight")
    new = {k.replace("backbone.", "s4seq.encoder.", 1): v for k, v in new.items()}
    new["embedding.weight"] = emb
    return new


def test_legacy_layout_converts_to_the_same_model(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = ref_backbone(3, g)
    for i in (0, 2):
        ref_h3_layer(sd, f"backbone.layers.{i}.mixer.", g)
    ref_attn_layer(sd, "backbone.layers.1.mixer.", g)
    legacy = _to_legacy(sd, 3)
    W, b = legacy.pop("s4seq.encoder.layers.1.mixer.Wqkv.weight"), legacy.pop("s4seq.encoder.layers.1.mixer.Wqkv.bias")
    for j, n in enumerate("qkv"):
        legacy[f"s4seq.encoder.layers.1.mixer.{n}_proj.weight"] = W[j * D:(j + 1) * D]
        legacy[f"s4seq.encoder.layers.1.mixer.{n}_proj.bias"] = b[j * D:(j + 1) * D]
    back = remap_legacy(legacy)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_cli_and_errors(tmp_path, capsys):
    g = torch.Generator().manual_seed(7)
    sd = ref_backbone(1, g)
    ref_hyena_layer(sd, "backbone.layers.0.mixer.", g)
    torch.save(sd, tmp_path / "hy.pt")
    assert main(["--from", "safari-hyena", str(tmp_path / "hy.pt"), str(tmp_path / "hy"), "--vocab-size", "37",
                 "--modulate", "false"]) == 0
    model, cfg, _ = load_model(tmp_path / "hy", load_tokenizer=False)
    assert cfg["model"]["mixer"]["modulate"] is False
    # existing output, wrong layout, missing key, extra key, untied head, unknown format
    assert main(["--from", "safari-hyena", str(tmp_path / "hy.pt"), str(tmp_path / "hy")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--from", "safari-h3", str(tmp_path / "hy.pt"), str(tmp_path / "x")]) == 2
    assert "backbone.layers.0.mixer.ssm_k_kernel.kernel.B" in capsys.readouterr().err
    bad = dict(sd)
    del bad["backbone.layers.0.mixer.filter_fn.bias"]
    with pytest.raises(ConversionError, match=r"'backbone\.layers\.0\.mixer\.filter_fn\.bias' is missing"):
        convert("safari-hyena", _save(tmp_path, bad), tmp_path / "y", vocab_size=VOCAB)
    bad = dict(sd, **{"backbone.layers.0.mixer.rotary_emb.inv_freq": torch.ones(4)})
    with pytest.raises(ConversionError, match="rotary"):
        convert("safari-hyena", _save(tmp_path, bad), tmp_path / "y", vocab_size=VOCAB)
    bad = dict(sd, **{"lm_head.weight": torch.zeros(ROWS, D)})
    with pytest.raises(ConversionError, match="lm_head"):
        convert("safari-hyena", _save(tmp_path, bad), tmp_path / "y", vocab_size=VOCAB)
    with pytest.raises(ConversionError, match="does not pad"):
        convert("safari-hyena", tmp_path / "hy.pt", tmp_path / "y", vocab_size=20)
    with pytest.raises(ConversionError, match="not found"):
        convert("safari-hyena", tmp_path / "nope.pt", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def _save(tmp_path, sd):
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    return path


def test_gpt2_sized_conversion_with_tokenizer(tmp_path, shared_data):
    """A 50264-row embedding is read as GPT-2 (vocab 50257, padding multiple 8); the tokenizer is
    copied into the export, and the converted model scores text through the lm-eval adapter."""
    from serengeti.evaluate.lm_eval_adapter import LMScorer

    g = torch.Generator().manual_seed(9)
    sd = ref_backbone(1, g)
    sd["backbone.embeddings.word_embeddings.weight"] = torch.randn(50264, D, generator=g)
    sd["lm_head.weight"] = sd["backbone.embeddings.word_embeddings.weight"]
    ref_hyena_layer(sd, "backbone.layers.0.mixer.", g)
    torch.save(sd, tmp_path / "gpt2.pt")
    assert main(["--from", "safari-hyena", str(tmp_path / "gpt2.pt"), str(tmp_path / "out"),
                 "--tokenizer", str(shared_data / "gpt2" / "tokenizer.json")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    model, cfg, tok = load_model(tmp_path / "out")
    assert cfg["model"]["vocab_size"] == 50257 and cfg["model"]["pad_vocab_size_multiple"] == 8
    assert tok is not None and tok.vocab_size == 50257 and tok.eos_id == 50256
    ((lp, _),) = LMScorer(model, tok).loglikelihood([("Hello", " world")])
    ids = torch.tensor([[15496, 995]])
    want = lm_ref(sd, ids, [lambda p, x: hyena_ref(sd, p, x, 2, True)])[0, 0, :50257].log_softmax(-1)[995]
    assert lp == pytest.approx(want.item(), abs=1e-4)


def test_bad_flags_are_one_line(capsys):
    from serengeti.convert import main

    with pytest.raises(SystemExit) as info:
        main(["--from", "nope", "in.pt", "out"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "--from: invalid choice: 'nope'" in err
