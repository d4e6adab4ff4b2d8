"""Tests for the one-file long-convolution CIFAR-10 example (standalone_cifar.py at the repository top level)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from serengeti.io.run_record import RECORD_FIELDS
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_subset.npz"


def _load_script():
    spec = importlib.util.spec_from_file_location("standalone_cifar", ROOT / "standalone_cifar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["standalone_cifar"] = module
    spec.loader.exec_module(module)
    return module


sc = _load_script()
needs_subset = pytest.mark.skipif(not SUBSET.exists(), reason=f"real CIFAR-10 subset not found at {SUBSET}")


PALETTE = np.random.default_rng(12345).integers(0, 256, (10, 3))  # one colour per class, shared by train and test


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class c tints the image towards PALETTE[c], plus per-pixel noise. (n, 32, 32, 3) uint8.

    The palette must not depend on ``seed``: the train and test splits are drawn with different seeds and have to
    share the class -> colour rule, or the test split is unlearnable.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = 0.75 * PALETTE[y][:, None, None, :] + rng.integers(0, 64, (n, 32, 32, 3))
    return x.astype(np.uint8), y.astype(np.int64)


@pytest.fixture
def synthetic_npz(tmp_path) -> Path:
    x_train, y_train = _synthetic(192, 0)
    x_test, y_test = _synthetic(64, 1)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


# ------------------------------------------------------------------------------------------- loaders
def test_npz_loader_round_trips(synthetic_npz):
    x_train, y_train, x_test, y_test = sc.load_cifar(str(synthetic_npz))
    with np.load(synthetic_npz) as d:
        np.testing.assert_array_equal(x_train, d["x_train"])
        np.testing.assert_array_equal(y_test, d["y_test"])
    assert x_train.dtype == np.uint8 and x_train.shape == (192, 32, 32, 3) and y_train.dtype == np.int64
    assert x_test.shape == (64, 32, 32, 3)


def test_npz_loader_names_missing_arrays(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="x_test"):
        sc.load_cifar(str(path))


def test_binary_batches_are_parsed_to_hwc(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)  # HWC, what the loader must give back
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    # Official record layout: label byte, then the 1024 red, 1024 green and 1024 blue bytes, each row-major.
    records = np.concatenate([labels[:, None], images.transpose(0, 3, 1, 2).reshape(7, -1)], axis=1)
    records[:3].tofile(tmp_path / "data_batch_1.bin")
    records[3:5].tofile(tmp_path / "data_batch_2.bin")
    records[5:].tofile(tmp_path / "test_batch.bin")
    x_train, y_train, x_test, y_test = sc.load_cifar(str(tmp_path))
    np.testing.assert_array_equal(x_train, images[:5])
    np.testing.assert_array_equal(y_train, labels[:5])
    np.testing.assert_array_equal(x_test, images[5:])
    np.testing.assert_array_equal(y_test, labels[5:])
    assert y_train.dtype == np.int64
    # One hand-checked pixel: green channel of image 0, row 2, column 5 sits at byte 1 + 1024 + 2 * 32 + 5.
    assert x_train[0, 2, 5, 1] == records[0, 1 + 1024 + 2 * 32 + 5]


def test_binary_loader_rejects_truncated_and_missing_files(tmp_path):
    np.zeros(3073 + 5, np.uint8).tofile(tmp_path / "data_batch_1.bin")
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        sc.load_cifar(str(tmp_path))
    np.zeros(3073, np.uint8).tofile(tmp_path / "test_batch.bin")
    with pytest.raises(ValueError, match="3073-byte"):
        sc.load_cifar(str(tmp_path))


def test_npz_loader_refuses_pickled_arrays(tmp_path):
    path = tmp_path / "pickled.npz"
    x = np.empty(2, dtype=object)  # object arrays can only be stored as pickles
    np.savez(path, x_train=x, y_train=np.zeros(2, np.int64), x_test=x, y_test=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):
        sc.load_cifar(str(path))


def test_hub_failure_says_how_to_use_local_data(monkeypatch):
    calls = []

    def offline(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError("Couldn't reach the Hub")

    # A stand-in for the `datasets` package: the real one would retry over the (absent) network for half a minute.
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match=r"Hugging Face hub \(ConnectionError.*--data.*data_batch_\*\.bin.*\.npz"):
        sc.load_cifar(None)
    assert calls == ["uoft-cs/cifar10"]


def test_hub_without_datasets_package_says_how_to_use_local_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RuntimeError, match="`datasets` package.*--data"):
        sc.load_cifar(None)


@needs_subset
def test_real_subset_loads():
    x_train, y_train, x_test, y_test = sc.load_cifar(str(SUBSET))
    assert x_train.shape == (5000, 32, 32, 3) and x_test.shape == (2000, 32, 32, 3)
    assert np.bincount(y_train).tolist() == [500] * 10


# -------------------------------------------------------------------------------------- augmentation
def test_augment_keeps_shapes_and_each_image_its_own():
    B = 64
    # Image b is the constant b + 1, so any pixel from another image (or a mixed-up label) would show.
    x = (torch.arange(B, dtype=torch.float32) + 1)[:, None, None, None].expand(B, 3, 32, 32).contiguous()
    out = sc.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for b in range(B):
        values = set(out[b].unique().tolist())
        assert values <= {0.0, b + 1.0}
        assert (out[b] == b + 1).sum() >= 24 * 24 * 3  # a 4-pixel shift keeps at least the central 24 x 24
    # Some images must really move (padding visible), and the draw is reproducible from the generator.
    assert (out == 0).any()
    torch.testing.assert_close(out, sc.augment(x, torch.Generator().manual_seed(0)), rtol=0, atol=0)


def test_augment_without_padding_is_identity_or_mirror():
    x = torch.randn(64, 3, 32, 32)
    out = sc.augment(x, torch.Generator().manual_seed(1), pad=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 64  # both outcomes occur


def test_to_sequence_shapes_and_normalisation():
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    assert sc.flatten(sc.to_sequence(x, grayscale=False)).shape == (4, 1024, 3)
    gray = sc.to_sequence(x, grayscale=True)
    assert gray.shape == (4, 1, 32, 32)
    # Raster order: sequence position 32 * r + c is pixel (r, c).
    seq = sc.flatten(gray)
    assert seq[2, 32 * 7 + 9, 0] == gray[2, 0, 7, 9]


# --------------------------------------------------------------------------------------------- model
def _direct_conv(layer: "sc.LongConv", x: torch.Tensor) -> torch.Tensor:
    """O(L^2) float64 oracle for LongConv.conv: x (B, L, D) -> (B, channels, D, L)."""
    B, L, H = x.shape
    k = layer.regularised_kernel().double()  # (c, D, sides, l_max)
    t = torch.arange(L)
    lag = t[:, None] - t[None, :]  # lag[t, s] = t - s
    causal = torch.where(lag >= 0, k[:, :, 0, lag.clamp(0, L - 1)], 0.0)  # (c, D, L, L)
    if layer.bidirectional:
        causal = causal + torch.where(lag < 0, k[:, :, 1, (-lag - 1).clamp(0, L - 1)], 0.0)
    causal = causal + torch.diag_embed(layer.D.double()[..., None].expand(-1, -1, L))
    return torch.einsum("cdts,bsd->bcdt", causal, x)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("L", [16, 11])
def test_fft_conv_matches_direct_convolution(bidirectional, L):
    torch.manual_seed(0)
    layer = sc.LongConv(6, l_max=16, channels=2, bidirectional=bidirectional, kernel_dropout=0.0).double()
    with torch.no_grad():
        layer.kernel.normal_()  # large taps, so the squash leaves most of them nonzero
    x = torch.randn(3, L, 6, dtype=torch.float64)
    torch.testing.assert_close(layer.conv(x), _direct_conv(layer, x), rtol=1e-10, atol=1e-10)


def test_squash_zeroes_small_taps():
    layer = sc.LongConv(4, l_max=8, kernel_lam=0.5, kernel_dropout=0.0)
    with torch.no_grad():
        layer.kernel.copy_(torch.linspace(-1, 1, layer.kernel.numel()).view_as(layer.kernel))
    k = layer.regularised_kernel()
    assert bool((k[layer.kernel.abs() <= 0.5] == 0).all())
    big = layer.kernel.abs() > 0.5
    torch.testing.assert_close(k[big], layer.kernel[big] - 0.5 * layer.kernel[big].sign())


def test_smoothing_averages_neighbouring_taps():
    layer = sc.LongConv(2, l_max=9, kernel_lam=0.0, kernel_dropout=0.0, kernel_smooth=3, bidirectional=False)
    with torch.no_grad():
        layer.kernel.zero_()
        layer.kernel[..., 4] = 3.0  # one spike becomes three taps of 1
    k = layer.regularised_kernel()
    torch.testing.assert_close(k[0, 0, 0], torch.tensor([0, 0, 0, 1.0, 1, 1, 0, 0, 0]))


@pytest.mark.parametrize("L", [32, 20])  # 20 < l_max: the kernel is truncated, still causal
def test_causal_model_never_reads_the_future(L):
    torch.manual_seed(0)
    model = sc.LongConvClassifier(3, d_model=8, n_layers=2, l_max=32, bidirectional=False).double().eval()
    with torch.no_grad():
        for conv in model.convs:
            conv.kernel.normal_()
    x = torch.randn(2, L, 3, dtype=torch.float64)
    t0 = L // 2
    x_perturbed = x.clone()
    x_perturbed[:, t0:] += torch.randn_like(x_perturbed[:, t0:])
    h, h_perturbed = model.features(x), model.features(x_perturbed)
    torch.testing.assert_close(h[:, :t0], h_perturbed[:, :t0], rtol=0, atol=1e-10)
    assert (h[:, t0:] - h_perturbed[:, t0:]).abs().max() > 1e-3


@pytest.mark.parametrize("t0", [16, 18])
def test_pooled_causal_model_never_reads_the_future(t0):
    """pool 4: pooled position i summarises inputs 4i .. 4i + 3, so a change from input t0 on reaches i >= t0 // 4."""
    torch.manual_seed(0)
    model = sc.LongConvClassifier(3, d_model=8, n_layers=3, l_max=32, bidirectional=False, pool=4).double().eval()
    assert [c.kernel.shape[-1] for c in model.convs] == [32, 8, 8]
    with torch.no_grad():
        for conv in model.convs:
            conv.kernel.normal_()
    x = torch.randn(2, 32, 3, dtype=torch.float64)
    x_perturbed = x.clone()
    x_perturbed[:, t0:] += torch.randn_like(x_perturbed[:, t0:])
    h, h_perturbed = model.features(x), model.features(x_perturbed)
    assert h.shape == (2, 8, 8)
    torch.testing.assert_close(h[:, : t0 // 4], h_perturbed[:, : t0 // 4], rtol=0, atol=1e-10)
    assert (h[:, t0 // 4:] - h_perturbed[:, t0 // 4:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="--pool"):
        sc.LongConvClassifier(3, d_model=8, n_layers=2, l_max=32, pool=3)


def test_bidirectional_model_reads_both_ways():
    torch.manual_seed(0)
    model = sc.LongConvClassifier(3, d_model=8, n_layers=2, l_max=32, bidirectional=True).double().eval()
    with torch.no_grad():
        for conv in model.convs:
            conv.kernel.normal_()
    x = torch.randn(2, 32, 3, dtype=torch.float64)
    x_perturbed = x.clone()
    x_perturbed[:, 20] += 1.0  # one pixel late in the sequence changes outputs before it
    assert (model.features(x)[:, :20] - model.features(x_perturbed)[:, :20]).abs().max() > 1e-3


def test_kernels_get_their_own_lr_and_no_decay():
    model = sc.LongConvClassifier(3, d_model=8, n_layers=2, l_max=32)
    opt = sc.make_optimizer(model, sc.parse_args(["--lr", "0.01", "--kernel-lr", "0.001", "--weight-decay", "0.05"]))
    ordinary, kernels = opt.param_groups
    assert {id(p) for p in kernels["params"]} == {id(c.kernel) for c in model.convs}
    assert kernels["lr"] == 0.001 and kernels["weight_decay"] == 0.0
    assert ordinary["lr"] == 0.01 and ordinary["weight_decay"] == 0.05
    assert len(ordinary["params"]) + len(kernels["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------ training
TINY = ["--d-model", "16", "--n-layers", "1", "--channels", "1", "--batch-size", "16", "--quiet", "--device", "cpu",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """main(--threads 1) sets torch's global thread count; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_training_learns_the_toy_task_and_is_seeded(synthetic_npz, tmp_path):
    argv = ["--data", str(synthetic_npz), "--epochs", "2", "--seed", "3", *TINY]
    first = sc.main(argv + ["--history", str(tmp_path / "curve.json")])
    second = sc.main(argv)
    curve = [(r["train_loss"], r["test_loss"], r["test_acc"]) for r in first["history"]]
    assert curve == [(r["train_loss"], r["test_loss"], r["test_acc"]) for r in second["history"]]
    start, end = first["history"][0], first["history"][-1]
    # Held-out images: a model that only learned the label frequencies would stay near ln 10 = 2.30 and 10 %.
    # Over seeds 4..13 these 24 steps reach 0.47-0.66 x the initial test loss and 33-89 % accuracy.
    assert end["test_loss"] < 0.75 * start["test_loss"], curve
    assert end["test_acc"] >= 0.25, curve
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [r["test_acc"] for r in saved["history"]] == [r["test_acc"] for r in first["history"]]


def test_run_dirs_of_two_seeds_aggregate_in_the_report(synthetic_npz, tmp_path):
    from serengeti.report import find_runs, group_runs, mean_std

    results = [sc.main(["--data", str(synthetic_npz), "--epochs", "1", "--seed", str(seed), *TINY,
                        "--run-dir", str(tmp_path / "sweep" / f"seed{seed}"),  # created; --history may sit inside
                        "--history", str(tmp_path / "sweep" / f"seed{seed}" / "curve.json")]) for seed in (1, 2)]
    runs = find_runs([tmp_path / "sweep"])
    assert sorted(run.value("seed") for run in runs) == [1, 2]
    (group,) = group_runs(runs, ["epochs", "d_model"])
    accuracies = [r["test_acc"] for r in results]
    assert sorted(group.values("test/accuracy")) == sorted(accuracies)
    mean, std = mean_std(group.values("test/accuracy"))
    assert mean == pytest.approx(sum(accuracies) / 2)
    record = json.loads((tmp_path / "sweep" / "seed1" / "metrics.json").read_text())
    assert tuple(record) == RECORD_FIELDS  # the fields train.py's run record has (serengeti.io.run_record)
    assert record["steps"] == math.ceil(192 / 16) and record["n_params"] > 0  # 192 toy training images, batch 16


def test_cpu_recipe_flags_learn_the_toy_task(synthetic_npz):
    """The 2-core recipe's model (decay init, pooling after the first layer, mirror-averaged tests), small."""
    argv = ["--data", str(synthetic_npz), "--epochs", "2", "--seed", "3", *TINY, "--n-layers", "2", "--pool", "4",
            "--kernel-init", "decay", "--tta"]
    result = sc.main(argv)
    assert [c.kernel.shape[-1] for c in result["model"].convs] == [1024, 256]
    start, end = result["history"][0], result["history"][-1]
    assert end["test_loss"] < 0.75 * start["test_loss"] and end["test_acc"] >= 0.25, result["history"]
    with pytest.raises(SystemExit, match="--pool"):
        sc.main(["--data", str(synthetic_npz), "--pool", "3", *TINY])


def test_grayscale_and_causal_flags_build_the_variant(synthetic_npz):
    result = sc.main(["--data", str(synthetic_npz), "--epochs", "1", "--grayscale", "--causal", "--max-train", "64",
                      "--max-test", "32", *TINY])
    model = result["model"]
    assert model.encoder.in_features == 1
    assert not model.convs[0].bidirectional and model.convs[0].kernel.shape[2] == 1


@needs_subset
def test_one_epoch_on_real_images_is_quick_and_lowers_the_loss():
    result = sc.main(["--data", str(SUBSET), "--epochs", "1", "--max-train", "300", "--max-test", "200", *TINY])
    start, end = result["history"]
    assert end["test_loss"] < start["test_loss"]
    # The bound is one minute on CPU. Process CPU time, unlike wall time, does not grow when other jobs share
    # the cores; this run needs a few CPU seconds.
    assert end["cpu_seconds"] < 60


def test_eval_every_skips_tests_but_always_tests_the_last_epoch(synthetic_npz, capsys):
    result = sc.main(["--data", str(synthetic_npz), "--epochs", "3", "--eval-every", "2", "--max-train", "32",
                      "--max-test", "16", *TINY])
    tested = [r["test_acc"] is not None for r in result["history"]]
    assert tested == [True, False, True, True]
    assert result["test_acc"] == result["history"][-1]["test_acc"]
    with pytest.raises(SystemExit) as exit_info:
        sc.main(["--data", str(synthetic_npz), "--eval-every", "0", *TINY])
    assert exit_info.value.code == 2 and "argument --eval-every: expected an integer >= 1" in capsys.readouterr().err


def test_tied_dropout_shares_one_mask_across_positions():
    drop = sc.SequenceDropout(0.5, tie=True).train()
    y = drop(torch.ones(4, 1024, 8))
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same mask at every position
    assert set(y.unique().tolist()) <= {0.0, 2.0} and 0 < (y == 0).float().mean() < 1
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


def test_decay_init_is_local_in_some_channels_and_global_in_others():
    k = sc.init_kernel((1, 8, 2, 256), "decay")
    torch.testing.assert_close(k.norm(dim=-1), torch.full((1, 8, 2), 0.5))
    head = k[..., :4].norm(dim=-1) / 0.5  # share of each kernel's norm in its first 4 lags
    assert bool((head[:, 0] > 0.99).all()), "tau = 1: the first channel's kernels are a few taps long"
    assert bool((head[:, -1] < 0.5).all()), "tau = l_max: the last channel's kernels spread over the sequence"
    with pytest.raises(ValueError, match="kernel-init"):
        sc.init_kernel((1, 2, 1, 8), "ones")


def test_tta_averages_an_image_and_its_mirror(synthetic_npz):
    torch.manual_seed(0)
    model = sc.LongConvClassifier(3, d_model=8, n_layers=1, l_max=1024, channels=1, kernel_dropout=0.0,
                                  kernel_init="decay").eval()  # (tiny noise kernels would be nearly mirror-invariant)
    x = torch.from_numpy(np.load(synthetic_npz)["x_test"][:6])
    y = torch.zeros(6, dtype=torch.long)
    args = sc.parse_args(["--batch-size", "3", "--tta"])
    loss, _ = sc.evaluate(model, x, y, args, torch.device("cpu"))
    img = sc.to_sequence(x, False)
    with torch.no_grad():
        logits = (model(sc.flatten(img)) + model(sc.flatten(img.flip(-1)))) / 2
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    args.tta = False
    assert sc.evaluate(model, x, y, args, torch.device("cpu"))[0] != pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------------------------------ bad input
BAD_FLAGS = [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--d-model", "0"], "argument --d-model: expected an integer >= 1, got 0"),
    (["--n-layers", "0"], "argument --n-layers: expected an integer >= 1, got 0"),
    (["--channels", "-2"], "argument --channels: expected an integer >= 1, got -2"),
    (["--dropout", "1.5"], "argument --dropout: expected a probability in [0, 1), got 1.5"),
    (["--kernel-dropout", "-0.1"], "argument --kernel-dropout: expected a probability in [0, 1), got -0.1"),
    (["--lr", "nan"], "argument --lr: expected a number > 0, got nan"),
    (["--kernel-lr", "0"], "argument --kernel-lr: expected a number > 0, got 0.0"),
    (["--weight-decay", "-1"], "argument --weight-decay: expected a number >= 0, got -1.0"),
    (["--warmup-epochs", "inf"], "argument --warmup-epochs: expected a number >= 0, got inf"),
    (["--kernel-smooth", "-1"], "argument --kernel-smooth: expected an integer >= 0, got -1"),
    (["--max-train", "0"], "argument --max-train: expected an integer >= 1, got 0"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**32), got -1"),
    (["--device", "nonsense"], "argument --device: expected cpu, cuda or cuda:<index>, got 'nonsense'"),
    (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (["--history", "/proc/no/such/dir/h.json"], "argument --history: cannot write into /proc/no/such/dir"),
    (["--run-dir", "/proc/no/such/dir"], "argument --run-dir: cannot write into /proc/no/such/dir"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_stop_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sc.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"{Path(sys.argv[0]).name}: error: {message}")


def test_damaged_data_files_are_named_in_one_line(tmp_path, synthetic_npz):
    missing = tmp_path / "missing.npz"
    with pytest.raises(SystemExit, match=f"^standalone_cifar.py: error: --data {missing}: not a folder"):
        sc.main(["--data", str(missing), "--quiet"])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(SystemExit, match=f"^standalone_cifar.py: error: --data {garbage}: not an .npz archive"):
        sc.main(["--data", str(garbage), "--quiet"])
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(synthetic_npz.read_bytes()[:-20000])  # the central directory is lost
    with pytest.raises(ValueError, match=f"^--data {truncated}: not"):
        sc.load_cifar(str(truncated))


@pytest.mark.slow  # a fresh interpreter importing torch
def test_cli_bad_flag_is_one_line(tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "standalone_cifar.py"), "--batch-size", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2
    assert res.stderr.strip() == "standalone_cifar.py: error: argument --batch-size: expected an integer >= 1, got 0 (see --help)"
