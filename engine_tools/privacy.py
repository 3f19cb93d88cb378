"""No traffic but what the user asked for.

Scans are patient data and clinical workstations are often offline, so the only network access the
tools make is a download of a card's pinned files (:mod:`engine_tools.weights`: model weights, the
demo's published scans), which ``--offline`` / ``MEDQUANT_OFFLINE=1`` forbids. NNCF and OpenVINO's model
converter report usage through ``openvino-telemetry`` unless told not to; :func:`disable_telemetry`
opts out before either library is imported.

What the installed libraries actually honour (read from their source, NNCF 3.4, openvino-telemetry
2025.2, OpenVINO 2026.4):

- NNCF replaces its telemetry with a stub when ``NNCF_CI`` (or ``NNCF_DEV``) is set, but it still
  constructs an ``openvino_telemetry.Telemetry`` at import, which writes a client-id file under
  ``~/intel`` when no consent file exists.
- ``openvino.convert_model`` (``openvino.tools.ovc``) sends events through ``openvino_telemetry`` with
  no environment switch of its own; ``openvino_telemetry`` only declines for ``CI=true`` /
  ``TF_BUILD`` / ``JENKINS_URL`` or a consent file containing ``0`` (written by its ``opt_in_out``
  tool into the user's home). Neither is ours to set, so :func:`disable_telemetry` makes
  ``openvino_telemetry``'s consent check answer "declined" for this process (nothing is sent or
  written, exactly as if the user had opted out), and the engines read ONNX with
  ``openvino.Core.read_model``, which does not go through the converter.
"""

from __future__ import annotations

import os

#: Environment switches honoured by NNCF (set before it is imported; inherited by worker processes).
TELEMETRY_OPT_OUT_ENV = {
    "NNCF_CI": "1",  # NNCF swaps its telemetry for a stub (nncf/telemetry/wrapper.py)
    "OPENVINO_TELEMETRY_DISABLED": "1",
    "NO_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    """Opt out of every usage-statistics channel of the inference libraries we load."""
    for key, value in TELEMETRY_OPT_OUT_ENV.items():
        os.environ.setdefault(key, value)
    _decline_openvino_telemetry()


def _decline_openvino_telemetry() -> None:
    """Make ``openvino_telemetry`` behave as if the user had declined (no sends, no client-id file)."""
    try:
        from openvino_telemetry import main as telemetry_main
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # not installed: nothing can be sent through it
        return

    def declined(self, enable_opt_in_dialog, disable_in_ci=False):  # noqa: ARG001
        return opt_in_checker.ConsentCheckResult.DECLINED

    opt_in_checker.OptInChecker.check = declined
    # A Telemetry singleton created before us (another tool imported first) loses its consent too.
    instance = getattr(telemetry_main.Telemetry, "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False
