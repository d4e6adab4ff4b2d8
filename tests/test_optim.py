"""Parameter groups partition the parameters and honour _optim tags; schedules have the stated shape."""
from __future__ import annotations

import functools

import pytest
import torch

from serengeti.mixers import Attention
from serengeti.models.backbone import LMHeadModel
from serengeti.ops.init import set_optim
from serengeti.training.optim import build_optimizer, build_scheduler, param_groups


def model_with_tags():
    model = LMHeadModel(d_model=16, n_layer=2, vocab_size=11, mixer=functools.partial(Attention, num_heads=2))
    set_optim(model.layers[0].mixer.Wqkv.bias, lr=1e-4, weight_decay=0.0)
    set_optim(model.layers[1].mixer.Wqkv.bias, lr=1e-4, weight_decay=0.0)
    set_optim(model.layers[1].norm1.weight, weight_decay=0.0)
    return model


@pytest.mark.parametrize("policy", ["reference", "standard"])
def test_groups_partition_parameters(policy):
    model = model_with_tags()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, policy=policy)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}  # tied head counted once


def test_overrides_get_their_own_group():
    model = model_with_tags()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, policy="reference")
    by_name = {n: g for g in groups for n in g["names"]}
    tagged = by_name["layers.0.mixer.Wqkv.bias"]
    assert tagged is by_name["layers.1.mixer.Wqkv.bias"]
    assert (tagged["lr"], tagged["weight_decay"]) == (1e-4, 0.0) and len(tagged["params"]) == 2
    norm = by_name["layers.1.norm1.weight"]
    assert (norm["lr"], norm["weight_decay"]) == (1e-3, 0.0)
    # reference policy: untagged biases, norms and embeddings decay
    for name in ("word_embeddings.weight", "layers.0.norm1.weight", "layers.0.mlp.fc1.bias"):
        assert by_name[name]["weight_decay"] == 0.1


def test_standard_policy_exempts_biases_norms_embeddings():
    model = model_with_tags()
    by_name = {n: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, policy="standard") for n in g["names"]}
    for name in ("word_embeddings.weight", "layers.0.norm1.weight", "layers.0.mlp.fc1.bias"):
        assert by_name[name]["weight_decay"] == 0.0
    assert by_name["layers.0.mlp.fc1.weight"]["weight_decay"] == 0.1


def test_optimizer_uses_groups_and_rejects_bad_policy():
    model = model_with_tags()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    assert {g["lr"] for g in opt.param_groups} == {1e-3, 1e-4}
    with pytest.raises(ValueError, match="weight_decay_policy"):
        build_optimizer(model, lr=1e-3, weight_decay_policy="everything")


def _lrs(name, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, name=name, total_steps=steps, **kw)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    cos = _lrs("cosine", 100, warmup_steps=10, min_lr_ratio=0.1)
    assert cos[0] == 0.0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(1.0)
    assert cos[55] == pytest.approx(0.1 + 0.9 * 0.5) and cos[100] == pytest.approx(0.1)
    lin = _lrs("linear", 100, warmup_steps=10)
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(0.5) and lin[100] == pytest.approx(0.0)
    const = _lrs("constant", 20, warmup_steps=4)
    assert const[2] == pytest.approx(0.5) and const[4:] == [1.0] * 17
    with pytest.raises(ValueError, match="scheduler.name"):
        _lrs("step", 10)
    with pytest.warns(UserWarning, match="warmup_steps"):
        assert _lrs("cosine", 10, warmup_steps=20)[5] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="warmup_steps"):
        _lrs("cosine", 10, warmup_steps=-1)


@pytest.mark.parametrize("lr, ssm_lr", [(5e-4, 5e-4), (2e-3, 1e-3)])
def test_h3_ssm_lr_is_min_of_1e3_and_the_base_lr(lr, ssm_lr, caplog):
    """configs/model/mixer/h3.yaml derives ssm_lr = min(1e-3, optimizer.lr); the LightningModule builds and logs
    the optimizer groups once, and H3's SSM parameters train at that lr without weight decay."""
    import logging

    from omegaconf import OmegaConf

    from conftest import compose_cfg
    from serengeti.training.lm_task import LMTask
    from serengeti.training.run_config import fill_from_dataset

    cfg = compose_cfg(["model=h3", f"optimizer.lr={lr}", "optimizer.weight_decay=0.1", "trainer.max_steps=10"])
    assert cfg.model.mixer.ssm_lr == pytest.approx(ssm_lr)
    plain = OmegaConf.to_container(fill_from_dataset(cfg, vocab_size=11, l_max=16), resolve=True)
    task = LMTask({k: plain[k] for k in ("model", "optimizer", "scheduler")})
    with caplog.at_level(logging.INFO, logger="serengeti"):
        optimizer = task.configure_optimizers()["optimizer"]
    assert {(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(lr, 0.1), (ssm_lr, 0.0)}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("param group")]
    assert len(logged) == len(optimizer.param_groups)
    assert sum(int(m.split(", ")[-1].split()[0]) for m in logged) == sum(p.numel() for p in task.model.parameters())


def test_min_resolver_names_itself_on_bad_input():
    from omegaconf import OmegaConf

    with pytest.raises(Exception, match=r"serengeti.min:...\} takes two numbers"):
        OmegaConf.create({"a": "${serengeti.min:1,abc}"}).a


def test_warmup_starts_at_1e6_whatever_the_lr():
    """owt/pile/wikitext H3 recipes: warmup_init_ratio = 1e-6 / optimizer.lr, derived, so the first lr is 1e-6."""
    from conftest import compose_cfg

    for overrides in (["experiment=owt/h3"], ["experiment=pile/h3", "optimizer.lr=3e-4"], ["experiment=wikitext/h3"]):
        cfg = compose_cfg(overrides)
        assert cfg.scheduler.warmup_init_ratio * cfg.optimizer.lr == pytest.approx(1e-6, rel=1e-12)
    with pytest.raises(Exception, match=r"serengeti.ratio:...\} needs a positive divisor"):
        compose_cfg(["experiment=owt/h3", "optimizer.lr=0"]).scheduler.warmup_init_ratio
