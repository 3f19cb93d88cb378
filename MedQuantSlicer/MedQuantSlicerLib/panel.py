"""The module panel: binds the widgets of ``Resources/UI/MedQuantSlicer.ui`` to workers and MRML.

The same :class:`Panel` runs inside Slicer (PythonQt; widgets from ``slicer.util.loadUI``) and in the
offscreen PySide6 test (widgets from ``QUiLoader``). It therefore only uses idioms valid in both:
``signal.connect(callable)``, ``setEnabled``/``setText``/``setValue`` calls and ``widget.property(name)``
to read values (PythonQt exposes Qt properties as attributes, PySide6 as getter methods).

Environment-specific services (the Qt core module, dialogs, showing a chart) come from a ``host``
object with: ``qt`` (namespace with ``QProcess``, ``QProcessEnvironment``, ``QTimer``,
``QTableWidgetItem``), ``scene``, ``confirm(text) -> bool``, ``show_error(text, details)``,
``choose_card_file() -> str``, ``show_chart(chart_node)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import dependencies, parameters
from MedQuantSlicerLib.controller import TaskController
from MedQuantSlicerLib.events import CANCELLED, SUCCEEDED, WorkerOutcome
from MedQuantSlicerLib.logic import BACKENDS, PRECISIONS, EngineOptions, MedQuantLogic
from MedQuantSlicerLib.process import QtWorkerProcess
from MedQuantSlicerLib.results import COLUMNS, ResultRow, row_from_segment, rows_from_compare

ACTIONS = {"download": "Download weights", "build": "Build engine", "run": "Run"}
CARDS_ENV = "MEDQUANT_MODEL_CARDS"


def prop(widget: Any, name: str) -> Any:
    """A Qt property value, portable between PythonQt and PySide6."""
    return widget.property(name)


class Panel:
    """Widget logic of the module (one instance per panel)."""

    def __init__(self, ui: Any, host: Any, logic: MedQuantLogic, parameter_node: Any) -> None:
        self.ui = ui
        self.host = host
        self.logic = logic
        self.parameter_node = parameter_node
        self.controller = TaskController(ACTIONS)
        self.models: dict[str, dict[str, Any]] = {}
        self.rows: list[ResultRow] = []
        self.table_node: Any = None
        self.chart_node: Any = None
        self.worker: QtWorkerProcess | None = None
        self.models_worker: QtWorkerProcess | None = None
        self.workdir: Path | None = None
        self.last_segmentation: Any = None
        self.last_outcome: WorkerOutcome | None = None
        self._restoring = False
        self._setup()

    # -- setup ----------------------------------------------------------------------------------------
    def _setup(self) -> None:
        ui = self.ui
        ui.resultsTableWidget.setColumnCount(len(COLUMNS))
        ui.resultsTableWidget.setHorizontalHeaderLabels([title for _, title in COLUMNS])
        ui.progressBar.setRange(0, 100)
        ui.progressBar.setValue(0)
        ui.buildButton.clicked.connect(lambda *a: self.on_action("build"))
        ui.runButton.clicked.connect(lambda *a: self.on_action("run"))
        ui.downloadButton.clicked.connect(lambda *a: self.on_action("download"))
        ui.addModelButton.clicked.connect(lambda *a: self.on_add_model())
        ui.installDependenciesButton.clicked.connect(lambda *a: self.on_dependencies())
        ui.showChartButton.clicked.connect(lambda *a: self.on_show_chart())
        ui.modelComboBox.currentIndexChanged.connect(lambda *a: self.on_model_changed())
        for combo in (ui.backendComboBox, ui.precisionComboBox, ui.methodComboBox):
            combo.currentIndexChanged.connect(lambda *a: self.save_parameters())
        for check in (ui.rebuildCheckBox, ui.compareCheckBox, ui.replaceCheckBox):
            check.toggled.connect(lambda *a: self.save_parameters())
        ui.windowsSpinBox.valueChanged.connect(lambda *a: self.save_parameters())
        ui.calibrationPathLineEdit.currentPathChanged.connect(lambda *a: self.save_parameters())
        ui.inputVolumeSelector.currentNodeChanged.connect(lambda *a: self.on_selection_changed())
        ui.referenceSegmentationSelector.currentNodeChanged.connect(lambda *a: self.save_parameters())
        self.controller.add_listener(lambda c: self.update_buttons())
        self.restore_parameters()
        ui.dependenciesLabel.setText(dependencies.check("build").message())
        self.update_buttons()
        self.refresh_models()

    # -- parameters -----------------------------------------------------------------------------------
    def settings(self) -> parameters.Settings:
        ui = self.ui
        return parameters.Settings(
            model=self.selected_model() or "",
            calibration_folder=str(prop(ui.calibrationPathLineEdit, "currentPath") or ""),
            windows=int(prop(ui.windowsSpinBox, "value")),
            method=str(prop(ui.methodComboBox, "currentText")),
            backend=BACKENDS.get(str(prop(ui.backendComboBox, "currentText")), "auto"),
            precision=PRECISIONS.get(str(prop(ui.precisionComboBox, "currentText")), "int8"),
            rebuild=bool(prop(ui.rebuildCheckBox, "checked")),
            compare_fp32=bool(prop(ui.compareCheckBox, "checked")),
            replace_previous=bool(prop(ui.replaceCheckBox, "checked")),
            card_dirs=self.logic.extra_env.get(CARDS_ENV, ""),
        )

    def engine_options(self) -> EngineOptions:
        s = self.settings()
        return EngineOptions(s.backend, s.precision, s.calibration_folder, s.windows, s.method, s.rebuild)

    def save_parameters(self) -> None:
        if self._restoring or self.parameter_node is None:
            return
        parameters.save(
            self.parameter_node,
            self.settings(),
            self.ui.inputVolumeSelector.currentNode(),
            self.ui.referenceSegmentationSelector.currentNode(),
        )

    def restore_parameters(self) -> None:
        if self.parameter_node is None:
            return
        settings, input_node, reference_node = parameters.load(self.parameter_node)
        ui = self.ui
        self._restoring = True
        try:
            self._pending_model = settings.model
            ui.calibrationPathLineEdit.setProperty("currentPath", settings.calibration_folder)
            ui.windowsSpinBox.setValue(settings.windows)
            self._select_text(ui.methodComboBox, settings.method)
            self._select_text(ui.backendComboBox, _key_for(BACKENDS, settings.backend))
            self._select_text(ui.precisionComboBox, _key_for(PRECISIONS, settings.precision))
            ui.rebuildCheckBox.setChecked(settings.rebuild)
            ui.compareCheckBox.setChecked(settings.compare_fp32)
            ui.replaceCheckBox.setChecked(settings.replace_previous)
            if settings.card_dirs:
                self.logic.extra_env[CARDS_ENV] = settings.card_dirs
            if input_node is not None:
                ui.inputVolumeSelector.setCurrentNode(input_node)
            if reference_node is not None:
                ui.referenceSegmentationSelector.setCurrentNode(reference_node)
        finally:
            self._restoring = False

    @staticmethod
    def _select_text(combo: Any, text: str) -> None:
        index = combo.findText(text)
        if index >= 0:
            combo.setCurrentIndex(index)

    # -- models ---------------------------------------------------------------------------------------
    def selected_model(self) -> str | None:
        combo = self.ui.modelComboBox
        index = int(prop(combo, "currentIndex"))
        if index < 0:
            return None
        data = combo.itemData(index)
        return str(data) if data else None

    def refresh_models(self) -> None:
        """List the model cards with a background ``models`` worker."""
        self.ui.modelInfoLabel.setText("Loading the model list...")
        self.models_worker = self._make_worker(
            self.logic.models_command(), self._on_models_finished, on_progress=None, cleanup=False
        )
        self.models_worker.start()

    def _on_models_finished(self, outcome: WorkerOutcome) -> None:
        if not outcome.succeeded or outcome.result is None:
            self.ui.modelInfoLabel.setText("Could not list models: " + outcome.message().splitlines()[0])
            self._log("error", outcome.message())
            return
        data = outcome.result
        entries = data.get("models", data) if isinstance(data, dict) else data
        if isinstance(entries, dict):
            entries = [{"id": k, **v} for k, v in entries.items()]
        self.models = {str(e["id"]): e for e in entries}
        combo = self.ui.modelComboBox
        self._restoring = True
        try:
            combo.clear()
            for model_id, entry in self.models.items():
                combo.addItem(f"{entry.get('title', model_id)} [{model_id}]", model_id)
            wanted = getattr(self, "_pending_model", "") or ""
            index = combo.findData(wanted) if wanted else -1
            combo.setCurrentIndex(index if index >= 0 else (0 if self.models else -1))
        finally:
            self._restoring = False
        self.on_model_changed()

    def on_model_changed(self) -> None:
        model = self.selected_model()
        entry = self.models.get(model or "", {})
        if entry:
            weights = entry.get("weights_present")
            weights_text = {True: "present", False: "not downloaded"}.get(weights, "checked on first use")
            self.ui.modelInfoLabel.setText(
                f"{entry.get('task', '')} · {entry.get('modality', '')} · {entry.get('num_labels', '?')} labels"
                f" · {entry.get('architecture', '')}\nlicence: {entry.get('licence', 'unknown')} · "
                f"weights: {weights_text}"
            )
        if not self._restoring:
            self._pending_model = model or ""
            self.save_parameters()
        self.update_buttons()

    def on_add_model(self) -> None:
        """Register a user's card folder (card JSON beside its ONNX/TorchScript file) and relist."""
        path = self.host.choose_card_file()
        if not path:
            return
        folder = str(Path(path).resolve().parent)
        dirs = [d for d in self.logic.extra_env.get(CARDS_ENV, "").split(os.pathsep) if d]
        if folder not in dirs:
            dirs.append(folder)
        self.logic.extra_env[CARDS_ENV] = os.pathsep.join(dirs)
        self._pending_model = ""
        self.save_parameters()
        self.refresh_models()

    def on_dependencies(self) -> None:
        report = dependencies.check("build")
        if report.to_install:
            try:
                dependencies.install(report, self.host.confirm)
            except Exception as exc:  # show, never crash the panel
                self.host.show_error(f"Installing Python packages failed: {exc}", "")
            report = dependencies.check("build")
        self.ui.dependenciesLabel.setText(report.message())

    # -- buttons --------------------------------------------------------------------------------------
    def on_selection_changed(self) -> None:
        self.save_parameters()
        self.update_buttons()

    def update_buttons(self) -> None:
        ui, c = self.ui, self.controller
        has_model = self.selected_model() is not None
        has_input = ui.inputVolumeSelector.currentNode() is not None
        for action, button, available in (
            ("download", ui.downloadButton, has_model),
            ("build", ui.buildButton, has_model),
            ("run", ui.runButton, has_model and has_input),
        ):
            state = c.button(action, available)
            button.setText(state.text)
            button.setEnabled(state.enabled)
        idle = not c.busy
        for widget in (
            ui.modelComboBox,
            ui.addModelButton,
            ui.calibrationPathLineEdit,
            ui.windowsSpinBox,
            ui.methodComboBox,
            ui.backendComboBox,
            ui.precisionComboBox,
            ui.inputVolumeSelector,
            ui.installDependenciesButton,
        ):
            widget.setEnabled(idle)
        ui.showChartButton.setEnabled(self.chart_node is not None)
        ui.statusLabel.setText(c.status)

    def on_action(self, action: str) -> None:
        decision = self.controller.pressed(action)
        if decision == "cancel":
            self.cancel()
        elif decision == "start":
            {"download": self.start_download, "build": self.start_build, "run": self.start_run}[action]()

    def cancel(self) -> None:
        if self.worker is not None and self.controller.request_cancel():
            self._log("info", "Cancelling: stopping the worker process tree...")
            self.worker.cancel()

    # -- tasks ----------------------------------------------------------------------------------------
    def start_download(self) -> None:
        model = self.selected_model()
        if model:
            self._start(
                "download", self.logic.fetch_command(model), self._on_download_done, f"Downloading {model}..."
            )

    def start_build(self) -> None:
        model = self.selected_model()
        if model:
            options = self.engine_options()
            self._start(
                "build",
                self.logic.build_command(model, options),
                self._on_build_done,
                f"Building {model} ({options.backend}, {options.precision.upper()})...",
            )

    def start_run(self) -> None:
        model = self.selected_model()
        input_node = self.ui.inputVolumeSelector.currentNode()
        if not model or input_node is None:
            return
        options = self.engine_options()
        self.workdir = self.logic.new_workdir()
        try:
            input_path = self.logic.export_input(input_node, self.workdir)
        except Exception as exc:
            self._cleanup_workdir()
            self.host.show_error(f"Could not export {input_node.GetName()}: {exc}", "")
            return
        command = self.logic.segment_command(model, input_path, self.workdir / "labels.nrrd", options)
        self._run_context = {
            "model": model,
            "input": input_node,
            "options": options,
            "input_path": input_path,
        }
        self._start(
            "run", command, self._on_segment_done, f"Segmenting {input_node.GetName()} with {model}..."
        )

    def _make_worker(
        self,
        command: list[str],
        on_finished: Callable[[WorkerOutcome], None],
        on_progress: Callable[[float | None, str, str], None] | None,
        cleanup: bool = True,
    ) -> QtWorkerProcess:
        return QtWorkerProcess(
            self.host.qt,
            command,
            env=self.logic.environment(),
            on_progress=on_progress,
            on_log=self._log,
            on_finished=on_finished,
            cleanup_dirs=[self.logic.cache_root()] if cleanup else [],
        )

    def _start(
        self, action: str, command: list[str], on_success: Callable[[dict[str, Any]], bool], status: str
    ) -> None:
        if not self.controller.busy:
            self.controller.start(action, status)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self._log("info", "$ " + " ".join(command))
        self._on_success = on_success
        self.worker = self._make_worker(command, self._on_worker_finished, self._on_progress)
        self.worker.start()

    def _on_progress(self, fraction: float | None, stage: str, message: str) -> None:
        bar = self.ui.progressBar
        if fraction is None:
            bar.setRange(0, 0)  # busy indicator
        else:
            bar.setRange(0, 100)
            bar.setValue(int(round(fraction * 100)))
        self.controller.set_status(f"{stage}: {message}" if message else stage)

    def _on_worker_finished(self, outcome: WorkerOutcome) -> None:
        self.last_outcome = outcome
        if outcome.status == SUCCEEDED and outcome.result is not None:
            try:
                chained = self._on_success(outcome.result)
            except Exception as exc:  # importing the result failed: readable message + log
                self._finish_failed(f"{type(exc).__name__}: {exc}", outcome)
                return
            if chained:
                return
            self._cleanup_workdir()
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(100)
            self.controller.finish(self._success_status)
            return
        if outcome.status == CANCELLED:
            self._cleanup_workdir()
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(0)
            removed = len(outcome.removed_partials)
            self.controller.finish(
                "Cancelled." + (f" Removed {removed} unfinished temporary item(s)." if removed else "")
            )
            return
        self._finish_failed(outcome.message(), outcome)

    def _finish_failed(self, message: str, outcome: WorkerOutcome) -> None:
        self._cleanup_workdir()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.controller.finish("Failed: " + message.splitlines()[0])
        self._log("error", message)
        self.host.show_error(message.splitlines()[0], "\n".join(outcome.log[-40:]))

    def _cleanup_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- results --------------------------------------------------------------------------------------
    def _on_download_done(self, result: dict[str, Any]) -> bool:
        self._success_status = "Weights ready."
        self.refresh_models()
        return False

    def _on_build_done(self, result: dict[str, Any]) -> bool:
        engine = result.get("engine", result) if isinstance(result, dict) else {}
        cache = engine.get("cache", "built")
        size = engine.get("bytes_on_disk")
        size_text = f", {size / 2**20:.2f} MB" if isinstance(size, (int, float)) else ""
        verb = "Reused the cached engine" if cache == "hit" else "Built the engine"
        self._success_status = (
            f"{verb}: {engine.get('backend', '?')} {str(engine.get('precision', '?')).upper()}{size_text}."
        )
        return False

    def _on_segment_done(self, result: dict[str, Any]) -> bool:
        context = self._run_context
        node = self.logic.import_segmentation(
            result,
            context["input"],
            context["model"],
            context["options"].precision,
            replace_previous=bool(prop(self.ui.replaceCheckBox, "checked")),
        )
        self.last_segmentation = node
        row = row_from_segment(result)
        self.set_rows([r for r in self.rows if r.precision != row.precision] + [row])
        cache = (result.get("engine") or {}).get("cache")
        self._success_status = f"Added {node.GetName()}" + (" (cached engine)." if cache == "hit" else ".")
        if not prop(self.ui.compareCheckBox, "checked"):
            return False
        reference_path = None
        reference_node = self.ui.referenceSegmentationSelector.currentNode()
        if reference_node is not None:
            table = mrml_label_table(result)
            reference_path = self.logic.export_reference(
                reference_node, context["input"], table, self.workdir
            )
        command = self.logic.compare_command(
            context["model"],
            context["input_path"],
            self.workdir / "compare",
            context["options"],
            reference_path,
        )
        self._start("run", command, self._on_compare_done, "Comparing with FP32...")
        return True

    def _on_compare_done(self, report: dict[str, Any]) -> bool:
        self.set_rows(rows_from_compare(report))
        self._success_status = "Comparison done: see Results (table and chart added to the scene)."
        return False

    def set_rows(self, rows: list[ResultRow]) -> None:
        self.rows = rows
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row.cells()):
                table.setItem(r, c, self.host.qt.QTableWidgetItem(text))
        self.table_node, self.chart_node = self.logic.results_table(rows, self.table_node, self.chart_node)
        self.update_buttons()

    def on_show_chart(self) -> None:
        if self.chart_node is not None:
            self.host.show_chart(self.chart_node)

    def _log(self, level: str, message: str) -> None:
        prefix = "" if level in ("info", "output") else f"[{level}] "
        self.ui.logTextEdit.appendPlainText(prefix + message)

    def cleanup(self) -> None:
        """Called when the module is closed: stop running workers."""
        for worker in (self.worker, self.models_worker):
            if worker is not None and worker.is_running():
                worker.cancel()


def mrml_label_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    from MedQuantSlicerLib.mrml_io import read_label_table

    return read_label_table(result["label_table"])


def _key_for(mapping: dict[str, str], value: str) -> str:
    for key, item in mapping.items():
        if item == value:
            return key
    return next(iter(mapping))
