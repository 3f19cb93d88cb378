"""The services the panel needs from the Slicer application (dialogs, the plot view, the Qt module)."""

from __future__ import annotations

from typing import Any

TITLE = "MedQuantSlicer"


class SlicerHost:
    """:class:`~.panel.Panel`'s host inside Slicer; ``qt`` and ``slicer`` are the application's modules."""

    def __init__(self, parent_widget: Any, qt: Any, slicer: Any) -> None:
        self.qt = qt
        self.slicer = slicer
        self.scene = slicer.mrmlScene
        self.parent_widget = parent_widget

    def confirm(self, text: str) -> bool:
        return bool(self.slicer.util.confirmOkCancelDisplay(text, windowTitle=TITLE))

    def show_error(self, text: str, details: str = "") -> None:
        """An error dialog; the details box only when there are details.

        ``slicer.util.messageBox`` sets every keyword on the ``ctkMessageBox`` (Base/Python/slicer/
        util.py), so ``detailedText=None`` would show the text "None" in PythonQt: leave it out.
        """
        kwargs: dict[str, Any] = {"windowTitle": TITLE}
        if details:
            kwargs["detailedText"] = details
        self.slicer.util.errorDisplay(text, **kwargs)

    def choose_card_file(self) -> str:
        return self.qt.QFileDialog.getOpenFileName(
            self.parent_widget, "Model card of your network", "", "Model card (*.json)"
        )

    def show_chart(self, chart_node: Any) -> None:
        self.slicer.modules.plots.logic().ShowChartInLayout(chart_node)
