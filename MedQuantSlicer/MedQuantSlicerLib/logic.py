"""Slicer-free logic of the module: command lines, the MRML side and one orchestration per task.

``MedQuantSlicer.MedQuantSlicerLogic`` (the Slicer class) derives from :class:`MedQuantLogic`; the
tests drive this class directly on a ``slicer-core`` scene. Each task (download, build, segment with an
optional FP32 comparison, compare) is started once here (``start_*``, a :class:`~.tasks.Task`) with the
worker factory and callbacks injected; the panel only binds widgets to those callbacks, and the
blocking helpers (:meth:`MedQuantLogic.segment`, :meth:`MedQuantLogic.compare`) wait on the same task.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import mrml_io, parameters, paths
from MedQuantSlicerLib.events import WorkerOutcome
from MedQuantSlicerLib.process import ThreadWorkerProcess
from MedQuantSlicerLib.results import ResultRow, row_from_segment, rows_from_compare
from MedQuantSlicerLib.tasks import CONTINUE, Task, TaskCallbacks, TaskResult, WorkerFactory

BACKENDS = {"Auto": "auto", "TensorRT": "tensorrt", "OpenVINO": "openvino", "ONNX Runtime": "onnxruntime"}
PRECISIONS = {"INT8": "int8", "BF16": "bf16", "FP16": "fp16", "FP32": "fp32"}


class WorkerFailed(RuntimeError):
    """A task ended without a result; ``outcome`` holds the last worker's log."""

    def __init__(self, outcome: WorkerOutcome | None, message: str = "") -> None:
        super().__init__(f"{outcome.status}: {outcome.message()}" if outcome is not None else message)
        self.outcome = outcome


@dataclass
class EngineOptions:
    """What the Calibration and Engine sections of the panel select."""

    backend: str = "auto"
    precision: str = "int8"
    calibration_folder: str = ""
    windows: int = 32
    method: str = "minmax"
    rebuild: bool = False
    #: never touch the network (``--offline``): weights must be cached or in a weights folder
    offline: bool = False

    def arguments(self, with_precision: bool = True) -> list[str]:
        args = ["--backend", self.backend, *(["--offline"] if self.offline else [])]
        if with_precision:
            args += ["--precision", self.precision]
        if self.calibration_folder:
            args += [
                "--calibration",
                str(Path(self.calibration_folder).resolve()),
                "--windows",
                str(self.windows),
                "--calibration-method",
                self.method,
            ]
        return args


