"""One run over several devices: data-parallel ranks launched by torchrun
(``train.distributed.nproc``), applied around the learner the way torchtitan applies
parallelism, never inside the model or the loop.

Every rank builds the same learner from the same seed and trains its share of every step's global
batch (``train.batch_size``, the controlled quantity): rank r takes sequences ``[r*B/N,
(r+1)*B/N)`` of the step, in the order a single process would read them, so the N ranks together
see exactly the single process's batch. The gradients are averaged over the ranks once per step
(the micro-batches before the last accumulate without communicating), so the update is the
single process's up to float summation order. Before the update one all-reduce carries each
rank's loss and finiteness: the logged loss is the global batch's, and a non-finite value on any
rank stops every rank at that step, with one event.

Two strategies (``train.distributed.strategy``):

- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` around the model's
  tokens-to-hidden pass; every rank holds the whole model and optimizer state.
- ``fsdp``: FSDP2 (``fully_shard``) on every block and on the whole model, as torchtitan does:
  each rank holds 1/N of the weights, gradients and optimizer state, and a block's weights are
  gathered for its forward and backward only. The model's ``hidden`` is registered as a forward
  method, and the root's weights (embedding, final norm, head) stay gathered from its forward
  until the backward is done, so the fused loss reads the whole head. Gradient norms (global and
  per block) are summed over the shards; a checkpoint holds the whole model and optimizer state,
  gathered on rank 0 (``torch.distributed.checkpoint.state_dict``), and loads into any sharding.
  Optimizers that need a whole matrix (Muon's orthogonalisation, Adafactor's row and column
  factors) are refused. On CPU (gloo) it runs in CI; on CUDA (NCCL) it has not been measured on
  hardware by this project.

Only rank 0 records (the other ranks write through a :class:`NullSink`) and writes checkpoints;
every rank resumes from rank 0's checkpoint, so a run whose rank was killed resumes as a whole.
Evaluation and diagnostics run on every rank over the same data, so every rank makes the same
collectives in the same order (with ``ddp`` they make none).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lmlab.config import RunConfig
from lmlab.errors import UserError
from lmlab.store.ingest import Batch, RunSink


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def records(self) -> bool:
        """Whether this rank writes the run's records and checkpoints."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process is a rank torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(cfg: RunConfig) -> Rank | None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA, or
    ``train.distributed.backend``); None outside torchrun."""
    if not launched():
        return None
    rank = Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ["LOCAL_RANK"]))
    want = cfg.train.distributed.nproc
    if rank.world != want:
        raise UserError(f"launched with {rank.world} ranks, but the run asks for {want}",
                        field="train.distributed.nproc")
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    backend = cfg.train.distributed.backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank.local_rank)  # "cuda" is this rank's GPU from here on
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) when it is not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(batch: int) -> tuple[int, int]:
    """This rank's part of a step's ``batch`` sequences: (offset, count)."""
    rank, world = current()
    share = batch // world
    return rank * share, share


def writes_checkpoints() -> bool:
    return current()[0] == 0


def stop_agreed(should_stop: Callable[[], bool], step: int, every: int) -> bool:
    """Whether to stop before ``step``. Alone: as soon as asked. Over several ranks, every rank
    stops at the same step (the collectives of a checkpoint must pair up): asked on any rank,
    agreed in one all-reduce every ``every`` steps, so a GPU step keeps its one sync per log
    interval."""
    _, world = current()
    if world == 1:
        return should_stop()
    if step % every:
        return False
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(should_stop())], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


class _Hidden(nn.Module):
    """The model's tokens-to-hidden-states pass as a module's forward: DDP prepares its gradient
    reduction in ``forward``, and the learner's step calls ``hidden`` (the fused loss applies the
    head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.hidden(x)


@dataclass
class Parallel:
    """What the training step needs from the data-parallel wrap: the forward through it, a
    context for the micro-batches that only accumulate (no gradient communication), and the
    step's one all-reduce. ``sharded``: FSDP, whose weights and gradients are DTensors."""

    forward: Callable[[Tensor], Tensor]
    accumulate: Callable[[], contextlib.AbstractContextManager]
    world: int
    sharded: bool = False

    def agree(self, loss: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch's loss and whether every rank's step is finite, in one all-reduce
        (a NaN on any rank is a NaN on all: none applies the update)."""
        both = torch.stack([loss.float(), (~ok).float()])
        dist.all_reduce(both)  # SUM: gloo has no AVG
        return (both[0] / self.world).to(loss.dtype), both[1] == 0


def data_parallel(model: nn.Module, device: torch.device, strategy: str = "ddp",
                  ) -> Parallel | None:
    """Wrap ``model`` for data-parallel training when this process is one of several ranks,
    else None. ``fsdp`` shards ``model`` in place: build its optimizer afterwards, over the
    sharded parameters."""
    _, world = current()
    if world == 1:
        return None
    if strategy == "fsdp":
        return _fully_shard(model, device, world)
    ddp = nn.parallel.DistributedDataParallel(
        _Hidden(model), device_ids=[device.index or 0] if device.type == "cuda" else None)
    return Parallel(ddp, ddp.no_sync, world)


def _fully_shard(model: nn.Module, device: torch.device, world: int) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:  # type: ignore[attr-defined]
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm and head
    register_fsdp_forward_method(model, "hidden")

    @contextlib.contextmanager
    def accumulate() -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    return Parallel(model.hidden, accumulate, world, sharded=True)  # type: ignore[arg-type]


# -- sharded tensors (FSDP) ---------------------------------------------------------------------


def whole(t: Tensor) -> Tensor:
    """``t`` as one ordinary tensor: a DTensor's full value (a collective), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def sum_over_shards(values: dict[str, Tensor], sharded: bool) -> dict[str, Tensor]:
    """Per-shard partial sums (of squares, say) summed over the ranks in one all-reduce when
    ``sharded``; else as they are."""
    if not sharded or not values:
        return values
    stacked = torch.stack(list(values.values()))
    dist.all_reduce(stacked)
    return dict(zip(values, stacked.unbind(), strict=True))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sharded model's and optimizer's whole state, gathered on rank 0's CPU (the other ranks
    get empty dicts). Every rank must call it: it is a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    """Load a whole state (every rank holds it: each read the checkpoint) into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """A whole tensor laid out as the DTensor ``like`` (its mesh and placements), else as is."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)


def last_marked(items: Iterator) -> Iterator[tuple[object, bool]]:
    """Each item with whether it is the last (a one-item look-ahead over a lazy iterator)."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


class NullSink(RunSink):
    """A rank other than 0: its writes go nowhere (rank 0's are the run's)."""

    def deliver(self, batch: Batch) -> None:
        return None
