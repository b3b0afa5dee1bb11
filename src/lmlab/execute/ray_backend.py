"""``lmlab run --executor ray [--address ADDR]``: each unit (a run, or a pack) is a Ray core task.

A task asks for the resources of one unit (``--cpus-per-run``, ``--gpus-per-run``; a GPU when
``controlled.hardware`` names one) and, when ``controlled.hardware`` is a GPU type ("A100",
"H100"), Ray's ``accelerator_type`` for it, so a run never lands on another GPU type. A worker
that dies (its node lost, the process killed) is retried by Ray (``max_retries``) and resumes
from its checkpoint under the storage; an exception raised by the run itself is not retried:
it would only happen again. Without ``--address`` Ray starts a cluster on this machine;
``--address auto`` joins the one ``ray start`` runs here, ``ray://HOST:10001`` a remote one.
The workers import lmlab: install it on every node (same version), or hand Ray a runtime
environment that does.
"""

from __future__ import annotations

from typing import Any

from lmlab.errors import UserError
from lmlab.execute.pack import Pack
from lmlab.execute.remote import UnitJob, for_ranks, train_unit, unit_outcome

GENERIC = ("any", "", "cpu", "cuda")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("the Ray executor needs Ray: pip install 'lmlab[ray]'",
                        field="--executor") from None
    return ray


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None, *, cpus: float = 1.0, gpus: float | None = None,
                 hardware: str = "any", max_retries: int = 3) -> None:
        ray = self.ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, ValueError) as e:
                raise UserError(f"cannot reach a Ray cluster at {address}: {e}",
                                field="--address") from None
        self.options = placement(cpus, gpus, hardware) | {
            "max_retries": max_retries, "retry_exceptions": False}
        self.remote = ray.remote(train_unit)

    def submit(self, unit: Pack, job: UnitJob) -> Any:
        options = dict(self.options)
        options["num_cpus"], options["num_gpus"] = for_ranks(unit, options["num_cpus"],
                                                             options["num_gpus"])
        return self.remote.options(name=f"lmlab {unit.run_ids[0]}", **options).remote(job)

    def adopt(self, record: dict[str, Any]) -> Any | None:
        return None  # Ray ends the tasks of a driver that died: they are submitted again

    def done(self, handle: Any) -> bool:
        ready, _ = self.ray.wait([handle], timeout=0)
        return bool(ready)

    def error(self, handle: Any) -> tuple[str | None, bool]:
        try:
            return unit_outcome(self.ray.get(handle), None)
        except self.ray.exceptions.RayTaskError as e:  # a crash (a bug): its traceback
            return unit_outcome(None, e.cause if e.cause is not None else e)
        except self.ray.exceptions.RayError as e:  # retries used up, a lost node, cancelled
            return unit_outcome(None, e)

    def record(self, handle: Any) -> dict[str, Any]:
        return {"executor": self.name, "task": handle.hex()}


def placement(cpus: float, gpus: float | None, hardware: str) -> dict[str, Any]:
    """The Ray task options that place one unit: its CPUs, its GPUs (one by default when the
    hardware is a GPU), and the accelerator type a named GPU asks for."""
    wants_gpu = hardware not in ("any", "", "cpu")
    out: dict[str, Any] = {"num_cpus": cpus,
                           "num_gpus": gpus if gpus is not None else (1 if wants_gpu else 0)}
    if hardware not in GENERIC:
        out["accelerator_type"] = hardware
    return out
