"""Run a batch on Dask distributed: scans are tasks, rows stream back with ``as_completed``.

Imported only for ``--scheduler ADDRESS`` or ``--cluster local:N`` (``pip install .[cluster]``). The
client builds or loads the engine once; each worker process loads it from the cache key and artifact
folder (:class:`engine_tools.batch.EngineRef`, on storage the client and workers share), keeps it for
every later task, and writes its scans' outputs into the shared output folder. With ``local:N`` the N
worker processes get disjoint sets of this machine's cores, so N multi-threaded engines never compete
for the same cores. SLURM/PBS clusters: start them with ``dask-jobqueue`` and pass the scheduler
address (see the README).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine_tools.batch import BatchScan, EngineRef, load_engine, segment_scan
from engine_tools.progress import Progress

_LOADED: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()
#: Dask event topic carrying each scan's stages from the workers to the client's progress stream.
STAGE_TOPIC = "medquant-scan-stage"


class _WorkerStages(Progress):
    """A scan's stages on a worker, sent to the client as Dask events (``Worker.log_event``)."""

    def __init__(self, worker: Any, scan: str) -> None:
        super().__init__()
        self.worker, self.scan = worker, scan

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] in ("progress", "log"):
            self.worker.log_event(STAGE_TOPIC, {**event, "scan": self.scan, "worker": self.worker.address})


def parse_local(spec: str) -> int:
    """``local:N`` → N (number of worker processes on this machine)."""
    kind, _, count = spec.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--cluster {spec!r}: expected local:N with N >= 1 worker processes")
    return int(count)


def _dask() -> Any:
    try:
        import dask.distributed as distributed
    except ImportError as exc:
        raise ImportError(
            f"Dask is not installed ({exc}); pip install 'medquantslicer-engine-tools[cluster]'"
        ) from exc
    return distributed


@contextmanager
def dask_client(scheduler: str | None = None, local: str | None = None) -> Iterator[tuple[Any, int | None]]:
    """``(client, cores per worker)`` for a running scheduler or a new ``LocalCluster`` of N processes
    with one thread each (closed on exit); cores per worker is ``None`` for an external cluster."""
    distributed = _dask()
    if scheduler:
        with distributed.Client(scheduler) as client:
            yield client, None
        return
    workers = parse_local(local or "local:1")
    cores = max(1, len(os.sched_getaffinity(0)) // workers)
    with (
        distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client, cores


def _pin_cores(worker_name: Any, cores_per_worker: int) -> None:
    """Give local worker ``i`` its own ``cores_per_worker`` cores (engines size their threads to them)."""
    available = sorted(os.sched_getaffinity(0))
    index = int(worker_name) if str(worker_name).isdigit() else 0
    start = (index * cores_per_worker) % len(available)
    os.sched_setaffinity(0, available[start : start + cores_per_worker] or available)
    try:
        import torch

        torch.set_num_threads(cores_per_worker)
    except ImportError:
        pass


def segment_task(
    ref: EngineRef,
    scan: BatchScan,
    row: dict[str, Any],
    reference: Path | None,
    cores_per_worker: int | None,
) -> dict[str, Any]:
    """One scan on a Dask worker (the engine is loaded on the first task and kept)."""
    worker = _dask().get_worker()
    with _LOCK:
        if ref.key not in _LOADED:
            if cores_per_worker:
                _pin_cores(worker.name, cores_per_worker)
            _LOADED[ref.key] = load_engine(ref)
        engine, card = _LOADED[ref.key]
    stages = _WorkerStages(worker, scan.scan)
    return segment_scan(engine, card, scan, row, stages, reference, worker=str(worker.address))


def segment_on_dask(
    client: Any,
    ref: EngineRef,
    todo: list[tuple[BatchScan, dict[str, Any]]],
    references: dict[str, Path | None],
    cores_per_worker: int | None = None,
    progress: Progress | None = None,
) -> Iterator[dict[str, Any]]:
    """Submit every scan as a task and yield manifest rows as they complete (any order); the workers'
    per-scan stages are relayed to ``progress`` meanwhile (from this thread only)."""
    distributed = _dask()
    stages: queue.SimpleQueue = queue.SimpleQueue()
    client.subscribe_topic(STAGE_TOPIC, lambda event: stages.put(event[1]))
    futures = {}
    for index, (scan, row) in enumerate(todo):
        future = client.submit(
            segment_task,
            ref,
            scan,
            row,
            references.get(scan.scan),
            cores_per_worker,
            key=f"medquant-segment-{index}-{row['input_sha256'][:12]}-{ref.key[:8]}",
            pure=False,
        )
        futures[future] = row
    finished = distributed.as_completed(futures)
    try:
        while not finished.is_empty():
            ready = finished.next_batch(block=False)
            _relay(stages, progress)
            if not ready:
                threading.Event().wait(0.2)
            for future in ready:
                yield _row_of(future, futures[future])
        _relay(stages, progress)
    finally:
        client.cancel(list(futures))
        client.unsubscribe_topic(STAGE_TOPIC)


def _relay(stages: queue.SimpleQueue, progress: Progress | None) -> None:
    while not stages.empty():
        event = stages.get()
        if progress is None:
            continue
        prefix = f"[{event['scan']} on {event['worker']}] "
        if event["event"] == "progress":
            progress.update(event["stage"], None, prefix + event["message"])
        else:
            progress.log(prefix + event["message"], event["level"])


def _row_of(future: Any, row: dict[str, Any]) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:  # the worker died or could not load the engine
        return {
            **row,
            "status": "failed",
            "error": f"{type(exc).__name__} on a Dask worker: {exc}",
            "output": "",
            "label_table": "",
        }
