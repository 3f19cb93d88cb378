"""Start a command as the leader of a new process session (POSIX), so it can be cancelled as a tree.

Used as ``<python> launcher.py <program> <args...>``: calls :func:`os.setsid`, prints one line
``{"event": "launcher", "pgid": N}`` that :mod:`.process` consumes, then replaces itself with the
program (:func:`os.execvp`). Every descendant inherits the process group, so one ``killpg`` reaches the
worker, any launcher it hides behind (``PythonSlicer``) and its helper processes.
"""

import json
import os
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: launcher.py PROGRAM [ARGS...]\n")
        sys.exit(2)
    os.setsid()
    sys.stdout.write(json.dumps({"event": "launcher", "pgid": os.getpgid(0)}) + "\n")
    sys.stdout.flush()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
