"""Run the module panel outside Slicer: PySide6 + QUiLoader on the same ``.ui`` file, real MRML.

Slicer's own widget classes (CTK, qMRML) are not available here; the stand-ins below implement the part
of their API the panel uses (same property, signal and slot names), so :class:`MedQuantSlicerLib.panel.Panel`
runs unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtCore import Property, Signal
from PySide6.QtUiTools import QUiLoader


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - must match the .ui class name
    """Stand-in: a group box whose title is the ``text`` property."""

    def _get_text(self) -> str:
        return self.title()

    def _set_text(self, text: str) -> None:
        self.setTitle(text)

    def _get_collapsed(self) -> bool:
        return bool(getattr(self, "_collapsed", False))

    def _set_collapsed(self, collapsed: bool) -> None:
        self._collapsed = collapsed

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
    """Stand-in: a line edit with the ``currentPath`` property and ``currentPathChanged`` signal."""

    currentPathChanged = Signal(str)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.textChanged.connect(self.currentPathChanged.emit)

    def _get_path(self) -> str:
        return self.text()

    def _set_path(self, path: str) -> None:
        self.setText(path)

    def setCurrentPath(self, path: str) -> None:  # noqa: N802 - CTK slot name
        self.setText(path)

    currentPath = Property(str, _get_path, _set_path)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Stand-in: lists the scene's nodes of ``nodeTypes``; ``currentNode``/``setCurrentNode``."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._scene = None
        self._nodes: list[Any] = []
        self.currentIndexChanged.connect(lambda *_: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        self._scene = scene
        self.refresh()

    def refresh(self) -> None:
        current = self.currentNode()
        types = self.property("nodeTypes") or []
        none_enabled = bool(self.property("noneEnabled"))
        self.blockSignals(True)
        self.clear()
        self._nodes = [None] if none_enabled else []
        if none_enabled:
            self.addItem("None")
        # qMRMLNodeComboBox.showChildNodeTypes (default true): false lists only the exact classes
        show_children = self.property("showChildNodeTypes")
        for node_type in types:
            for index in range(self._scene.GetNumberOfNodesByClass(node_type) if self._scene else 0):
                node = self._scene.GetNthNodeByClass(index, node_type)
                if show_children is False and node.GetClassName() != node_type:
                    continue
                self._nodes.append(node)
                self.addItem(node.GetName())
        self.blockSignals(False)
        self.setCurrentNode(current if current in self._nodes else (self._nodes[0] if self._nodes else None))

    def currentNode(self) -> Any:  # noqa: N802
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node: Any) -> None:  # noqa: N802
        if node not in self._nodes and node is not None:
            self.refresh_with(node)
        self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else -1)
        self.currentNodeChanged.emit(self.currentNode())

    def refresh_with(self, node: Any) -> None:
        self._nodes.append(node)
        self.addItem(node.GetName())


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        self.mrmlSceneChanged.emit(scene)


STAND_INS = (ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox, qMRMLWidget)


def application() -> QtWidgets.QApplication:
    app = QtWidgets.QApplication.instance()
    return app if app is not None else QtWidgets.QApplication(["medquant-test"])


def load_panel_ui(ui_file: Path) -> tuple[QtWidgets.QWidget, SimpleNamespace]:
    """The root widget and a namespace of its named children (like ``slicer.util.childWidgetVariables``)."""
    application()
    loader = QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    stream = QtCore.QFile(str(ui_file))
    stream.open(QtCore.QFile.ReadOnly)
    root = loader.load(stream)
    stream.close()
    if root is None:
        raise RuntimeError(f"QUiLoader could not load {ui_file}: {loader.errorString()}")
    children = {w.objectName(): w for w in root.findChildren(QtCore.QObject) if w.objectName()}
    return root, SimpleNamespace(**children)


class PySideHost:
    """The services :class:`Panel` needs, answered without dialogs."""

    def __init__(self, scene: Any, card_file: str = "") -> None:
        self.qt = SimpleNamespace(
            QProcess=QtCore.QProcess,
            QProcessEnvironment=QtCore.QProcessEnvironment,
            QTimer=QtCore.QTimer,
            QEventLoop=QtCore.QEventLoop,
            QTableWidgetItem=QtWidgets.QTableWidgetItem,
            QBrush=QtGui.QBrush,
            QColor=QtGui.QColor,
        )
        self.scene = scene
        self.card_file = card_file
        self.errors: list[tuple[str, str]] = []
        self.confirmations: list[str] = []
        self.charts: list[Any] = []
        self.agree = False

    def confirm(self, text: str) -> bool:
        self.confirmations.append(text)
        return self.agree

    def show_error(self, text: str, details: str) -> None:
        self.errors.append((text, details))

    def choose_card_file(self) -> str:
        return self.card_file

    def show_chart(self, chart_node: Any) -> None:
        self.charts.append(chart_node)


def spin(condition, timeout: float, step: float = 0.02) -> bool:
    """Run the Qt event loop until ``condition()`` is true or ``timeout`` seconds pass."""
    app = application()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        app.processEvents(QtCore.QEventLoop.AllEvents, 50)
        time.sleep(step)
    return True
