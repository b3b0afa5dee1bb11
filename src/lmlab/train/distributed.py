"""One run over several devices: data-parallel ranks launched by torchrun
(``train.distributed.nproc``), applied around the learner the way torchtitan applies
parallelism, never inside the model or the loop.

Every rank builds the same learner from the same seed and trains its share of every step's global
batch (``train.batch_size``, the controlled quantity): rank r takes sequences ``[r*B/N,
(r+1)*B/N)`` of the step, in the order a single process would read them, so the N ranks together
see exactly the single process's batch. :class:`~torch.nn.parallel.DistributedDataParallel`
averages the gradients (once per step: the micro-batches before the last accumulate under
``no_sync``), so the update is the single process's up to float summation order. Before the
update one all-reduce carries each rank's loss and finiteness: the logged loss is the global
batch's, and a non-finite value on any rank stops every rank at that step, with one event.

Only rank 0 records (the other ranks write through a :class:`NullSink`) and writes checkpoints;
every rank resumes from rank 0's checkpoint, so a run whose rank was killed resumes as a whole.
Evaluation and diagnostics run on every rank over the same data (no collectives in them), so no
rank waits on another between steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
    """What the training step needs from the data-parallel wrap: the forward through DDP, its
    ``no_sync`` for all but the last micro-batch, and the step's one all-reduce."""

    ddp: nn.parallel.DistributedDataParallel
    world: int

    def forward(self, x: Tensor) -> Tensor:
        return self.ddp(x)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    def agree(self, loss: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch's loss and whether every rank's step is finite, in one all-reduce
        (a NaN on any rank is a NaN on all: none applies the update)."""
        both = torch.stack([loss.float(), (~ok).float()])
        dist.all_reduce(both)  # SUM: gloo has no AVG
        return (both[0] / self.world).to(loss.dtype), both[1] == 0


def data_parallel(model: nn.Module, device: torch.device) -> Parallel | None:
    """The DDP wrap of ``model`` when this process is one of several ranks, else None."""
    _, world = current()
    if world == 1:
        return None
    ddp = nn.parallel.DistributedDataParallel(
        _Hidden(model), device_ids=[device.index or 0] if device.type == "cuda" else None)
    return Parallel(ddp, world)


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
