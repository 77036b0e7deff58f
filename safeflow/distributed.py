"""Several processes, one result: the process group, work assignment, model loading and a one-machine launcher.

safeflow runs on ``torch.distributed`` as set up by Hugging Face accelerate: under
``accelerate launch`` (or ``torchrun``) every process reads its rank from the environment and
:func:`init` joins the group (gloo on CPU, nccl on GPU); :func:`join` does so for a command whose
processes exchange rows through a cache directory. :func:`launch` is the one-machine shortcut
behind ``--processes N``: it spawns N processes with that environment and waits for them
(:func:`launch_with_cache` with the checks of the command line). :func:`load_model_per_node`
loads a model on every rank, once per node first, so it is fetched and converted once.

Work is dealt out in whole batches (:func:`assign`), so every row is computed in exactly the
batch a single process would have used, with the same padding: the result equals a
single-process run on the same device type up to kernels whose rounding depends on the thread
count (none on the CPU measured in ``docs/scale.rst``: bit-identical there).
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch
from torch import distributed as dist

from . import models as _models  # a module reference: load_model is looked up at call time
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the process group (``size == 1``: no group, everything local)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def device(self) -> torch.device:
        """This rank's device: ``cuda:<local rank>`` unless :func:`use_cpu`, else the CPU."""
        if not use_cpu():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def max_memory(self) -> dict[int | str, int] | None:
        """For ``device_map="auto"``: this rank's share of the node's GPUs (GPU index → bytes),
        the GPUs split evenly between the ranks of the node; None without CUDA."""
        if use_cpu():
            return None
        gpus = gpu_share(self.local_rank, self.local_size, torch.cuda.device_count())
        return {g: torch.cuda.get_device_properties(g).total_memory for g in gpus}


def current() -> World:
    """The process group this process belongs to (a single-process :class:`World` if none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def use_cpu() -> bool:
    """True without CUDA, or when ``ACCELERATE_USE_CPU`` is set (``accelerate launch --cpu``,
    ``--cpu`` of the CLI, ``launch(..., cpu=True)``): ranks then run on the CPU with gloo."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def init() -> World:
    """Join the process group described by the environment (``accelerate launch``, ``torchrun``,
    :func:`launch`): gloo on CPU, nccl on GPU (one GPU per process), through accelerate's
    ``PartialState``. Without such an environment (``WORLD_SIZE`` unset or 1) nothing is initialised."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        from accelerate import PartialState  # local: accelerate is heavy and needed only with several processes

        cpu = use_cpu()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if not cpu and local > torch.cuda.device_count():
            raise ConfigError(f"{local} processes on this machine but {torch.cuda.device_count()} GPU(s); nccl needs "
                              "one GPU per process: start at most that many, or run on the CPU (--cpu)")
        PartialState(cpu=cpu)
    return current()


def join(cpu: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> World:
    """This process's :class:`World`: the group it was launched into (``accelerate launch``,
    ``torchrun``, :func:`launch`) joined by :func:`init`, else a single process. ``cpu``: the ranks
    of such a group run on the CPU with gloo (sets ``ACCELERATE_USE_CPU``). Several processes
    exchange rows through a cache directory on a filesystem every process sees: a group of more
    than one process without ``cache_dir`` raises :class:`ConfigError`."""
    if cpu and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a rank under torchrun / accelerate launch
        os.environ["ACCELERATE_USE_CPU"] = "true"
    world = init()
    if world.size > 1 and not cache_dir:
        raise ConfigError(f"{world.size} processes exchange rows through a cache directory; pass --cache DIR "
                          "(on a filesystem every process sees)")
    return world


def load_model_per_node(world: World, name_or_path: str, *, dtype: torch.dtype = torch.float32,
                        device_map: str | dict[str, Any] | None = None, cpu: bool = False,
                        trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of :func:`~safeflow.models.load_model` on every rank of ``world``:
    on this rank's device (:meth:`World.device`; ``cpu``: the CPU), or split by ``device_map``
    over this rank's share of the node's GPUs (:meth:`World.max_memory`, with several ranks).
    The first rank of each node loads first while the others wait, so the default model is
    fetched and converted once per node; only the main rank shows progress."""
    kwargs: dict[str, Any]
    if device_map:
        kwargs = {"device_map": device_map, "max_memory": world.max_memory() if world.size > 1 else None}
    else:
        kwargs = {"device": "cpu" if cpu else world.device()}
    kwargs["trust_remote_code"] = trust_remote_code
    loaded = (_models.load_model(name_or_path, dtype=dtype, progress=world.is_main, **kwargs)
              if world.local_rank == 0 else None)
    world.barrier()
    return loaded or _models.load_model(name_or_path, dtype=dtype, progress=False, **kwargs)


