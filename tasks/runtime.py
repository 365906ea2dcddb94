"""What every flow starts with: the process runtime, the run's configuration, and the task runner its
fan-out uses, all taken from the same config layers as the CLI (deployments run flows without the CLI)."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.settings import get_current_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from pricelevel.config import Config, data_overrides, load_project_config
from pricelevel.core.config import ConfigError, FlowConfig
from pricelevel.core.runtime import bootstrap
from pricelevel.ml.config import ModelConfig

#: ``model.accelerator`` values that ask for CUDA: their training tasks go to workers started with
#: ``--resources GPU=1`` (``auto`` does not: it must also run where there is no GPU).
CUDA_ACCELERATORS = frozenset({"cuda", "gpu"})


@task(name="load-config", cache_policy=NO_CACHE)
def load_run_config(config_file: str | None, overrides: list[str] | None, **data_arguments: object) -> Config:
    """Base YAML, then ``config_file``, then ``PRICELEVEL_*`` env, then overrides and the flow's own arguments;
    the process is bootstrapped first (log redaction, quiet environment) and its threads set from the config."""
    bootstrap()
    config = load_project_config(config_file, [*(overrides or []), *data_overrides(**data_arguments)])
    bootstrap(threads=config.model.num_threads)
    return config


def fan_out(flow: FlowConfig) -> TaskRunner:
    """The task runner for a flow's per-dataset / per-symbol tasks (``flow.task_runner``).

    ``thread``: ``flow.max_workers`` threads of this process. ``process`` and ``dask``: worker processes, which
    report their task runs to this flow's Prefect API (also a temporary one: its address is handed to them,
    else each would start its own) and are bootstrapped like the flow. Tasks exchange configs, paths and keys,
    never frames, so the same wiring runs on any worker that sees the data folder.
    """
    if flow.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=flow.max_workers)
    env = worker_environment()
    if flow.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=flow.max_workers, initializer=start_worker, initargs=(env,))
    from prefect_dask import DaskTaskRunner

    if flow.dask_address:
        if get_current_settings().api.url is None:
            raise ConfigError("flow.dask_address: Dask workers report their task runs to a Prefect server, and this "
                              "flow has only a temporary one; set PREFECT_API_URL (`make cluster-up` writes it)")
        return DaskTaskRunner(address=flow.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": min(flow.max_workers, os.cpu_count() or 1), "threads_per_worker": 1,
                        "processes": True, "dashboard_address": None, "env": env, "preload": [__name__]},
    )


def wait_all(futures: Sequence[PrefectFuture], poll_s: float = 0.2) -> list[Any]:
    """Every future's result, in order, raising the first failure as soon as it is known (not after the futures
    before it). Call it inside the runner's ``with``: a Dask runner's client closes on exit, and a result asked
    for after that fails with ``IOLoop is closed``."""
    pending = list(futures)
    while pending:
        done = [future for future in pending if _done(future)]
        for future in done:
            future.result()
        pending = [future for future in pending if future not in done]
        if pending:
            time.sleep(poll_s)  # interruptible: a signal's exception reaches the caller here
    return [future.result() for future in futures]


def cancel_all(futures: Sequence[PrefectFuture], grace_s: float, poll_s: float = 0.1) -> bool:
    """Give the futures ``grace_s`` to end (the caller has asked them to stop), then cancel what is left.
    Returns whether all had ended. A Dask task already running is not interrupted by a cancel: only a task
    that stops itself (see ``tasks.tuning``) is really gone."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(Exception):
        while not all(_done(future) for future in futures) and time.monotonic() < deadline:
            time.sleep(poll_s)
    ended = all(_done(future) for future in futures)
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is not None and not _done(future):
            with contextlib.suppress(Exception):
                wrapped.cancel()
    return ended


def _done(future: PrefectFuture) -> bool:
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is not None and hasattr(wrapped, "done"):
        return bool(wrapped.done())
    return future.state.is_final()


def current_flow_run_id() -> str | None:
    """The id of the flow run this code runs in (None outside one)."""
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context is not None and context.flow_run is not None else None


def flow_run_ended(flow_run_id: str) -> str | None:
    """The final state of a flow run (``CRASHED``, ``CANCELLED``, ...) from the Prefect API; None while it runs, and
    when the API does not know it or cannot be reached (then nothing can be concluded)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 (an unknown id, another server, a network error: all mean "cannot tell")
        return None
    return state.type.name if state is not None and state.is_final() else None


def worker_environment() -> dict[str, str]:
    """What a worker process needs to report to this flow's Prefect API: its URL (and key, when set)."""
    settings = get_current_settings()
    url = str(settings.api.url or "")
    context = FlowRunContext.get()
    if not url and context is not None and context.client is not None:
        url = str(context.client.api_url).rstrip("/")  # the flow's temporary server
    env = {"PREFECT_API_URL": url} if url else {}
    if settings.api.key is not None:
        env["PREFECT_API_KEY"] = settings.api.key.get_secret_value()
    return env


def start_worker(env: dict[str, str]) -> None:
    """Run once in each worker process: this flow's API, then the project runtime (redaction, numba cache)."""
    os.environ.update(env)
    bootstrap()


