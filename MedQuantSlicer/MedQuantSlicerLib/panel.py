"""The module panel: binds the widgets of ``Resources/UI/MedQuantSlicer.ui`` to the logic's tasks.

The same :class:`Panel` runs inside Slicer (PythonQt; widgets from ``slicer.util.loadUI``) and in the
offscreen PySide6 test (widgets from ``QUiLoader``). It therefore only uses idioms valid in both:
``signal.connect(callable)``, ``setEnabled``/``setText``/``setValue`` calls and ``widget.property(name)``
to read values (PythonQt exposes Qt properties as attributes, PySide6 as getter methods).

The work itself (export, worker, import, compare, results table) is done once, in
:class:`~.logic.MedQuantLogic`'s ``start_*`` tasks; the panel passes a Qt worker factory and callbacks.
Environment-specific services come from a ``host`` object with: ``qt`` (namespace with ``QProcess``,
``QProcessEnvironment``, ``QTimer``, ``QEventLoop``, ``QTableWidgetItem``), ``scene``,
``confirm(text) -> bool``, ``show_error(text, details)``, ``choose_card_file() -> str``,
``show_chart(chart_node)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import dependencies, parameters
from MedQuantSlicerLib.controller import TaskController
from MedQuantSlicerLib.events import WorkerOutcome
from MedQuantSlicerLib.logic import BACKENDS, PRECISIONS, EngineOptions, MedQuantLogic
from MedQuantSlicerLib.mrml_io import input_problem
from MedQuantSlicerLib.qt_process import qt_worker_factory
from MedQuantSlicerLib.results import COLUMNS, ResultRow
from MedQuantSlicerLib.tasks import Task, TaskCallbacks, TaskResult

ACTIONS = {"download": "Download weights", "build": "Build engine", "run": "Run"}
CARDS_ENV = "MEDQUANT_MODEL_CARDS"


def prop(widget: Any, name: str) -> Any:
    """A Qt property value, portable between PythonQt and PySide6."""
    return widget.property(name)


#: colour and tooltip of a result row whose INT8 engine ended below the accuracy guard's target
BELOW_TARGET_COLOR = "#c62828"
BELOW_TARGET_TIP = "Below the accuracy target: the INT8 engine agrees with FP32 less than asked"


class Panel:
    """Widget bindings of the module (one instance per panel)."""

    def __init__(self, ui: Any, host: Any, logic: MedQuantLogic, parameter_node: Any = None) -> None:
        self.ui = ui
        self.host = host
        self.logic = logic
        self.parameter_node = parameter_node if parameter_node is not None else logic.getParameterNode()
        self.controller = TaskController(ACTIONS)
        self.factory = qt_worker_factory(host.qt)
        self.models: dict[str, dict[str, Any]] = {}
        self.task: Task | None = None
        self.models_task: Task | None = None
        self.last_result: TaskResult | None = None
        self.last_segmentation: Any = None
        self._restoring = False
        self._pending_model = ""
        self._observers: list[int] = []
        self._setup()

    # -- compatibility views for scripts and tests ---------------------------------------------------
    @property
    def worker(self) -> Any:
        return self.task.worker if self.task is not None else None

    @property
    def models_worker(self) -> Any:
        return self.models_task.worker if self.models_task is not None else None

    @property
    def last_outcome(self) -> WorkerOutcome | None:
        return self.last_result.outcome if self.last_result is not None else None

    @property
    def rows(self) -> list[ResultRow]:
        return self.logic.rows

    @property
    def table_node(self) -> Any:
        return self.logic.table_node

    @property
    def chart_node(self) -> Any:
        return self.logic.chart_node

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
        for check in (ui.rebuildCheckBox, ui.offlineCheckBox, ui.compareCheckBox, ui.replaceCheckBox):
            check.toggled.connect(lambda *a: self.save_parameters())
        ui.windowsSpinBox.valueChanged.connect(lambda *a: self.save_parameters())
        ui.calibrationPathLineEdit.currentPathChanged.connect(lambda *a: self.save_parameters())
        ui.inputVolumeSelector.currentNodeChanged.connect(lambda *a: self.on_selection_changed())
        ui.referenceSegmentationSelector.currentNodeChanged.connect(lambda *a: self.save_parameters())
        self.controller.add_listener(lambda c: self.update_buttons())
        scene = self.host.scene
        if scene is not None:  # re-read the parameter node and drop stale result nodes on close
            self._observers = [
                scene.AddObserver(scene.StartCloseEvent, lambda *a: self.on_scene_start_close()),
                scene.AddObserver(scene.EndCloseEvent, lambda *a: self.on_scene_end_close()),
                scene.AddObserver(scene.EndImportEvent, lambda *a: self.on_scene_end_import()),
            ]
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
            offline=bool(prop(ui.offlineCheckBox, "checked")),
            compare_fp32=bool(prop(ui.compareCheckBox, "checked")),
            replace_previous=bool(prop(ui.replaceCheckBox, "checked")),
            card_dirs=self.logic.extra_env.get(CARDS_ENV, ""),
        )

    def engine_options(self) -> EngineOptions:
        s = self.settings()
        return EngineOptions(
            s.backend, s.precision, s.calibration_folder, s.windows, s.method, s.rebuild, s.offline
        )

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
            ui.offlineCheckBox.setChecked(settings.offline)
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
        callbacks = TaskCallbacks(on_log=self._log, on_finished=self._on_models_finished)
        self.models_task = self.logic.start_models(callbacks, self.factory)

    def _on_models_finished(self, result: TaskResult) -> None:
        if not result.succeeded or result.result is None:
            self.ui.modelInfoLabel.setText("Could not list models: " + result.message.splitlines()[0])
            return
        data = result.result
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
            wanted = self._pending_model
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
        if report.to_install or report.to_install_no_deps:
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
        problem = input_problem(ui.inputVolumeSelector.currentNode())
        for action, button, available in (
            ("download", ui.downloadButton, has_model),
            ("build", ui.buildButton, has_model),
            ("run", ui.runButton, has_model and problem is None),
        ):
            state = c.button(action, available)
            button.setText(state.text)
            button.setEnabled(state.enabled)
        ui.runButton.setToolTip(problem or "Segment the input volume (and compare with FP32 if ticked)")
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
        if self.task is not None and self.controller.request_cancel():
            self.task.cancel()

    # -- tasks ----------------------------------------------------------------------------------------
    def _callbacks(self) -> TaskCallbacks:
        return TaskCallbacks(
            on_progress=self._on_progress,
            on_log=self._log,
            on_status=self.controller.set_status,
            on_segmentation=self._on_segmentation,
            on_rows=self.show_rows,
            on_finished=self._on_task_finished,
        )

    def _begin(self, action: str, start: Any) -> None:
        """Start a task from the logic; a bad input or a failed export is shown, nothing runs."""
        self.controller.start(action)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        try:
            self.task = start(self._callbacks())
        except Exception as exc:  # clear message, never a traceback in the panel
            self.controller.finish("Failed: " + str(exc).splitlines()[0])
            self.host.show_error(str(exc), "")

    def start_download(self) -> None:
        model = self.selected_model()
        if model:
            self._begin("download", lambda cb: self.logic.start_download(model, cb, self.factory))

    def start_build(self) -> None:
        model = self.selected_model()
        if model:
            options = self.engine_options()
            self._begin("build", lambda cb: self.logic.start_build(model, options, cb, self.factory))

    def start_run(self) -> None:
        model = self.selected_model()
        input_node = self.ui.inputVolumeSelector.currentNode()
        if not model:
            return
        options = self.engine_options()
        self._begin(
            "run",
            lambda cb: self.logic.start_segment(
                input_node,
                model,
                options,
                cb,
                compare=bool(prop(self.ui.compareCheckBox, "checked")),
                reference_node=self.ui.referenceSegmentationSelector.currentNode(),
                replace_previous=bool(prop(self.ui.replaceCheckBox, "checked")),
                factory=self.factory,
            ),
        )

    def _on_progress(self, fraction: float | None, stage: str, message: str) -> None:
        bar = self.ui.progressBar
        if fraction is None:
            bar.setRange(0, 0)  # busy indicator
        else:
            bar.setRange(0, 100)
            bar.setValue(int(round(fraction * 100)))
        self.controller.set_status(f"{stage}: {message}" if message else stage)

    def _on_segmentation(self, node: Any, result: dict[str, Any]) -> None:
        self.last_segmentation = node

    def _on_task_finished(self, result: TaskResult) -> None:
        self.last_result = result
        bar = self.ui.progressBar
        bar.setRange(0, 100)
        bar.setValue(100 if result.succeeded else 0)
        if result.status == "failed":
            self.controller.finish("Failed: " + result.message.splitlines()[0])
            self.host.show_error(result.message.splitlines()[0], result.details())
        else:
            self.controller.finish(result.message)
        if self.task is not None and self.task.name == "download" and result.succeeded:
            self.refresh_models()

    # -- results --------------------------------------------------------------------------------------
    def show_rows(self, rows: list[ResultRow]) -> None:
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        qt = self.host.qt
        for r, row in enumerate(rows):
            for c, text in enumerate(row.cells()):
                item = qt.QTableWidgetItem(text)
                if row.below_target:  # built with --allow-below-target: the guard missed its target
                    item.setForeground(qt.QBrush(qt.QColor(BELOW_TARGET_COLOR)))
                    item.setToolTip(BELOW_TARGET_TIP)
                table.setItem(r, c, item)
        self.update_buttons()

    def on_show_chart(self) -> None:
        if self.chart_node is not None:
            self.host.show_chart(self.chart_node)

    def _log(self, level: str, message: str) -> None:
        prefix = "" if level in ("info", "output") else f"[{level}] "
        self.ui.logTextEdit.appendPlainText(prefix + message)

    # -- scene and module life cycle ------------------------------------------------------------------
    def on_scene_start_close(self) -> None:
        """File > Close scene: stop work on the old scene, forget its nodes."""
        self._stop_tasks()
        self.parameter_node = None

    def on_scene_end_close(self) -> None:
        """A fresh scene: the parameter node and results are new, as in Slicer's module template."""
        self.logic.forget_results()
        self.last_segmentation = None
        self.show_rows([])
        self.parameter_node = self.logic.getParameterNode()
        self.restore_parameters()
        self.update_buttons()

    def on_scene_end_import(self) -> None:
        """A scene was loaded: its saved parameter node (merged into the singleton) now holds the values."""
        self.parameter_node = self.logic.getParameterNode()
        self.restore_parameters()
        self.update_buttons()

    def _stop_tasks(self) -> None:
        for task in (self.task, self.models_task):
            if task is not None and not task.done:
                task.cancel()

    def cleanup(self) -> None:
        """Module closed or reloaded: stop workers, disconnect every callback into this panel."""
        self._stop_tasks()
        for task in (self.task, self.models_task):
            if task is not None:
                task.detach()
        scene = self.host.scene
        for tag in self._observers:
            scene.RemoveObserver(tag)
        self._observers = []
        self.controller.clear_listeners()


def _key_for(mapping: dict[str, str], value: str) -> str:
    for key, item in mapping.items():
        if item == value:
            return key
    return next(iter(mapping))
