r"""Long-convolution classifier for CIFAR-10 read as a sequence of 1024 pixels, in one file.

Each image is flattened row by row into a sequence x: (B, L=1024, C) with C = 3 (RGB) or 1 (``--grayscale``,
the sequential-CIFAR benchmark). The model is

    Linear(C -> D) -> n_layers x [LongConv -> dropout -> add -> LayerNorm] -> mean over L -> Linear(D -> 10)

where a LongConv layer convolves every channel with its own explicit kernel as long as the sequence
(``channels`` kernels per model channel), computed by FFT, regularised by squashing small taps to zero,
optional moving-average smoothing and kernel dropout, then GELU, dropout and a GLU output projection.
``--bidirectional`` (the default) lets each position see the whole image; ``--causal`` only the pixels
before it. ``--pool P`` averages every P neighbouring positions after the first layer, so the later layers
run on a P-times shorter sequence; ``--kernel-init decay`` starts the kernels as noise decaying over the lags,
at scales from one pixel to the whole image; ``--tta`` tests on the mean logits of each image and its mirror.

Run (data: the Hugging Face hub by default, or ``--data`` = an ``.npz`` with x_train/y_train/x_test/y_test
as uint8 HWC images, or a folder with the official binary batches data_batch_*.bin / test_batch.bin):

    python standalone_cifar.py                                   # the GPU recipe: D 256, 6 layers, 300 epochs
    # The 2-core CPU recipe on the 5000-image subset (measured with --seed 1: 51.55 % after 790 s; experiments.md):
    python standalone_cifar.py --data ../shared/data/cifar10/cifar10_subset.npz --threads 2 --d-model 64 \
        --n-layers 4 --pool 4 --kernel-init decay --channels 1 --batch-size 32 --dropout 0.1 --kernel-dropout 0 \
        --kernel-lr 2e-3 --epochs 11 --eval-every 2 --tta
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
import zipfile

# before torch loads: idle OpenMP threads sleep instead of spin-waiting (a busy neighbour process stalls them)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

RGB_MEAN, RGB_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
GRAY_MEAN, GRAY_STD = 122.6 / 255, 61.0 / 255
console = Console()


# ----------------------------------------------------------------------------------------------- data
def load_npz(path: str) -> tuple[np.ndarray, ...]:
    """x_train: (N, 32, 32, 3) uint8, y_train: (N,) int64, and the same for test."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--data {path}: not an .npz archive (a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                raise ValueError(f"--data {path}: the .npz lacks the arrays {sorted(missing)}")
            return d["x_train"], d["y_train"].astype(np.int64), d["x_test"], d["y_test"].astype(np.int64)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:  # a damaged or foreign file
        raise ValueError(str(e) if str(e).startswith("--data") else f"--data {path}: not a readable .npz ({e})") from None


def read_binary_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One official binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32 x 32)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records")
    rec = raw.reshape(-1, 3073)
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return np.ascontiguousarray(images), rec[:, 0].astype(np.int64)


def load_binary_dir(path: str) -> tuple[np.ndarray, ...]:
    train_files = sorted(f for f in os.listdir(path) if f.startswith("data_batch_") and f.endswith(".bin"))
    if not train_files or not os.path.exists(os.path.join(path, "test_batch.bin")):
        raise FileNotFoundError(f"--data {path}: expected data_batch_*.bin and test_batch.bin (CIFAR-10 binary version)")
    train = [read_binary_batch(os.path.join(path, f)) for f in train_files]
    x_test, y_test = read_binary_batch(os.path.join(path, "test_batch.bin"))
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test


HUB_DATASET = "uoft-cs/cifar10"
LOCAL_HINT = ("Pass --data with a local copy instead: a folder holding the official binary batches data_batch_*.bin and "
              "test_batch.bin, or an .npz with uint8 x_train/x_test (N, 32, 32, 3) and y_train/y_test (this project ships "
              "a real subset at ../shared/data/cifar10/cifar10_subset.npz).")


