"""drep-train and drep-fuse end to end: scikit-learn's digits as an image folder (PNG files,
upscaled to 32 x 32), timm's smallest ViT (``test_vit``: 6 blocks of width 64, 25 Linears).

The commands run as users run them, in subprocesses started outside the checkout (which has no
compiled extension unless built in place): ``python -m drep_kernels.train``, under
``torch.distributed.run`` for 2 gloo processes. Bad input is checked in-process through the
same ``main``. Each run is a few seconds of training; process start-up dominates.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("timm", reason="drep-train needs the train extra (timm); CI's 'newest' environment has no timm")
pytest.importorskip("torchvision", reason="drep-train needs torchvision (ImageFolder)")
pytest.importorskip("tqdm", reason="drep-train needs tqdm")
pytest.importorskip("sklearn", reason="the test images are scikit-learn's digits")

import timm  # noqa: E402

import drep_kernels as dk  # noqa: E402
from conftest import TOLERANCES, assert_close  # noqa: E402
from drep_kernels import fuse_checkpoint, train  # noqa: E402

MODEL = ["--model", "test_vit", "--img-size", "32"]
RECIPE = ["--phase-len", "1", "--batch-size", "32", "--lr", "1e-3", "--workers", "0"]
BUILD = "timm.create_model('test_vit', num_classes=10, img_size=32)"
PHASES = ["denoiser", "backbone", "denoiser"]
# Columns a continued run must reproduce exactly (the others are timings).
EXACT = ("epoch", "phase", "lr", "task_loss", "denoise_loss", "val_top1")


def _digits_folder(root: Path, n_train: int = 20, n_val: int = 10) -> Path:
    """train/ and val/ with one folder per digit: the 8 x 8 images as 32 x 32 grey PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        for split, part in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val])):
            folder = root / split / str(c)
            folder.mkdir(parents=True)
            for i in part:
                pixels = (bunch.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(folder / f"{i}.png")
    return root


def _cli(module: str, *args: str, cwd: Path, procs: int = 1) -> subprocess.CompletedProcess:
    """``python -m module args`` (under torch.distributed.run with ``procs`` > 1), from ``cwd``:
    outside the checkout, so the installed package is the one imported."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny batches: more threads only contend
    env.pop("DREP_BACKEND", None)
    done = subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{module} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys(), "optimizer: parameters with state differ"
    for name, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][name][key]), f"optimizer state {name}.{key} differs"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return _digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def single(digits, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """3 epochs (denoiser, backbone, denoiser) in one process, a checkpoint kept per epoch; every
    Linear converted but the classifier (24 layers)."""
    work = tmp_path_factory.mktemp("single")
    done = _cli("drep_kernels.train", "--data", str(digits), "--output", "run", *MODEL, *RECIPE, "--epochs", "3",
                "--exclude", "head", "--save-every-epoch", cwd=work)
    return work / "run", done


@pytest.fixture(scope="module")
def resumed(single, digits) -> Path:
    run, _ = single
    _cli("drep_kernels.train", "--data", str(digits), "--output", "resumed", "--workers", "0",
         "--resume", str(run / "checkpoint-epoch1.pt"), cwd=run.parent)
    return run.parent / "resumed"


@pytest.fixture
def keep_rng():
    """In-process runs seed the global generators; give the other tests theirs back."""
    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


# --- one process -----------------------------------------------------------------------------

@pytest.mark.slow
def test_train_alternates_phases_logs_each_epoch_and_writes_its_files(single):
    run, done = single
    rows = _rows(run)
    assert [r["phase"] for r in rows] == PHASES
    for r in rows:
        assert math.isfinite(float(r["task_loss"])) and 0 <= float(r["val_top1"]) <= 1
        # The denoising loss exists exactly where the denoisers train.
        assert (r["denoise_loss"] != "") == (r["phase"] == "denoiser"), r
    lines = done.stdout.splitlines()
    for epoch, phase in enumerate(PHASES, 1):
        assert sum(line.startswith(f"epoch {epoch}/3 [{phase}]") for line in lines) == 1, done.stdout
    assert "24 layers converted (linear)" in done.stdout
    assert any(line.startswith("fused: val top-1") and "max |logit difference|" in line for line in lines), done.stdout
    assert "epoch 3/3" in done.stderr and "img/s" in done.stderr  # the progress bar
    assert json.loads((run / "log.json").read_text())["final"]["max_logit_diff"] == 0.0
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint-last.pt", "checkpoint-epoch1.pt", "checkpoint-epoch2.pt", "checkpoint-epoch3.pt",
         "log.csv", "log.json", "model-fused.pt", "model-fused.json"])

    # What trained in each epoch: only the denoisers in a denoiser phase, never them in a backbone one.
    states = [_ckpt(run / f"checkpoint-epoch{e}.pt")["model"] for e in (1, 2, 3)]
    for (before, after), phase in zip(zip(states, states[1:]), PHASES[1:]):
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        denoisers = {k for k in before if k.endswith(("denoise_weight", "denoise_bias"))}
        assert changed, phase
        assert (changed <= denoisers) if phase == "denoiser" else not (changed & denoisers), (phase, sorted(changed)[:5])
    assert states[0]["blocks.0.mlp.fc1.denoise_weight"].abs().sum() > 0  # trained from zero in epoch 1
    assert not any(k.startswith("head.denoise") for k in states[0])  # --exclude head


@pytest.mark.slow
def test_resume_from_epoch_1_reproduces_the_uninterrupted_run_bitwise(single, resumed):
    run, _ = single
    full, cont = _rows(run), _rows(resumed)
    assert [{k: r[k] for k in EXACT} for r in cont] == [{k: r[k] for k in EXACT} for r in full]
    a, b = _ckpt(run / "checkpoint-last.pt"), _ckpt(resumed / "checkpoint-last.pt")
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    _assert_same_state(torch.load(run / "model-fused.pt"), torch.load(resumed / "model-fused.pt"), "fused model")


@pytest.mark.slow
def test_fused_output_loads_strictly_into_timm_without_drep_kernels_and_computes_the_trained_model(single, tmp_path):
    run, _ = single
    meta = json.loads((run / "model-fused.json").read_text())
    assert meta["build"] == BUILD and meta["classes"] == [str(c) for c in range(10)]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import json, sys, torch, timm\n"
        "meta = json.load(open('model-fused.json'))\n"
        "model = timm.create_model(meta['model'], **meta['kwargs'])\n"
        "model.load_state_dict(torch.load('model-fused.pt'), strict=True)\n"
        "assert 'drep_kernels' not in sys.modules, 'loading the fused model imported drep_kernels'\n"
        f"torch.save(model.eval()(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The trained (unfused) model, rebuilt from its checkpoint here.
    trained = timm.create_model("test_vit", num_classes=10, img_size=32)
    dk.convert(trained, exclude=["head"])
    trained.load_state_dict(_ckpt(run / "checkpoint-last.pt")["model"], strict=True)
    with torch.no_grad():
        expected = trained.eval()(x)
    assert_close(torch.load(tmp_path / "y.pt"), expected, *TOLERANCES[torch.float32], "fused (plain timm) vs trained")


@pytest.mark.slow
def test_drep_fuse_of_a_train_checkpoint_writes_the_fused_model(single, tmp_path, capsys, keep_rng):
    run, _ = single
    out = tmp_path / "plain.pt"
    assert fuse_checkpoint.main(["--model", "test_vit", "--checkpoint", str(run / "checkpoint-last.pt"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "24 layers fused" in printed and "max |logit difference| fused vs unfused 0.000e+00" in printed, printed
    ours, theirs = torch.load(out), torch.load(run / "model-fused.pt")
    assert ours.keys() == theirs.keys()
    for k in theirs:  # the same merge; BLAS may sum in another order on this process's thread count
        assert_close(ours[k], theirs[k], *TOLERANCES[torch.float32], f"drep-fuse vs drep-train: {k}")
    assert json.loads(out.with_suffix(".json").read_text())["build"] == BUILD


@pytest.mark.slow
def test_drep_fuse_of_a_converted_models_state_dict_fuses_the_layers_it_has_denoisers_for(single, tmp_path, capsys, keep_rng):
    run, _ = single
    torch.save(_ckpt(run / "checkpoint-last.pt")["model"], tmp_path / "converted.pt")  # model.state_dict() of a converted model
    out = tmp_path / "plain.pt"
    argv = ["--model", "test_vit", "--img-size", "32", "--checkpoint", str(tmp_path / "converted.pt"), "--output", str(out)]
    assert fuse_checkpoint.main(argv) == 0
    assert "(converted state dict): 24 layers fused" in capsys.readouterr().out  # the head has no denoiser: left plain
    ours, theirs = torch.load(out), torch.load(run / "model-fused.pt")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert_close(ours[k], theirs[k], *TOLERANCES[torch.float32], f"drep-fuse of the state dict vs drep-train: {k}")


@pytest.mark.slow
def test_baseline_trains_the_unconverted_model(digits, tmp_path):
    done = _cli("drep_kernels.train", "--data", str(digits), "--output", "base", *MODEL, "--batch-size", "32",
                "--workers", "0", "--epochs", "1", "--baseline", cwd=tmp_path)
    run = tmp_path / "base"
    rows = _rows(run)
    assert [(r["phase"], r["denoise_loss"]) for r in rows] == [("baseline", "")]
    assert "unconverted (--baseline)" in done.stdout
    state = _ckpt(run / "checkpoint-last.pt")["model"]
    plain = timm.create_model("test_vit", num_classes=10, img_size=32)
    assert state.keys() == plain.state_dict().keys()  # no denoiser anywhere
    plain.load_state_dict(torch.load(run / "model.pt"), strict=True)
    assert not (run / "model-fused.pt").exists()


# --- the authors' checkpoint layout --------------------------------------------------------------

AUTHORS_LAYERS = ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.5.attn.proj")  # forward order: t = 3, 2, 1
SINUSOID = 32


def _sinusoid(t: int) -> torch.Tensor:
    half = SINUSOID // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
    return torch.cat(((t * freqs).sin(), (t * freqs).cos()))


class _AuthorsLayer(nn.Module):
    """The authors' denoising layer as docs/method.md describes it, in float64: the denoiser
    eps = W_d (x + e_t) + b_d with their time MLP e_t = L2(GELU(L1(sinusoid(t)))), one
    deterministic reverse step x_prev = c3 x - c1 eps, then the layer: W x_prev + b."""

    def __init__(self, sd: dict, t: int):
        super().__init__()
        self.sd = {k: v.double() for k, v in sd.items()}
        betas = self.sd["betas"]
        alpha, abar = 1 - betas[t], torch.cumprod(1 - betas, 0)[t]
        self.c3 = 1 / alpha.sqrt()
        self.c1 = betas[t] / ((1 - abar).sqrt() * alpha.sqrt())
        d = self.sd
        self.e_t = F.linear(F.gelu(F.linear(_sinusoid(t), d["time_mlp.1.weight"], d["time_mlp.1.bias"])),
                            d["time_mlp.3.weight"], d["time_mlp.3.bias"])

    def forward(self, x):
        d = self.sd
        eps = F.linear(x + self.e_t, d["dm.weight"], d["dm.bias"])
        return F.linear(self.c3 * x - self.c1 * eps, d["weight"], d["bias"])


def _authors_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A test_vit (10 classes, 32 x 32) state dict in the authors' layout, denoisers on AUTHORS_LAYERS.
    The denoisers are large (entries of N(0, 0.5)) so that a wrong step t or a dropped time embedding
    moves the logits by percents."""
    torch.manual_seed(seed)
    sd = timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()
    g = torch.Generator().manual_seed(seed)
    for layer in AUTHORS_LAYERS:
        k = sd[f"{layer}.weight"].shape[1]
        sd[f"{layer}.dm.weight"] = torch.randn(k, k, generator=g) * 0.5
        sd[f"{layer}.dm.bias"] = torch.randn(k, generator=g) * 0.5
        sd[f"{layer}.time_mlp.1.weight"] = torch.randn(k, SINUSOID, generator=g) * 0.5
        sd[f"{layer}.time_mlp.1.bias"] = torch.randn(k, generator=g) * 0.5
        sd[f"{layer}.time_mlp.3.weight"] = torch.randn(k, k, generator=g) * 0.5 / math.sqrt(k)
        sd[f"{layer}.time_mlp.3.bias"] = torch.randn(k, generator=g) * 0.5
        sd[f"{layer}.betas"] = torch.linspace(1e-4, 2e-3, 1000)
    return sd


@pytest.mark.slow
def test_drep_fuse_of_an_authors_checkpoint_computes_their_layers(tmp_path, keep_rng):
    sd = _authors_checkpoint()
    torch.save(sd, tmp_path / "authors.pt")
    done = _cli("drep_kernels.fuse_checkpoint", "--model", "test_vit", "--img-size", "32", "--checkpoint", "authors.pt",
                "--output", "plain.pt", cwd=tmp_path)
    assert "the authors' layout" in done.stdout and "3 layers fused" in done.stdout, done.stdout

    fused = timm.create_model("test_vit", num_classes=10, img_size=32)  # the class count read from head.weight
    fused.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)
    oracle = timm.create_model("test_vit", num_classes=10, img_size=32).double()
    oracle.load_state_dict({k: v for k, v in sd.items() if k in oracle.state_dict()}, strict=True)
    for t, layer in zip((3, 2, 1), AUTHORS_LAYERS):
        parent, _, child = layer.rpartition(".")
        own = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".")}
        setattr(oracle.get_submodule(parent), child, _AuthorsLayer(own, t))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = fused.eval()(x), oracle.eval()(x.double())
    # float32 through 6 blocks against float64: 2e-7 on logits up to 0.3 here; a step off by one
    # or a dropped time embedding moves them by more than 3e-2.
    assert_close(got, want, 1e-4, 1e-5, "fused authors' checkpoint vs their layers in float64")