def gpu_share(local_rank: int, local_size: int, num_gpus: int) -> list[int]:
    """The GPUs of local rank ``local_rank`` when ``num_gpus`` are split evenly between
    ``local_size`` ranks (several ranks share one GPU when there are fewer GPUs than ranks)."""
    per_rank = num_gpus // local_size
    if per_rank == 0:
        return [local_rank % num_gpus]
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def assign(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each job: longest job first to the least loaded rank (ties: lowest rank).

    Deterministic, so every rank computes the same assignment from the same costs.
    """
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(size)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        owners[j] = rank
        heapq.heappush(loads, (load + costs[j], rank))
    return owners


def map_batches(world: World, fn: Callable[[list[Any]], list[Any]], items: Sequence[Any], batch_size: int) -> list[Any]:
    """``fn`` over consecutive batches of ``items``, the batches dealt to ranks; every rank returns
    all results in order (exchanged as picklable objects — for small results such as token ids)."""
    batches = [list(items[s : s + batch_size]) for s in range(0, len(items), batch_size)]
    owners = assign([len(b) for b in batches], world.size)
    results: dict[int, list[Any]] = {}
    for part in world.all_gather({j: fn(b) for j, (b, o) in enumerate(zip(batches, owners)) if o == world.rank}):
        results.update(part)
    return [x for j in range(len(batches)) for x in results[j]]


def launch(fn: Callable[..., int | None], nprocs: int, *args: Any, cpu: bool = False) -> int:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes forming one process group on this machine.

    Each process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``
    and calls :func:`init` first (``cpu=True``: on the CPU with gloo even where there are
    GPUs). If one process fails, the others are stopped (what they have
    written stays). Returns 0, or the exit code of the first process that failed.
    ``fn`` must be importable (a module-level function).
    """
    if nprocs < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {nprocs}")
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(fn, rank, nprocs, port, cpu, args), name=f"safeflow-rank{rank}")
             for rank in range(nprocs)]
    for p in procs:
        p.start()
    try:
        alive = list(procs)
        while alive:
            for sentinel in wait([p.sentinel for p in alive]):
                p = next(p for p in alive if p.sentinel == sentinel)
                p.join()
                alive.remove(p)
                if p.exitcode:
                    log.error("%s exited with code %s; stopping the other processes (finished chunks are kept: "
                              "rerun to complete)", p.name, p.exitcode)
                    return p.exitcode
        return 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def launch_with_cache(fn: Callable[..., int | None], nprocs: int, *args: Any, cpu: bool = False,
                      cache_dir: str | os.PathLike[str] | None = None) -> int:
    """:func:`launch` as the one-machine shortcut of the command line (``--processes N``): refused
    with :class:`ConfigError` inside a group that a launcher started (``WORLD_SIZE`` > 1) and
    without ``cache_dir``, the directory through which the processes exchange rows."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("--processes is the one-machine shortcut; under accelerate launch / torchrun leave it at 1")
    if not cache_dir:
        raise ConfigError(f"--processes {nprocs} exchanges rows through a cache directory; pass --cache DIR")
    return launch(fn, nprocs, *args, cpu=cpu)


def _worker(fn: Callable[..., int | None], rank: int, nprocs: int, port: int, cpu: bool, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    init()
    try:
        code = fn(*args)
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank that tears down while another still talks can abort (gloo)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code or 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