#: The modules whose tasks the flows submit to Dask. The scheduler unpickles every graph it receives in its event
#: loop, importing what the tasks need; done there the first time, that import (torch, Lightning, Prefect: 40 s on
#: a loaded 2-core machine) blocks the scheduler, and a flow's client loses its connection mid-fan-out.
TASK_MODULES = ("tasks.ingest", "tasks.train", "tasks.tuning")


def dask_setup(server: Any) -> Any:
    """Dask's preload hook (``dask worker|scheduler --preload tasks.runtime``): a worker is bootstrapped like a
    flow and interrupts the tasks its flows let go of (:func:`release_watcher`); a scheduler imports
    :data:`TASK_MODULES` now, before any flow connects."""
    bootstrap()
    from distributed import Scheduler, Worker

    if isinstance(server, Scheduler):
        for module in TASK_MODULES:
            importlib.import_module(module)
    if isinstance(server, Worker):
        return server.plugin_add(release_watcher())  # awaited by the preload
    return None


class TaskReleased(RuntimeError):
    """The client that submitted this task has let it go (its flow failed, was stopped or died): nobody will read
    its result, so it stops instead of computing in the background."""


#: Interrupts sent at most to one released task, a second apart (Prefect may retry a task that failed).
RELEASE_INTERRUPTS = 5


def raise_in_thread(thread_id: int, exception: type[BaseException]) -> None:
    """Raise ``exception`` in another thread at its next Python bytecode: the only way to stop Python code that
    does not poll (a running Dask task, a trial inside Lightning). Callers make sure the thread is still in the
    work they mean to stop, under a lock that work takes on its way out."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exception))


def _interrupt_released(worker: Any, key: Any, tries: int = RELEASE_INTERRUPTS, every_s: float = 1.0) -> None:
    """Raise :class:`TaskReleased` in the thread running ``key`` while the worker still holds it as cancelled.

    Dask's own cancel only forgets a running task (a thread cannot be stopped from outside): its flow's stop
    would leave it computing. The exception lands at the thread's next Python bytecode (after a numba call
    returns). The check and the interrupt happen under the worker's ``active_threads_lock``, which the thread
    takes before it leaves the task, so the exception cannot land in a later task."""
    for attempt in range(tries):
        if attempt:
            time.sleep(every_s)
        task = worker.state.tasks.get(key)
        if task is None or task.state != "cancelled":
            return  # finished, forgotten, or wanted again
        with worker.active_threads_lock:
            threads = [ident for ident, running in worker.active_threads.items() if running == key]
            for ident in threads:
                raise_in_thread(ident, TaskReleased)
        if not threads:
            return


def release_watcher() -> Any:
    """A worker plugin that interrupts a task executing when its client let it go (built here: ``distributed`` is
    the optional ``cluster`` extra)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class InterruptReleased(WorkerPlugin):
        """Interrupts a task that was executing when its client let it go (``executing -> cancelled``)."""

        name = "pricelevel-interrupt-released"

        def setup(self, worker: Any) -> None:
            self.worker = worker

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            # ``finish`` is the state asked for ("released"); a running task is then held as "cancelled"
            if start == "executing" and finish in ("released", "cancelled"):
                threading.Thread(target=_interrupt_released, args=(self.worker, key), name="interrupt-released",
                                 daemon=True).start()

    return InterruptReleased()


def routes_to_gpu(flow: FlowConfig, model: ModelConfig) -> bool:
    """Whether the training tasks go to a Dask worker with a ``GPU`` resource."""
    return flow.task_runner == "dask" and model.accelerator in CUDA_ACCELERATORS


@contextlib.contextmanager
def training_resources(flow: FlowConfig, model: ModelConfig) -> Iterator[None]:
    """Tasks submitted inside go to Dask workers with a ``GPU`` resource when the model asks for CUDA.

    A worker started with ``dask worker ... --resources GPU=1`` then receives exactly these, one at a time;
    CPU workers get the rest. Outside Dask, or with ``accelerator: auto|cpu``, nothing changes.
    """
    if not routes_to_gpu(flow, model):
        yield
        return
    require_gpu_worker(flow)
    import dask

    with dask.annotate(resources={"GPU": 1}):
        yield


def require_gpu_worker(flow: FlowConfig, timeout_s: float = 10.0) -> None:
    """Fail in one line, instead of waiting forever, when no Dask worker has a ``GPU`` resource: tasks that ask
    for one wait for such a worker, and neither the temporary local cluster nor ``make cluster-up`` starts one."""
    hint = "start one with `dask worker ADDRESS --resources GPU=1` (README \"Scaling out\"), or use model.accelerator=auto"
    if not flow.dask_address:
        raise ConfigError(f"model.accelerator asks for CUDA on the dask runner, but flow.dask_address is not set and a "
                          f"temporary local cluster has no GPU worker; {hint}")
    from distributed import Client

    with Client(flow.dask_address, timeout=timeout_s) as client:
        workers = client.scheduler_info()["workers"].values()
        if not any(worker.get("resources", {}).get("GPU") for worker in workers):
            raise ConfigError(f"model.accelerator asks for CUDA, but no Dask worker at {flow.dask_address} has a GPU "
                              f"resource; {hint}")
