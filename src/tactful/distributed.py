"""Multi-process training: which process is the main one, and how the others wait for it.

`accelerate launch -m tactful train RECIPE` (or `torchrun`) starts one process per device,
each running the whole recipe. The Trainer keeps their model replicas in step; everything
around it must be written so that the processes agree:

- work with a side effect or one right answer (generating rejected answers, judging, fitting
  a probe, training SAEs, scoring impact) runs on the main process only, and its result is
  handed to the others (`run_on_main`);
- files are written by the main process only (`RunDir` and `save_model_atomic` skip the
  write elsewhere), and the others wait where they read them back (`barrier`);
- metrics are reduced across processes at logging time with a fixed number of collectives
  whatever each process logged (`mean_across_processes`), so no process can wait forever in
  a gather that another one skipped.

Everything here is a no-op in a single process, and none of it needs accelerate's state
objects: transformers' TrainingArguments resets accelerate's PartialState when it resolves its
device, so these helpers ask torch.distributed (or the launcher's environment) directly.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tactful.errors import UserError

T = TypeVar("T")

# How long the other processes wait for the main one in `run_on_main`. It is not a collective
# timeout: the main process may generate, judge or train SAEs for hours before it answers.
MAIN_WAIT_ENV = "TACTFUL_MAIN_WAIT_S"
DEFAULT_MAIN_WAIT_S = 24 * 3600
# Timeout of the process group tactful creates when it needs one before the Trainer does
# (the Trainer's own default, ddp_timeout, is the same 30 minutes).
PG_TIMEOUT_ENV = "TACTFUL_DDP_TIMEOUT_S"
DEFAULT_PG_TIMEOUT_S = 1800

_calls = 0  # main-process hand-overs so far; equal on every process, so it names the store keys


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in this run: the process group's size, else the launcher's WORLD_SIZE, else 1."""
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on the process that writes files (global rank 0); always True in a single process."""
    return rank() == 0


def setup() -> None:
    """Start the process group early when launched with several processes.

    Idempotent, and a no-op in a single process. On a machine without CUDA the processes
    talk over gloo (accelerate only picks it when told the run is on CPU, so we tell it);
    otherwise accelerate chooses the backend (NCCL, or DeepSpeed's when launched with it).
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or _dist() is not None:
        return
    cpu = _no_accelerator()
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    from accelerate import PartialState

    timeout = timedelta(seconds=float(os.environ.get(PG_TIMEOUT_ENV, DEFAULT_PG_TIMEOUT_S)))
    PartialState(cpu=cpu, timeout=timeout)


def _no_accelerator() -> bool:
    """No device accelerate would put a process on (CUDA, XPU, NPU, MLU, MUSA): CPU processes."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        from accelerate.utils import is_mlu_available, is_musa_available, is_npu_available, is_xpu_available
    except ImportError:
        return True
    return not any(available() for available in (is_xpu_available, is_npu_available, is_mlu_available,
                                                 is_musa_available))


def barrier() -> None:
    """Wait until every process gets here (a short wait: for long ones use `run_on_main`)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device() -> Any:
    import torch

    dist = _dist()
    backend = str(dist.get_backend()) if dist is not None else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every process (pickled; keep it to data, tensors on the CPU)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def _store() -> Any:
    from torch.distributed import distributed_c10d

    getter = getattr(distributed_c10d, "_get_default_store", None)
    return getter() if getter is not None else None


def _next_key() -> str:
    global _calls
    _calls += 1
    return f"tactful/main/{_calls}"


def _publish_status(key: str, status: dict[str, Any]) -> None:
    store = _store()
    if store is not None:
        store.set(key, json.dumps(status))
    else:
        broadcast_object(status)


def _await_status(key: str, what: str) -> None:
    """On a non-main process: wait (on the store, not in a collective) for the main process."""
    store = _store()
    if store is not None:
        store.wait([key], timedelta(seconds=float(os.environ.get(MAIN_WAIT_ENV, DEFAULT_MAIN_WAIT_S))))
        status = json.loads(store.get(key))
    else:  # no store to wait on (an unusual process group): a collective it is
        status = broadcast_object(None)
    if not status["ok"]:
        raise UserError(f"the main process failed while {what}: {status['error']}")


def run_on_main(fn: Callable[[], T], *, what: str, share: bool = True) -> T | None:
    """Run `fn` on the main process only; every process gets its result.

    The others wait on the launcher's key-value store rather than in a collective, so the main
    process may take hours (generation, judging, SAE training) without tripping a NCCL or gloo
    timeout. With `share=False` the others get None (they read what the main process wrote).
    An exception on the main process is raised there as usual and, as a UserError naming
    `what`, on the others, so no process is left waiting.
    """
    setup()
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return fn()
    key = _next_key()
    result: Any = None
    if is_main_process():
        try:
            result = fn()
        except BaseException as e:
            _publish_status(key, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise
        _publish_status(key, {"ok": True})
    else:
        _await_status(key, what)
    if share:
        return broadcast_object(to_cpu(result))
    barrier()  # what the main process wrote is there before anyone reads it
    return result if is_main_process() else None


def share_from_main(obj: T, *, what: str) -> T:
    """The main process's `obj` on every process, however long the main process takes to get here.

    For code already structured as "main computes, others skip" (`if is_main_process(): ...`);
    the others pass anything (None) and wait on the store as in `run_on_main`."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    key = _next_key()
    if is_main_process():
        _publish_status(key, {"ok": True})
    else:
        _await_status(key, what)
    return broadcast_object(to_cpu(obj) if is_main_process() else None)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (one collective)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_processes(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean of each key's values over every process: sum(all values) / count(all values).

    Processes may hold different keys (a batch without pairs of some kind logs nothing for it):
    the key sets are gathered first, then one all-reduce covers their union in a fixed order, so
    every process runs the same two collectives whatever it logged.
    """
    local = {k: (float(sum(v)), float(len(v))) for k, v in values.items() if len(v)}
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return {k: s / n for k, (s, n) in local.items()}
    import torch

    keys = sorted(set().union(*all_gather_objects(sorted(local))))
    if not keys:
        return {}
    t = torch.tensor([local.get(k, (0.0, 0.0)) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: s / n for k, (s, n) in zip(keys, t.tolist()) if n > 0}


# ---------------------------------------------------------------- engines


def sharding_engine() -> str | None:
    """'FSDP' or 'DeepSpeed ZeRO-3' when this launch shards parameters across processes, else None.

    Read from what `accelerate launch` puts in the environment, so it is known before any
    Trainer exists (a method that cannot work on sharded parameters stops before loading data).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and deepspeed_zero_stage() == 3:
        return "DeepSpeed ZeRO-3"
    return None


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of an `accelerate launch` with DeepSpeed (from its config), else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none" and os.path.isfile(path):
        try:
            with open(path) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage")
            if stage is not None:
                return int(stage)
        except (OSError, ValueError):
            pass
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage not in (None, "", "None") else None


def ram_efficient_loading() -> bool:
    """True when this launch is FSDP with `fsdp_cpu_ram_efficient_loading: true`: only the main
    process needs the model's weights before sharding; FSDP broadcasts them to the others.

    Read from what `accelerate launch` puts in the environment (the same variables transformers and
    accelerate read), so every process agrees before any of them loads anything."""
    env = os.environ
    return (env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true" and is_distributed())


def zero3_init() -> bool:
    """True when this launch is DeepSpeed ZeRO-3 with `zero3_init_flag: true`: a model that goes
    straight into the Trainer can be partitioned while it loads (`deepspeed.zero.Init`)."""
    return (deepspeed_zero_stage() == 3
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "true")


def broadcast_module(module: Any) -> Any:
    """Every process gets the main process's parameters and buffers in `module` (in place).

    For a frozen module the other processes need whole while they hold no weights of their own
    (built on the meta device under RAM-efficient loading): they allocate it and receive every
    tensor from the main process, one at a time. A no-op in a single process."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return module
    import torch

    if not is_main_process():
        module.to_empty(device="cpu")  # keeps tied parameters tied (one Parameter, new storage)
    device = _comm_device()
    seen: set[int] = set()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:  # the same order on every process
            if id(t) in seen:
                continue
            seen.add(id(t))
            buf = t.data.to(device)
            dist.broadcast(buf, src=0)
            if not is_main_process():
                t.data.copy_(buf)
    return module


def engine_name() -> str:
    """A short name for the launch: single process, DDP, FSDP or DeepSpeed ZeRO-n."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    stage = deepspeed_zero_stage()
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    return "DDP" if is_distributed() else "single process"


def require_unsharded(method: str, why: str) -> None:
    """Stop with a clear message when `method` cannot run on this launch's sharded parameters."""
    engine = sharding_engine()
    if engine is not None:
        raise UserError(f"{method} does not support {engine}: {why}; launch it with DDP "
                        "(configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 instead (docs/scale-out.md)")


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it moved to the CPU (before handing it to other processes)."""
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