class MedQuantLogic:
    """Command lines for ``engine_tools`` and the MRML import/export around them."""

    def __init__(
        self,
        scene: Any = None,
        python: str | None = None,
        extra_env: dict[str, str] | None = None,
        worker_factory: WorkerFactory | None = None,
    ) -> None:
        self.scene = scene
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.worker_factory: WorkerFactory = worker_factory or ThreadWorkerProcess
        self.rows: list[ResultRow] = []
        self.table_node: Any = None
        self.chart_node: Any = None
        #: per-label volumes (mL, voxels) of the last segmentation, a ``vtkMRMLTableNode``
        self.volumes_table_node: Any = None

    def getParameterNode(self) -> Any:  # noqa: N802 - Slicer's name (ScriptedLoadableModuleLogic)
        """The module's parameter node in the scene (Slicer's class overrides this with its own)."""
        return parameters.parameter_node(self.scene)

    # -- command lines ------------------------------------------------------------------------------
    def command(self, subcommand: str, *args: str) -> list[str]:
        return paths.worker_command(subcommand, *args, python=self.python)

    def models_command(self) -> list[str]:
        return self.command("models")

    def fetch_command(self, model: str) -> list[str]:
        return self.command("fetch", model)

    def build_command(self, model: str, options: EngineOptions) -> list[str]:
        args = [model, *options.arguments()]
        if options.rebuild:
            args.append("--rebuild")
        return self.command("build", *args)

    def segment_command(
        self, model: str, input_path: Path, output_path: Path, options: EngineOptions
    ) -> list[str]:
        return self.command(
            "segment", model, "--input", str(input_path), "--output", str(output_path), *options.arguments()
        )

    def compare_command(
        self,
        model: str,
        input_path: Path,
        output_dir: Path,
        options: EngineOptions,
        reference_path: Path | None = None,
    ) -> list[str]:
        precisions = ["fp32"] if options.precision == "fp32" else ["fp32", options.precision]
        args = [model, "--input", str(input_path), "--output-dir", str(output_dir)]
        args += ["--precisions", ",".join(precisions), *options.arguments(with_precision=False)]
        if reference_path is not None:
            args += ["--reference", str(reference_path)]
        return self.command("compare", *args)

    def environment(self) -> dict[str, str]:
        return paths.worker_environment(extra=self.extra_env)

    def cache_root(self) -> Path:
        env = self.environment()
        cache = paths.light_module("cache")
        return Path(env[cache.CACHE_ENV]).expanduser() if env.get(cache.CACHE_ENV) else cache.cache_root()

    # -- MRML side ------------------------------------------------------------------------------------
    @staticmethod
    def new_workdir() -> Path:
        return Path(tempfile.mkdtemp(prefix="medquant-"))

    def export_input(self, input_node: Any, workdir: Path) -> Path:
        return mrml_io.export_volume(input_node, workdir / "input.nrrd")

    def export_reference(
        self, reference_node: Any, input_node: Any, label_table: list[dict[str, Any]], workdir: Path
    ) -> Path:
        """Write a reference segmentation as a labelmap on the input grid, values by segment name."""
        import numpy as np
        import SimpleITK as sitk

        by_name = {str(e["name"]).lower(): int(e["value"]) for e in label_table}
        segmentation = reference_node.GetSegmentation()
        labels = None
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            value = by_name.get(segment.GetName().lower())
            if value is None:
                continue
            mask = mrml_io.segment_array(reference_node, segmentation.GetNthSegmentID(index), input_node)
            labels = np.zeros(mask.shape, np.uint16) if labels is None else labels
            labels[mask > 0] = value
        if labels is None:
            raise ValueError(
                f"reference {reference_node.GetName()}: no segment is named like a label of the model "
                f"({', '.join(sorted(by_name)[:8])}...)"
            )
        # geometry: the exported input file is the grid the worker reads
        grid = sitk.ReadImage(str(workdir / "input.nrrd"))
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(grid)
        path = workdir / "reference.nrrd"
        sitk.WriteImage(image, str(path))
        return path

    def import_segmentation(
        self,
        result: dict[str, Any],
        input_node: Any,
        model: str,
        precision: str,
        replace_previous: bool = False,
    ) -> Any:
        """The segmentation node for a ``segment`` result (see :func:`.mrml_io.import_segmentation`)."""
        return mrml_io.import_segmentation(
            self.scene,
            result["output"],
            result["label_table"],
            input_node,
            model_id=model,
            precision=precision,
            replace_previous=replace_previous,
        )

    # -- results ------------------------------------------------------------------------------------
    def set_rows(self, rows: list[ResultRow], merge: bool = False) -> list[ResultRow]:
        """Show ``rows`` (``merge``: replace only rows of the same precision) in the table + chart nodes."""
        if merge:
            precisions = {r.precision for r in rows}
            rows = [r for r in self.rows if r.precision not in precisions] + rows
        self.rows = rows
        self.table_node, self.chart_node = mrml_io.results_table(
            self.scene, rows, table_node=self.table_node, chart_node=self.chart_node
        )
        return rows

    def forget_results(self) -> None:
        """After a scene close: the table/chart nodes are gone, the next result makes new ones."""
        self.rows, self.table_node, self.chart_node = [], None, None
        self.volumes_table_node = None

    # -- tasks ----------------------------------------------------------------------------------------
    def _task(
        self,
        name: str,
        callbacks: TaskCallbacks | None,
        factory: WorkerFactory | None,
        workdir: Path | None = None,
        cleanup: bool = True,
    ) -> Task:
        return Task(
            name,
            factory or self.worker_factory,
            self.environment(),
            [self.cache_root()] if cleanup else [],
            callbacks,
            workdir,
        )

    def _task_for_input(
        self,
        name: str,
        input_node: Any,
        model: str,
        options: EngineOptions,
        callbacks: TaskCallbacks | None,
        factory: WorkerFactory | None,
    ) -> Task:
        """A task whose work folder holds ``input_node`` exported; ``ValueError`` at once for an input
        that cannot be segmented (nothing is written then)."""
        problem = mrml_io.input_problem(input_node)
        if problem is not None:
            raise ValueError(problem)
        workdir = self.new_workdir()
        try:
            input_path = self.export_input(input_node, workdir)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        task = self._task(name, callbacks, factory, workdir)
        task.context = {"input": input_node, "input_path": input_path, "model": model, "options": options}
        return task

    def start_models(
        self, callbacks: TaskCallbacks | None = None, factory: WorkerFactory | None = None
    ) -> Task:
        task = self._task("models", callbacks, factory, cleanup=False)
        task.run_step(self.models_command(), lambda result: "Models listed.", "Loading the model list...")
        return task

    def start_add_model(
        self,
        network_file: Path,
        labels: list[str],
        window: int,
        model_id: str,
        callbacks: TaskCallbacks | None = None,
        factory: WorkerFactory | None = None,
    ) -> Task:
        """Register a user's ONNX/TorchScript network (``medquant models add``) as a model card."""
        task = self._task("add model", callbacks, factory, cleanup=False)
        command = self.command(
            "models", "add", "--file", str(network_file), "--labels", ",".join(labels),
            "--window", str(window), "--id", model_id, "--overwrite",
        )  # fmt: skip
        task.run_step(command, lambda result: f"Added model {model_id}.", f"Adding {network_file.name}...")
        return task

    def start_download(
        self, model: str, callbacks: TaskCallbacks | None = None, factory: WorkerFactory | None = None
    ) -> Task:
        task = self._task("download", callbacks, factory)
        task.run_step(self.fetch_command(model), lambda result: "Weights ready.", f"Downloading {model}...")
        return task

    def start_build(
        self,
        model: str,
        options: EngineOptions,
        callbacks: TaskCallbacks | None = None,
        factory: WorkerFactory | None = None,
    ) -> Task:
        task = self._task("build", callbacks, factory)
        status = f"Building {model} ({options.backend}, {options.precision.upper()})..."
        task.run_step(self.build_command(model, options), build_summary, status)
        return task

    def start_segment(
        self,
        input_node: Any,
        model: str,
        options: EngineOptions,
        callbacks: TaskCallbacks | None = None,
        *,
        compare: bool = False,
        reference_node: Any = None,
        replace_previous: bool = False,
        factory: WorkerFactory | None = None,
    ) -> Task:
        """Export → ``segment`` worker → segmentation node (→ ``compare`` worker → results table).

        Raises ``ValueError`` at once, before any worker starts, for an input that cannot be segmented.
        """
        task = self._task_for_input("segment", input_node, model, options, callbacks, factory)
        workdir, input_path = task.workdir, task.context["input_path"]

        def segmented(result: dict[str, Any]) -> Any:
            # the worker's files live in workdir, which goes away: keep the label table itself
            result["label_table"] = mrml_io.read_label_table(result["label_table"])
            node = self.import_segmentation(result, input_node, model, options.precision, replace_previous)
            task.segmentation = node
            if task.callbacks.on_segmentation:
                task.callbacks.on_segmentation(node, result)
            task.rows = self.set_rows([row_from_segment(result)], merge=True)
            if result.get("volumes"):
                self.volumes_table_node = mrml_io.label_volumes_table(
                    self.scene, result["volumes"], f"{node.GetName()} volumes"
                )
            if task.callbacks.on_rows:
                task.callbacks.on_rows(task.rows)
            cache = (result.get("engine") or {}).get("cache")
            done = f"Added {node.GetName()}" + (" (cached engine)." if cache == "hit" else ".")
            if not compare:
                return done
            self._compare_step(task, reference_node, result["label_table"])
            return CONTINUE

        task.run_step(
            self.segment_command(model, input_path, workdir / "labels.nrrd", options),
            segmented,
            f"Segmenting {input_node.GetName()} with {model}...",
        )
        return task

    def start_compare(
        self,
        input_node: Any,
        model: str,
        options: EngineOptions,
        callbacks: TaskCallbacks | None = None,
        *,
        reference_node: Any = None,
        label_table: list[dict[str, Any]] | None = None,
        factory: WorkerFactory | None = None,
    ) -> Task:
        """FP32 vs the selected precision on ``input_node``; rows go to the results table."""
        task = self._task_for_input("compare", input_node, model, options, callbacks, factory)
        self._compare_step(task, reference_node, label_table or [])
        return task

    def _compare_step(self, task: Task, reference_node: Any, label_table: list[dict[str, Any]]) -> None:
        context = task.context
        reference = None
        if reference_node is not None:
            reference = self.export_reference(reference_node, context["input"], label_table, task.workdir)

        def compared(report: dict[str, Any]) -> str:
            task.rows = self.set_rows(rows_from_compare(report))
            task.context["report"] = report
            if task.callbacks.on_rows:
                task.callbacks.on_rows(task.rows)
            return "Comparison done: see Results (table and chart added to the scene)."

        command = self.compare_command(
            context["model"], context["input_path"], task.workdir / "compare", context["options"], reference
        )
        task.run_step(command, compared, "Comparing with FP32...")

    # -- blocking helpers (scripting, self-tests) ---------------------------------------------------
    @staticmethod
    def _finished(task: Task, timeout: float | None) -> TaskResult:
        result = task.wait(timeout)
        if not result.succeeded:
            raise WorkerFailed(result.outcome, result.message)
        return result

    def segment(
        self,
        input_node: Any,
        model: str,
        options: EngineOptions,
        replace_previous: bool = False,
        timeout: float | None = None,
        on_progress: Callable[[float | None, str, str], None] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Segment ``input_node`` out of process; returns ``(segmentation node, worker result)``.

        Blocks the caller but not the GUI: with a Qt worker factory the wait runs Qt's event loop.
        """
        callbacks = TaskCallbacks(on_progress=on_progress)
        task = self.start_segment(input_node, model, options, callbacks, replace_previous=replace_previous)
        result = self._finished(task, timeout)
        assert result.result is not None
        return result.segmentation, result.result

    def compare(
        self,
        input_node: Any,
        model: str,
        options: EngineOptions,
        reference_node: Any = None,
        label_table: list[dict[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """FP32 vs the selected precision; returns ``(table node, chart node, report)``."""
        task = self.start_compare(
            input_node, model, options, reference_node=reference_node, label_table=label_table
        )
        self._finished(task, timeout)
        return self.table_node, self.chart_node, task.context["report"]


def build_summary(result: dict[str, Any]) -> str:
    """The status line after a build (built or reused, backend, precision, size)."""
    engine = result.get("engine", result) if isinstance(result, dict) else {}
    size = engine.get("bytes_on_disk")
    size_text = f", {size / 2**20:.2f} MB" if isinstance(size, (int, float)) else ""
    verb = "Reused the cached engine" if engine.get("cache", "built") == "hit" else "Built the engine"
    return f"{verb}: {engine.get('backend', '?')} {str(engine.get('precision', '?')).upper()}{size_text}."


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "EngineOptions",
    "MedQuantLogic",
    "TaskCallbacks",
    "WorkerFailed",
    "build_summary",
    "row_from_segment",
]