# --- --checkpoint: the weights to start from ---------------------------------------------------------

def test_start_checkpoint_loads_the_weights_and_replaces_a_classifier_of_another_class_count(tmp_path, keep_rng):
    from drep_kernels.cli import zoo

    torch.manual_seed(0)
    start = timm.create_model("test_vit", img_size=32).state_dict()  # 1000 classes
    torch.save({"state_dict": start}, tmp_path / "start.pt")  # in a container, as training scripts save
    model, arch = zoo.create("test_vit", 10, 32, {}, pretrained=False)
    fresh_head = model.head.weight.detach().clone()
    assert zoo.load_initial_weights(model, arch, str(tmp_path / "start.pt")) == "; new classifier (head.weight, head.bias)"
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh_head) if k == "head.weight" else k == "head.bias" or torch.equal(v, start[k]), k


def test_a_start_checkpoint_of_another_model_is_one_line_and_writes_nothing(digits, tmp_path, capsys, keep_rng):
    torch.save(timm.create_model("test_vit2", img_size=32).state_dict(), tmp_path / "other.pt")
    out = tmp_path / "out"
    assert train.main(["--data", str(digits), "--output", str(out), *MODEL, "--checkpoint", str(tmp_path / "other.pt")]) == 2
    err = _one_line_error(capsys, "drep-train")
    assert "other.pt does not fit the model: missing cls_token" in err and "unexpected reg_token" in err, err
    assert not out.exists()


