"""Training on several processes with PyTorch's distributed engine.

`torchrun` (or SLURM through it) starts one process per device and tells each its RANK, WORLD_SIZE and
LOCAL_RANK; `setup` joins the process group (NCCL on CUDA, gloo on CPU). Without those variables
every helper here is a no-op for one process, so single-process training runs the same loop.

The model is wrapped in a `Runner` whose forward runs task code (a loss, an evaluation, sampling):
DDP prepares its gradient all-reduce in forward and FSDP2 gathers the root's parameters there, so the
task can keep calling `model.features(...)` and `model.head.weight` as in one process.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    parallel: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process started the group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group and a DDP or FSDP wrapper are in use (one process of them too, under torchrun
        with train.parallel asked for by name: FSDP with CPU offload fits a larger model on one GPU)."""
        return self.parallel != "none"


def setup(tc, device: torch.device) -> Dist:
    """The process group from torchrun's environment; `device` is the configured one, which on CUDA
    becomes this process's own GPU (cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    under_torchrun = "LOCAL_RANK" in os.environ
    if world == 1 and not (under_torchrun and tc.parallel in ("ddp", "fsdp")):
        if tc.parallel in ("ddp", "fsdp"):
            warnings.warn(f"train.parallel = {tc.parallel} with one process: training without it "
                          "(launch with torchrun --nproc_per_node N to use several)", stacklevel=2)
        return Dist(device=device)
    if tc.parallel == "none":
        raise UserError(f"config: train.parallel = none, but torchrun started {world} processes that would each "
                        "train alone; use auto, ddp or fsdp")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    parallel = "ddp" if tc.parallel == "auto" else tc.parallel
    return Dist(dist.get_rank(), dist.get_world_size(), parallel, device, owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(d: Dist):
    """Rank 0 runs the body first (say, filling the token cache), the other ranks after it, so they
    read what it wrote instead of racing to write it. A UserError on rank 0 stops every rank."""
    if not d.active:
        yield
        return
    error = None
    if d.main:
        try:
            yield
        except UserError as e:
            error = str(e)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise UserError(error)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise UserError(box[0])
        yield


class Runner(nn.Module):
    """runner(fn, *args) = fn(model, *args), run inside forward() so that DDP and FSDP see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def wrap(d: Dist, model: nn.Module, tc, compute_dtype: torch.dtype) -> nn.Module:
    """The model in a Runner, replicated (DDP) or sharded (FSDP2: each block, then the root) across ranks."""
    from lmforge.model.layers import Block

    runner = Runner(model)
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # no buffer needs syncing at each forward (no batch norm); the RoPE tables are the same on every rank
        return DDP(runner, device_ids=[d.device.index] if d.device.type == "cuda" else None, forward_sync_buffers=False)
    if d.parallel == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if d.device.type == "cuda" and compute_dtype == torch.bfloat16:
            # gather parameters in bf16, reduce gradients in fp32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if tc.fsdp_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, **kwargs)
        fully_shard(runner, **kwargs)  # the embeddings, final norm and head
    return runner


def no_sync(runner: nn.Module, skip: bool):
    """While `skip`: accumulate gradients locally, without the all-reduce (DDP) or reduce-scatter (FSDP)."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(runner, "no_sync"):  # DDP
        return runner.no_sync()
    if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(runner)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(runner):
    runner.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        runner.set_requires_gradient_sync(True)


def sum_over_ranks(d: Dist, *values: float) -> list[float]:
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a time budget each rank measures for itself)."""
    return sum_over_ranks(d, float(flag))[0] > 0


def from_main(d: Dist, obj):
    """Rank 0's `obj` on every rank (so decisions such as early stopping agree)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def full_weights(d: Dist, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as plain CPU tensors on rank 0 (None elsewhere), each tied weight once
    (under the name safetensors keeps). Every rank must call it: FSDP gathers the shards."""
    if d.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not d.main:
        return None
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    drop = {name for names in tied.values() for name in sorted(names)[1:]}
    return {k: v.contiguous() for k, v in state.items() if k not in drop}


def trained_weights_finite(d: Dist, model: nn.Module) -> bool:
    """Whether every parameter that trains is finite, on every rank (each checks its own FSDP shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    finite = bool(torch.stack([torch.isfinite(p).all() for p in local]).all()) if local else True
    return not any_rank(d, not finite)


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float; under FSDP it is a DTensor."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