def load_hub() -> tuple[np.ndarray, ...]:
    """CIFAR-10 from the Hugging Face hub (parquet shards, PNG images decoded by Pillow); no pickles involved."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"loading CIFAR-10 from the hub needs the `datasets` package ({e}). {LOCAL_HINT}") from e
    console.print(f"loading {HUB_DATASET} from the Hugging Face hub (offline, this fails after a few retries; "
                  "--data reads a local copy)")
    try:
        ds = datasets.load_dataset(HUB_DATASET)
    except Exception as e:  # no network, hub or cache errors: all end the same way
        raise RuntimeError(f"could not load CIFAR-10 from the Hugging Face hub ({type(e).__name__}: {e}). {LOCAL_HINT}") from e
    try:
        splits = [ds[s].with_format("numpy") for s in ("train", "test")]
        arrays = [(np.stack(list(s["img"])).astype(np.uint8), np.asarray(s["label"], dtype=np.int64)) for s in splits]
    except ImportError as e:  # the PNG images are decoded by Pillow, which `datasets` imports only now
        raise RuntimeError(f"decoding the hub's CIFAR-10 images needs Pillow ({e}). {LOCAL_HINT}") from e
    return arrays[0][0], arrays[0][1], arrays[1][0], arrays[1][1]


def load_cifar(data: str | None) -> tuple[np.ndarray, ...]:
    """Returns x_train (N, 32, 32, 3) uint8, y_train (N,) int64, x_test, y_test from --data or the hub."""
    if data is None:
        arrays = load_hub()
    elif os.path.isdir(data):
        arrays = load_binary_dir(data)
    elif data.endswith(".npz") and os.path.isfile(data):
        arrays = load_npz(data)
    else:
        raise FileNotFoundError(f"--data {data}: not a folder of binary batches nor an existing .npz file")
    for name, x in zip(("x_train", "x_test"), arrays[::2]):
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3):
            raise ValueError(f"--data {data}: {name} must be uint8 of shape (N, 32, 32, 3), got {x.dtype} {x.shape}")
    return arrays


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels and random horizontal flip, one draw per image.

    x: (B, C, H, W) -> (B, C, H, W). Zero is the mean after normalisation, so padding adds no signal.
    """
    B, C, H, W = x.shape
    dev = x.device
    off = torch.randint(0, 2 * pad + 1, (2, B), generator=generator, device=dev)
    flip = torch.rand(B, generator=generator, device=dev) < 0.5
    rows = off[0, :, None] + torch.arange(H, device=dev)  # (B, H) rows of the padded image to keep
    cols = off[1, :, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    xp = F.pad(x, (pad, pad, pad, pad))
    out = xp[torch.arange(B, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def to_sequence(x_uint8: torch.Tensor, grayscale: bool) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 HWC -> normalised (B, 3, 32, 32) float, or (B, 1, 32, 32) in grayscale."""
    x = x_uint8.permute(0, 3, 1, 2).float() / 255
    if grayscale:  # ITU-R 601 luma, as in the usual sequential-CIFAR setup
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3] - GRAY_MEAN) / GRAY_STD
    else:
        x = (x - x.new_tensor(RGB_MEAN)[:, None, None]) / x.new_tensor(RGB_STD)[:, None, None]
    return x


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, L = H*W, C), pixels in row-major (raster) order."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- model
class SequenceDropout(nn.Dropout):
    """Dropout on (B, L, D); ``tie=True`` draws one mask per (sample, channel) and applies it at every position
    (the S4 family's tied dropout: drops whole channels of a sequence, and costs 1/L of the random draws)."""

    def __init__(self, p: float, tie: bool = False):
        super().__init__(p)
        self.tie = tie

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.tie and self.training and self.p > 0):
            return super().forward(x)
        keep = torch.empty(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def init_kernel(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """Initial taps of shape (channels, D, sides, l_max).

    ``noise``: i.i.d. N(0, 0.002^2), every lag alike. ``decay``: N(0, 1) taps times exp(-|lag| / tau), one decay
    length tau per model channel, log-spaced from 1 to l_max, each kernel then scaled to L2 norm 0.5: some channels
    start local (a few pixels) and others global (the whole image), as an SSM's kernels do.
    """
    if kind == "noise":
        return 0.002 * torch.randn(shape)
    if kind != "decay":
        raise ValueError(f"--kernel-init must be 'noise' or 'decay', got {kind!r}")
    channels, d_model, sides, l_max = shape
    lag = torch.arange(l_max, dtype=torch.float32)
    dist = torch.stack([lag, lag + 1])[:sides]  # |lag| of the taps: side 0 holds lags j, side 1 lags -(j + 1)
    tau = torch.logspace(0, math.log10(l_max), d_model)[:, None, None]  # (D, 1, 1)
    k = torch.randn(shape) * torch.exp(-dist / tau)
    return 0.5 * k / k.norm(dim=-1, keepdim=True)


class LongConv(nn.Module):
    """Explicit long convolution over time, ``channels`` kernels per model channel.

    Kernel taps: ``kernel[c, h, 0, j]`` is lag j (output t reads input t - j, j = 0 .. l_max - 1); when
    bidirectional, ``kernel[c, h, 1, j]`` is lag -(j + 1) (output t reads input t + j + 1). For L < l_max only
    the first L (resp. L - 1) taps are used, so the causal layer never reads the future.
    """

    def __init__(self, d_model: int, l_max: int, *, channels: int = 2, bidirectional: bool = True, dropout: float = 0.1,
                 tie_dropout: bool = False, kernel_lam: float = 1e-3, kernel_dropout: float = 0.2, kernel_smooth: int = 0,
                 kernel_init: str = "noise"):
        super().__init__()
        self.bidirectional, self.kernel_lam, self.kernel_smooth = bidirectional, kernel_lam, kernel_smooth
        self.kernel = nn.Parameter(init_kernel((channels, d_model, 2 if bidirectional else 1, l_max), kernel_init))
        self.D = nn.Parameter(torch.randn(channels, d_model))
        self.kernel_drop, self.drop = nn.Dropout(kernel_dropout), SequenceDropout(dropout, tie_dropout)
        self.out_proj = nn.Linear(channels * d_model, 2 * d_model)

    def regularised_kernel(self) -> torch.Tensor:
        """(channels, D, sides, l_max): optional moving average, squash k <- sign(k) relu(|k| - lam), dropout."""
        k = self.kernel
        if self.kernel_smooth > 1:  # odd window, same length out, each side smoothed on its own
            w = self.kernel_smooth | 1
            k = F.avg_pool1d(k.flatten(0, 2)[:, None], w, stride=1, padding=w // 2, count_include_pad=False).view_as(k)
        k = torch.sign(k) * F.relu(k.abs() - self.kernel_lam)
        return self.kernel_drop(k)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> y: (B, channels, D, L), y[:, c, d, t] = sum_j k[c, d, j] x[:, t - j, d] + D[c, d] x[:, t, d].

        The sum runs over j = 0 .. t (causal) or over every lag -(L - 1) .. L - 1 (bidirectional). Computed by
        FFT in float32 (float64 for float64 inputs), outside autocast.
        """
        B, L, H = x.shape
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        k = self.regularised_kernel().to(work)
        # The skip term D * x is the lag-0 tap of the same convolution, so it rides along in the FFT.
        causal_half = torch.cat([k[:, :, 0, :1] + self.D[..., None].to(work), k[:, :, 0, 1:L]], -1)
        if self.bidirectional:
            # Circular layout for an FFT of size n = 2L: index j holds lag j, index n - j holds lag -j (0 < j < L);
            # index L stays zero, so nothing wraps around.
            anti = k[:, :, 1, : L - 1].flip(-1)
            k_full = torch.cat([causal_half, causal_half.new_zeros(*k.shape[:2], 1), anti], -1)
        else:
            k_full = causal_half  # zero-padded to n = 2L by rfft: a linear, causal convolution
        n = 2 * L
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.to(work).transpose(1, 2)[:, None]  # (B, 1, D, L)
            return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k_full, n=n), n=n)[..., :L]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D): conv, GELU, dropout, Linear(channels * D -> 2D), GLU."""
        y = self.conv(x).flatten(1, 2).transpose(1, 2).to(x.dtype)  # (B, L, channels * D)
        y = self.drop(F.gelu(y))
        return F.glu(self.out_proj(y), dim=-1)


class LongConvClassifier(nn.Module):
    """x: (B, L, d_input) -> logits (B, n_classes); ``features`` gives the per-position states (B, L / pool, D).

    ``pool > 1`` averages every ``pool`` consecutive positions after the first layer, so the later layers run on a
    sequence ``pool`` times shorter (their cost drops by as much); pooled position i summarises inputs
    [pool * i, pool * (i + 1)), so a causal model stays causal at that resolution.
    """

    def __init__(self, d_input: int, n_classes: int = 10, *, d_model: int = 256, n_layers: int = 6, l_max: int = 1024,
                 dropout: float = 0.1, tie_dropout: bool = False, prenorm: bool = False, pool: int = 1, **conv_kwargs):
        super().__init__()
        if pool < 1 or l_max % pool:
            raise ValueError(f"--pool must be a positive divisor of the sequence length {l_max}, got {pool}")
        self.prenorm, self.pool = prenorm, pool
        self.encoder = nn.Linear(d_input, d_model)
        self.convs = nn.ModuleList(
            LongConv(d_model, l_max if i == 0 else l_max // pool, dropout=dropout, tie_dropout=tie_dropout, **conv_kwargs)
            for i in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.drop = SequenceDropout(dropout, tie_dropout)
        self.decoder = nn.Linear(d_model, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            z = conv(norm(h) if self.prenorm else h)
            h = h + self.drop(z)
            h = h if self.prenorm else norm(h)
            if i == 0 and self.pool > 1:  # (B, L, D) -> (B, L / pool, D): means of `pool` neighbours
                h = F.avg_pool1d(h.transpose(1, 2), self.pool).transpose(1, 2)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x).mean(1))


# ------------------------------------------------------------------------------------------- training
def make_optimizer(model: LongConvClassifier, args) -> torch.optim.AdamW:
    """Kernels get their own lr and no weight decay; every other parameter the base lr and decay."""
    kernels = [p for n, p in model.named_parameters() if n.endswith(".kernel")]
    others = [p for n, p in model.named_parameters() if not n.endswith(".kernel")]
    return torch.optim.AdamW([{"params": others}, {"params": kernels, "lr": args.kernel_lr, "weight_decay": 0.0}],
                             lr=args.lr, weight_decay=args.weight_decay)


def batches(x, y, batch_size, generator=None):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]


def train_epoch(model, opt, sched, x, y, args, gen, aug_gen, device, progress=None) -> float:
    """One pass over (x uint8 (N, 32, 32, 3), y (N,)) in the order drawn from ``gen`` (CPU), augmentation drawn
    from ``aug_gen`` (on ``device``); returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    task = progress.add_task("train", total=math.ceil(len(x) / args.batch_size)) if progress else None
    for xb, yb in batches(x, y, args.batch_size, gen):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        img = to_sequence(xb, args.grayscale)
        if not args.no_augment:
            img = augment(img, aug_gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(flatten(img)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, count = total + loss.item() * len(yb), count + len(yb)
        if progress:
            progress.update(task, advance=1, description=f"train loss {total / count:.3f}")
    if progress:
        progress.remove_task(task)
    return total / count


@torch.no_grad()
def evaluate(model, x, y, args, device) -> tuple[float, float]:
    """Returns (mean loss, accuracy) on uint8 images x (N, 32, 32, 3) without augmentation; with ``args.tta`` the
    logits are the mean of the image's and its mirror image's."""
    model.eval()
    loss, correct = 0.0, 0
    for xb, yb in batches(x, y, 2 * args.batch_size):
        xb, yb = xb.to(device), yb.to(device)
        img = to_sequence(xb, args.grayscale)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(flatten(img)).float()
            if args.tta:
                logits = (logits + model(flatten(img.flip(-1))).float()) / 2
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
    return loss / len(x), correct / len(x)


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temporary file beside ``path``, fsyncs it and renames it over ``path``: readers never
    see half a file. A one-file copy of ``serengeti.io.atomic.atomic_write`` (src/serengeti/io/atomic.py),
    without its clean-up of temporaries left by killed writers."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_run_record(folder: str, args, history: list[dict], *, steps: int, n_params: int) -> None:
    """``metrics.json`` and ``config_resolved.yaml`` (the flags) in ``folder``, in the layout train.py writes
    (src/serengeti/io/run_record.py), so that ``python -m serengeti.report`` groups and aggregates these runs too."""
    last = history[-1]
    write_json_atomic(os.path.join(folder, "config_resolved.yaml"), vars(args))  # JSON is valid YAML
    write_json_atomic(os.path.join(folder, "metrics.json"), {
        "status": "completed", "reason": None,
        "metrics": {"test/accuracy": last["test_acc"], "test/loss": last["test_loss"], "train/loss": last["train_loss"]},
        "steps": steps, "wall_s": last["seconds"], "cpu_s": last["cpu_seconds"], "num_threads": torch.get_num_threads(),
        "n_params": n_params, "state_size": None, "git_commit": None, "git_dirty": None, "config": "config_resolved.yaml"})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each valued flag's default unless its help names one."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS \
                or "default" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _finite(v) -> bool:
    return math.isfinite(v)


# flag -> (test, what is expected); checked after parsing, before anything is built or loaded
LIMITS = {
    "--epochs": (lambda v: v >= 1, "an integer >= 1"),
    "--batch-size": (lambda v: v >= 1, "an integer >= 1"),
    "--d-model": (lambda v: v >= 1, "an integer >= 1"),
    "--n-layers": (lambda v: v >= 1, "an integer >= 1"),
    "--channels": (lambda v: v >= 1, "an integer >= 1"),
    "--pool": (lambda v: v >= 1, "an integer >= 1"),
    "--kernel-smooth": (lambda v: v >= 0, "an integer >= 0"),
    "--max-train": (lambda v: v >= 1, "an integer >= 1"),
    "--max-test": (lambda v: v >= 1, "an integer >= 1"),
    "--threads": (lambda v: v >= 1, "an integer >= 1"),
    "--eval-every": (lambda v: v >= 1, "an integer >= 1"),
    "--seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "--dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "--kernel-dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "--kernel-lam": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
    "--lr": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "--kernel-lr": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "--weight-decay": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
    "--warmup-epochs": (lambda v: _finite(v) and v >= 0, "a number >= 0"),
}


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse out-of-range flags, an unknown --device and an unwritable --history or --run-dir (``p.error``: one line,
    exit 2)."""
    for flag, (ok, expected) in LIMITS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not ok(value):
            p.error(f"argument {flag}: expected {expected}, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: expected cpu, cuda or cuda:<index>, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device!r} but CUDA is not available here (use --device cpu)")
    # --run-dir first: it is created, and --history may point inside it
    for flag, folder in (("--run-dir", args.run_dir),
                         ("--history", args.history and os.path.dirname(os.path.abspath(args.history)))):
        if not folder:
            continue
        try:
            if flag == "--run-dir":
                os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            p.error(f"argument {flag}: cannot write into {folder} ({e.strerror or e})")


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="local CIFAR-10: an .npz with uint8 x_train/x_test (N, 32, 32, 3) and y_train/y_test, or a folder "
                           "with data_batch_*.bin and test_batch.bin (the official binary version; pickles are never read). "
                           f"Default: download {HUB_DATASET} from the Hugging Face hub (needs network, `datasets`, Pillow)")
    data.add_argument("--grayscale", action="store_true", help="one luma channel (the sequential-CIFAR benchmark)")
    data.add_argument("--no-augment", action="store_true", help="turn off random crop (4-pixel zero padding) + horizontal flip")
    data.add_argument("--max-train", type=int, default=None, help="use only the first N training images (default: all)")
    data.add_argument("--max-test", type=int, default=None, help="use only the first N test images (default: all)")
    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=256, help="model width D")
    model.add_argument("--n-layers", type=int, default=6, help="number of residual long-convolution layers")
    model.add_argument("--channels", type=int, default=2, help="kernels per model channel")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout on activations and residual branches")
    model.add_argument("--tie-dropout", action="store_true",
                       help="one dropout mask per (image, channel) shared by all 1024 positions (S4's tied dropout)")
    model.add_argument("--kernel-dropout", type=float, default=0.2, help="dropout on the kernel taps")
    model.add_argument("--kernel-lam", type=float, default=1e-3, help="squash threshold: taps with |k| below it are zeroed")
    model.add_argument("--kernel-smooth", type=int, default=0, help="moving-average window on the kernel taps (0: off)")
    model.add_argument("--kernel-init", choices=("noise", "decay"), default="noise",
                       help="kernel taps at init: small i.i.d. noise, or noise decaying with the lag at scales from one pixel to the whole image")
    model.add_argument("--pool", type=int, default=1,
                       help="average-pool the sequence by this factor after the first layer (1: off)")
    model.add_argument("--prenorm", action="store_true", help="normalise before each layer (default: after, post-norm)")
    direction = model.add_mutually_exclusive_group()
    direction.add_argument("--bidirectional", dest="bidirectional", action="store_true", default=True,
                           help="every position sees the whole image")
    direction.add_argument("--causal", dest="bidirectional", action="store_false",
                           help="position t sees only pixels 0..t (default: bidirectional)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=300, help="training epochs; the cosine schedule spans them all")
    optim.add_argument("--batch-size", type=int, default=50, help="training batch (evaluation uses twice this)")
    optim.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate of every non-kernel parameter")
    optim.add_argument("--kernel-lr", type=float, default=1e-3, help="AdamW learning rate of the kernels (no weight decay)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of non-kernel parameters")
    optim.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup before the cosine decay")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device (default: cuda when available, else cpu); on CUDA the model runs in bf16 autocast, "
                          "the FFT convolution in float32")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the CPUs this process may use)")
    run.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, augmentation and dropout")
    run.add_argument("--history", default=None,
                     help="write the per-epoch curve (seconds, CPU seconds, losses, test accuracy) and the flags as JSON here")
    run.add_argument("--run-dir", default=None,
                     help="write metrics.json and config_resolved.yaml here, as train.py does for its runs, so that "
                          "`python -m serengeti.report` aggregates seeds (created if missing)")
    run.add_argument("--eval-every", type=int, default=1,
                     help="test every N epochs (and after the last; each test pass costs ~40%% of a training epoch's images)")
    run.add_argument("--tta", action="store_true", help="test on the mean logits of each image and its mirror image")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def main(argv=None) -> dict:
    """Trains and tests. Returns {"history": [{epoch, seconds, train_loss, test_loss, test_acc}, ...] (epoch 0 is
    the untrained model; seconds count from before it; test_* are None on epochs skipped by --eval-every),
    "test_acc": the last epoch's, "model": the trained model}."""
    args = parse_args(argv)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    # default: the CPUs this process may use (its affinity mask), not torch's count of the machine's cores
    omp = os.environ.get("OMP_NUM_THREADS", "")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else available))
    device = torch.device(args.device)
    try:  # before loading data, so a bad flag (e.g. --pool) stops at once with the model's one-line message
        model = LongConvClassifier(1 if args.grayscale else 3, d_model=args.d_model, n_layers=args.n_layers,
                                   dropout=args.dropout, tie_dropout=args.tie_dropout, prenorm=args.prenorm,
                                   pool=args.pool, channels=args.channels, bidirectional=args.bidirectional,
                                   kernel_lam=args.kernel_lam, kernel_dropout=args.kernel_dropout,
                                   kernel_smooth=args.kernel_smooth, kernel_init=args.kernel_init).to(device)
    except ValueError as e:
        raise SystemExit(f"standalone_cifar.py: error: {e}") from None
    try:
        x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_cifar(args.data))
    except (OSError, ValueError, RuntimeError) as e:  # missing, damaged or foreign --data; hub unreachable
        raise SystemExit(f"standalone_cifar.py: error: {e}") from None
    x_train, y_train = x_train[: args.max_train], y_train[: args.max_train]
    x_test, y_test = x_test[: args.max_test], y_test[: args.max_test]
    if device.type == "cuda":  # the whole uint8 set fits on the GPU; batches are then gathered there
        x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    opt = make_optimizer(model, args)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"{len(x_train)} train / {len(x_test)} test images, {n_params:,} parameters, device {device}, "
                  f"{'bidirectional' if args.bidirectional else 'causal'}, {'grayscale' if args.grayscale else 'RGB'}")

    gen = torch.Generator().manual_seed(args.seed)
    aug_gen = torch.Generator(device).manual_seed(args.seed + 1)
    # Wall seconds, and this process's CPU seconds (all threads) as a measure that other load on the machine does not inflate.
    history, start, cpu_start = [], time.perf_counter(), time.process_time()
    with Progress(console=console, transient=True, disable=args.quiet) as progress:
        for epoch in range(args.epochs + 1):  # epoch 0: the untrained model, the start of the curve
            train_loss = train_epoch(model, opt, sched, x_train, y_train, args, gen, aug_gen, device, progress) if epoch else None
            tested = epoch % args.eval_every == 0 or epoch == args.epochs
            test_loss, test_acc = evaluate(model, x_test, y_test, args, device) if tested else (None, None)
            history.append(dict(epoch=epoch, seconds=round(time.perf_counter() - start, 1),
                                cpu_seconds=round(time.process_time() - cpu_start, 1), train_loss=train_loss,
                                test_loss=test_loss, test_acc=test_acc))
            console.print(f"epoch {epoch:3d}  {history[-1]['seconds']:7.1f}s ({history[-1]['cpu_seconds']:.0f} CPU s)  train loss "
                          f"{'-' if train_loss is None else f'{train_loss:.4f}'}" + (
                              f"  test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%" if tested else ""))
            if args.history:  # after every epoch, so an interrupted run still leaves its curve
                write_json_atomic(args.history, {"args": vars(args), "history": history})
    if args.run_dir:
        write_run_record(args.run_dir, args, history, steps=args.epochs * steps_per_epoch, n_params=n_params)
    console.print(f"final test accuracy: {100 * history[-1]['test_acc']:.2f}% after {args.epochs} epochs, "
                  f"{history[-1]['seconds']:.0f}s")
    return {"history": history, "test_acc": history[-1]["test_acc"], "model": model}


if __name__ == "__main__":
    main()