# --- installation ------------------------------------------------------------------------------

def test_console_scripts_run_the_commands():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("drep-")}
    assert sorted(scripts) == ["drep-fuse", "drep-train"]
    assert scripts["drep-train"].load() is train.main and scripts["drep-fuse"].load() is fuse_checkpoint.main


@pytest.mark.slow
def test_import_drep_kernels_leaves_the_train_extra_unimported(tmp_path):
    # (tqdm is not checked: torch imports it, for torch.hub.)
    probe = "import sys, drep_kernels; print([m for m in ('timm', 'torchvision') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)


# --- bad input: one line, nothing written -------------------------------------------------------

def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: ") and "\n" not in err, err
    return err


def test_a_missing_data_directory_is_one_line_and_writes_nothing(tmp_path, capsys, keep_rng):
    out = tmp_path / "out"
    assert train.main(["--data", str(tmp_path / "nowhere"), "--output", str(out), *MODEL]) == 2
    assert "nowhere: no such directory" in _one_line_error(capsys, "drep-train")
    (tmp_path / "flat").mkdir()
    assert train.main(["--data", str(tmp_path / "flat"), "--output", str(out), *MODEL]) == 2
    assert "no train/ and no val/" in _one_line_error(capsys, "drep-train")
    assert not out.exists()


