"""No traffic but what the user asked for.

Scans are patient data and clinical workstations are often offline, so the only network access the
tools make is an explicit model download (:mod:`engine_tools.weights`). NNCF and OpenVINO report usage
through ``openvino-telemetry`` unless told not to; :func:`disable_telemetry` opts out before either
library is imported.
"""

from __future__ import annotations

import os

#: Environment switches honoured by openvino-telemetry / NNCF (set before they are imported).
TELEMETRY_OPT_OUT_ENV = {
    "NNCF_CI": "1",  # NNCF skips its telemetry in CI mode
    "OPENVINO_TELEMETRY_DISABLED": "1",
    "NO_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    """Opt out of every usage-statistics channel of the inference libraries we load."""
    for key, value in TELEMETRY_OPT_OUT_ENV.items():
        os.environ.setdefault(key, value)
