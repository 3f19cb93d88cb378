"""Slicer-free logic of the module: worker command lines and the MRML side of each task.

``MedQuantSlicer.MedQuantSlicerLogic`` (the Slicer class) derives from :class:`MedQuantLogic`; the
tests drive this class directly on a ``slicer-core`` scene. Blocking helpers (:meth:`MedQuantLogic.segment`,
:meth:`MedQuantLogic.compare`) run the worker with :class:`~.process.ThreadWorkerProcess` for scripting
and self-tests; the panel runs the same command lines with ``QProcess`` instead.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import mrml_io, paths
from MedQuantSlicerLib.events import WorkerOutcome
from MedQuantSlicerLib.process import ThreadWorkerProcess
from MedQuantSlicerLib.results import ResultRow, row_from_segment, rows_from_compare

BACKENDS = {"Auto": "auto", "TensorRT": "tensorrt", "OpenVINO": "openvino", "ONNX Runtime": "onnxruntime"}
PRECISIONS = {"INT8": "int8", "BF16": "bf16", "FP16": "fp16", "FP32": "fp32"}


class WorkerFailed(RuntimeError):
    """A worker ended without a result; ``outcome`` holds its log."""

    def __init__(self, outcome: WorkerOutcome) -> None:
        super().__init__(f"{outcome.status}: {outcome.message()}")
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

    def arguments(self, with_precision: bool = True) -> list[str]:
        args = ["--backend", self.backend]
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
        self, scene: Any = None, python: str | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        self.scene = scene
        self.python = python
        self.extra_env = dict(extra_env or {})

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

    def results_table(
        self, rows: list[ResultRow], table_node: Any = None, chart_node: Any = None
    ) -> tuple[Any, Any]:
        return mrml_io.results_table(self.scene, rows, table_node=table_node, chart_node=chart_node)

    # -- blocking helpers (scripting, self-tests) ---------------------------------------------------
    def run_worker(
        self,
        command: list[str],
        timeout: float | None = None,
        on_progress: Callable[[float | None, str, str], None] | None = None,
        on_log: Callable[[str, str], None] | None = None,
    ) -> dict[str, Any]:
        worker = ThreadWorkerProcess(
            command,
            env=self.environment(),
            on_progress=on_progress,
            on_log=on_log,
            cleanup_dirs=[self.cache_root()],
        )
        worker.start()
        try:
            outcome = worker.wait(timeout)
        except BaseException:
            worker.cancel()
            worker.wait(60)
            raise
        if not outcome.succeeded:
            raise WorkerFailed(outcome)
        assert outcome.result is not None
        return outcome.result

    def segment(
        self,
        input_node: Any,
        model: str,
        options: EngineOptions,
        replace_previous: bool = False,
        timeout: float | None = None,
        on_progress: Callable[[float | None, str, str], None] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Segment ``input_node`` out of process; returns ``(segmentation node, worker result)``."""
        workdir = self.new_workdir()
        try:
            input_path = self.export_input(input_node, workdir)
            command = self.segment_command(model, input_path, workdir / "labels.nrrd", options)
            result = self.run_worker(command, timeout, on_progress)
            # the worker's files live in workdir, which goes away: keep the label table itself
            result["label_table"] = mrml_io.read_label_table(result["label_table"])
            node = self.import_segmentation(result, input_node, model, options.precision, replace_previous)
            return node, result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

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
        workdir = self.new_workdir()
        try:
            input_path = self.export_input(input_node, workdir)
            reference = None
            if reference_node is not None:
                reference = self.export_reference(reference_node, input_node, label_table or [], workdir)
            command = self.compare_command(model, input_path, workdir / "compare", options, reference)
            report = self.run_worker(command, timeout)
            table, chart = self.results_table(rows_from_compare(report))
            return table, chart, report
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["BACKENDS", "PRECISIONS", "EngineOptions", "MedQuantLogic", "WorkerFailed", "row_from_segment"]