def test_an_unknown_model_is_one_line_and_writes_nothing(digits, tmp_path, capsys, keep_rng):
    out = tmp_path / "out"
    assert train.main(["--data", str(digits), "--output", str(out), "--model", "vit_smal_patch16_224"]) == 2
    err = _one_line_error(capsys, "drep-train")
    assert "unknown model 'vit_smal_patch16_224'" in err and "vit_small_patch16_224" in err, err  # a close match
    assert not out.exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_line_naming_keys_and_writes_nothing(single, tmp_path, capsys, keep_rng):
    run, _ = single
    out = tmp_path / "plain.pt"
    argv = ["--model", "test_vit2", "--checkpoint", str(run / "checkpoint-last.pt"), "--output", str(out)]
    assert fuse_checkpoint.main(argv) == 2
    err = _one_line_error(capsys, "drep-fuse")
    # test_vit2 has register tokens and layer scales, no class token: the keys say so.
    assert "does not fit timm.create_model('test_vit2'" in err and "missing reg_token" in err and "unexpected cls_token" in err, err
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.slow
def test_resume_refuses_another_configuration(single, digits, tmp_path, capsys, keep_rng):
    run, _ = single
    argv = ["--data", str(digits), "--output", str(tmp_path / "out"), "--resume", str(run / "checkpoint-epoch1.pt"), "--lr", "0.5"]
    assert train.main(argv) == 2
    assert "--lr 0.001 (given 0.5)" in _one_line_error(capsys, "drep-train")
    assert not (tmp_path / "out").exists()


