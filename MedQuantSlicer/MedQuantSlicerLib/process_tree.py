"""Process-tree helpers: is a worker's process group still alive, signal it, start it without a window.

Inside Slicer the worker hides behind CTK launchers: ``PythonSlicer`` is a launcher that starts the real
Python as its child and does not forward signals (commontk/AppLauncher). When it dies, the worker it
started keeps running. Cancel therefore targets the worker's *process group* and keeps escalating to
SIGKILL until no process of that group is left, whatever happened to the direct child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Windows process creation flag: run a console program without a console window.
CREATE_NO_WINDOW = 0x08000000
#: ``STARTUPINFO.dwFlags`` / ``wShowWindow`` values that hide a window (``STARTF_USESHOWWINDOW``, ``SW_HIDE``).
STARTF_USESHOWWINDOW, SW_HIDE = 1, 0


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux: read from ``/proc``)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = text[text.rindex(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def group_alive(pgid: int | None) -> bool:
    """True while any process of group ``pgid`` still runs (zombies do not count)."""
    if pgid is None or os.name == "nt":
        return False
    if sys.platform.startswith("linux") and Path("/proc/self/stat").exists():
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_group(pgid: int | None, force: bool) -> None:
    """SIGINT (graceful: Python unwinds) or SIGKILL to every process of group ``pgid``."""
    if pgid is None or os.name == "nt":
        return
    try:
        os.killpg(pgid, signal.SIGKILL if force else signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        pass


def kill_windows_tree(pid: int | None) -> None:
    """``taskkill /T /F``: the process and all its descendants (Windows has no process groups)."""
    if pid is not None:
        subprocess.run(
            ["taskkill", "/PID", str(pid), "/T", "/F"],
            capture_output=True,
            check=False,
            **hidden_window_options(),
        )


def hidden_window_options(windows: bool | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keywords that start a console program without showing a window.

    As ``slicer.util.launchConsoleProcess`` does on Windows (Base/Python/slicer/util.py): a
    ``STARTUPINFO`` with ``SW_HIDE``; plus ``CREATE_NO_WINDOW`` so no console is allocated at all.
    Empty elsewhere.
    """
    windows = os.name == "nt" if windows is None else windows
    if not windows:
        return {}
    options: dict[str, Any] = {"creationflags": CREATE_NO_WINDOW}
    if hasattr(subprocess, "STARTUPINFO"):
        info = subprocess.STARTUPINFO()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        options["startupinfo"] = info
    return options


def new_group_options(windows: bool | None = None) -> dict[str, Any]:
    """``Popen`` keywords that make the child the root of a tree cancel can reach, window hidden."""
    windows = os.name == "nt" if windows is None else windows
    if not windows:
        return {"start_new_session": True}
    options = hidden_window_options(True)
    options["creationflags"] |= 0x00000200  # CREATE_NEW_PROCESS_GROUP (for CTRL_BREAK_EVENT)
    return options
