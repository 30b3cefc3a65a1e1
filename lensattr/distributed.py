"""Data-parallel cache builds under ``torchrun`` or ``accelerate launch``.

Every process of a launched job runs the same :func:`~lensattr.build_cache` call (or the same
``lensattr cache`` command). The training set is cut into fixed chunks of ``shard_size`` examples
in file order and chunk ``i`` belongs to rank ``i % world_size``: the slices are disjoint and
deterministic, each rank writes its own shards, and after a :func:`barrier` rank 0 writes the
merged manifest. Because a shard only depends on its own chunk, the merged cache is bitwise
identical to a single-process build when the batches are the same (same ``batch_size`` and
``shard_size``, same device and kernels).

The launcher's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) are all this module reads. :func:`init_process_group` starts a ``gloo`` (CPU) or
``nccl`` (CUDA) process group from them; ``LENSATTR_DIST_TIMEOUT`` (seconds, default 6 hours) is
how long a rank waits for the slowest one at the barrier.

Examples:
    >>> world_from_env()  # outside a launcher: a single process
    (0, 1)
    >>> barrier()  # nothing to wait for
    False
"""

import datetime
import logging
import os

import torch

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 6 * 3600


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env() -> tuple[int, int]:
    """``(rank, world_size)`` from ``RANK`` / ``WORLD_SIZE`` (``(0, 1)`` when unset).

    Raises:
        ValueError: the values are not integers or the rank is outside ``[0, world_size)``.
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    return rank, world


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; default 0)."""
    return _env_int("LOCAL_RANK", 0)


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is running in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, else from the environment."""
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return world_from_env()


def default_device() -> str | None:
    """``"cuda:LOCAL_RANK"`` in a multi-process job on a CUDA machine, else ``None`` (the default).

    Each rank of a node must drive its own GPU; a single process keeps lensattr's default.
    """
    if world_from_env()[1] > 1 and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return None


def init_process_group(backend: str | None = None) -> tuple[int, int]:
    """Start a process group from the launcher's environment when ``WORLD_SIZE > 1``.

    Does nothing in a single process or when a group is already running (e.g. one started by
    ``accelerate``).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        ``(rank, world_size)``.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but the rendezvous variables are missing (not launched
            with ``torchrun`` / ``accelerate launch``), or ``torch.distributed`` is unavailable.
    """
    import torch.distributed as dist

    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, size = world_from_env()
    if size == 1:
        return rank, size
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} but {', '.join(missing)} is not set: launch with `torchrun` or "
            "`accelerate launch` (or pass rank= and world_size= to build_cache without a launcher)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=_env_int("LENSATTR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("process group %s: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def barrier() -> bool:
    """Wait until every rank reaches this point.

    Uses the running process group, starting one from the environment when ``WORLD_SIZE > 1``.

    Returns:
        ``True`` if the ranks were synchronised, ``False`` when there is no process group to
        synchronise with (a single process, or ranks started by hand without a launcher).
    """
    import torch.distributed as dist

    if not is_initialized():
        if world_from_env()[1] == 1 or not os.environ.get("MASTER_ADDR"):
            return False
        init_process_group()
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    return True


def destroy_process_group() -> None:
    """Shut down the process group, if one is running (call once at the end of a job)."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
