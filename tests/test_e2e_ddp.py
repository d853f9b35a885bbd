"""Data-parallel training of a converted model: DDP and FSDP2 (fully_shard), 2 CPU processes, gloo.

The recipe these tests pin down is the one docs/distributed.md gives: wrap DDP after
set_phase and wrap again when the phase changes; under FSDP2 the label-free denoiser phase
needs the input to require grad; fuse after unwrapping (DDP: model.module; FSDP2: a full state
dict loaded into an unsharded converted model).
"""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import drep_kernels as dk

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
PHASES = ("denoiser", "backbone", "joint", "denoiser")
STEPS = 3


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.GELU(), nn.Linear(16, 4)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _worker(rank: int, port: int, modes: tuple[str, ...], out_dir: str) -> None:
    # One process group for all modes: starting processes (importing torch) is the slow part.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for mode in modes:
            _train(rank, mode, out_dir)
    finally:
        dist.destroy_process_group()


def _train(rank: int, mode: str, out_dir: str) -> None:
    torch.manual_seed(rank)  # ranks start different: DDP / the state dict must make them agree
    model = dk.convert(_net(), include=(nn.Linear, nn.Conv2d), init="linear")
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # fully_shard does not sync ranks (DDP does, when built): start them from rank 0's state.
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
        for layer in model:
            if isinstance(layer, dk.model.DENOISE_TYPES):
                fully_shard(layer)
        fully_shard(model)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of the data
    x, y = torch.randn(8, 3, 4, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # independent denoising noise on each rank
    losses = []
    for phase in PHASES:
        dk.set_phase(model, phase)
        # DDP hooks the parameters that require grad when it is built: build it per phase.
        wrapped = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
        for _ in range(STEPS):
            # FSDP2 finishes a backward from hooks on the outputs; in the label-free denoiser
            # phase nothing else makes them require grad.
            inp = x.clone().requires_grad_(mode == "fsdp" and phase == "denoiser")
            task = nn.functional.cross_entropy(wrapped(inp), y)
            (task + 0.01 * dk.denoise_loss(model)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(task.item())
    model.eval()
    with torch.no_grad():
        unfused = model(x)
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = dk.convert(_net(), include=(nn.Linear, nn.Conv2d))
        plain.load_state_dict(state)
    else:
        state = {k: _full(v) for k, v in model.state_dict().items()}
        plain = wrapped.module  # unwrap: DDP wraps the model, it does not copy it
        assert plain is model
    fused = dk.fuse(plain.eval())
    with torch.no_grad():
        fuse_diff = (fused(x) - unfused).abs().max().item()
    plain_types = not any(isinstance(m, dk.model.DENOISE_TYPES) for m in fused.modules())
    torch.save(
        {"state": {k: _full(v) for k, v in state.items()}, "losses": losses, "fuse_diff": fuse_diff,
         "plain": plain_types},
        f"{out_dir}/{mode}_{rank}.pt",
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("dist")
    modes = ("ddp", "fsdp") if _has_fsdp2() else ("ddp",)
    mp.spawn(_worker, args=(_free_port(), modes, str(out_dir)), nprocs=WORLD, join=True)
    return {mode: [torch.load(out_dir / f"{mode}_{r}.pt") for r in range(WORLD)] for mode in modes}


def test_ddp_ranks_agree_loss_goes_down_and_fuse_after_unwrapping(results):
    ddp_results = results["ddp"]
    r0, r1 = ddp_results
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"ranks disagree on {key}"
    for r in ddp_results:
        first_trained = r["losses"][STEPS]  # the denoiser phase leaves the task loss (nearly) alone
        assert r["losses"][-1] < 0.8 * first_trained, r["losses"]
        assert r["plain"] and r["fuse_diff"] < 1e-5


def test_fsdp2_fully_shard_on_gloo_trains_as_ddp_does(results):
    if "fsdp" not in results:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    for r, ref in zip(results["fsdp"], results["ddp"]):
        assert r["plain"] and r["fuse_diff"] < 1e-5
        for key, value in ref["state"].items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"FSDP2 vs DDP: {key}")