# --- torchrun: 2 gloo processes --------------------------------------------------------------------

# Linears and the Conv2d patch embedding (26 layers), under bf16 autocast.
TORCHRUN = [*RECIPE, "--batch-size", "16", "--epochs", "2", "--convert", "linear+conv", "--amp", "bf16"]

@pytest.fixture(scope="module")
def ddp(digits, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("ddp")
    done = _cli("drep_kernels.train", "--data", str(digits), "--output", "run", *MODEL, *TORCHRUN,
                "--save-every-epoch", cwd=work, procs=2)
    return work / "run", done


@pytest.mark.slow
def test_torchrun_ddp_resume_from_epoch_1_reproduces_the_run_and_only_rank_0_writes(ddp, digits):
    run, done = ddp
    assert "26 layers converted (linear+conv)" in done.stdout and "2 processes (DDP) on cpu, amp bf16" in done.stdout, done.stdout
    for epoch, phase in enumerate(PHASES[:2], 1):  # one line per epoch: only rank 0 prints
        assert done.stdout.count(f"epoch {epoch}/2 [{phase}]") == 1, done.stdout
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint-last.pt", "checkpoint-epoch1.pt", "checkpoint-epoch2.pt", "log.csv", "log.json",
         "model-fused.pt", "model-fused.json"])
    _cli("drep_kernels.train", "--data", str(digits), "--output", "resumed", "--workers", "0",
         "--resume", str(run / "checkpoint-epoch1.pt"), cwd=run.parent, procs=2)
    resumed = run.parent / "resumed"
    assert [{k: r[k] for k in EXACT} for r in _rows(resumed)] == [{k: r[k] for k in EXACT} for r in _rows(run)]
    a, b = _ckpt(run / "checkpoint-last.pt"), _ckpt(resumed / "checkpoint-last.pt")
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])  # one stream per rank


@pytest.mark.slow
def test_torchrun_fsdp2_trains_as_ddp_does(ddp, digits, tmp_path):
    run, _ = ddp
    done = _cli("drep_kernels.train", "--data", str(digits), "--output", "fsdp", *MODEL, *TORCHRUN, "--fsdp",
                cwd=tmp_path, procs=2)
    assert "2 processes (FSDP2) on cpu" in done.stdout, done.stdout
    for r, ref in zip(_rows(tmp_path / "fsdp"), _rows(run), strict=True):
        assert r["phase"] == ref["phase"] and r["val_top1"] == ref["val_top1"]
        for key in ("task_loss", "denoise_loss"):
            if ref[key]:
                assert math.isclose(float(r[key]), float(ref[key]), rel_tol=1e-5), (key, r, ref)
    fsdp, ref = _ckpt(tmp_path / "fsdp" / "checkpoint-last.pt")["model"], _ckpt(run / "checkpoint-last.pt")["model"]
    assert fsdp.keys() == ref.keys()
    for k in ref:  # gradients reduce-scattered instead of all-reduced: equal up to float32 rounding
        assert_close(fsdp[k], ref[k], 1e-5, 1e-6, f"FSDP2 vs DDP: {k}")
