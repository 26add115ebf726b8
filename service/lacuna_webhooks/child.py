"""Start a child process of our own: this interpreter running one of the package's
``child_main(fd)`` functions over a socket pair.

Used by the SQLite writer process (``store.sqlite.process``) and the handler worker
processes (``dispatch.workers``). Imports nothing of the package's.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

# The folder holding the ``lacuna_webhooks`` package: the child imports the same code as the
# parent, installed or not (a checkout run with PYTHONPATH, as ``make bench`` does).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


async def start_child(module: str, theirs: socket.socket) -> asyncio.subprocess.Process:
    """Run ``module.child_main(fd)`` in a new process, ``fd`` being ``theirs``.

    ``module`` is a dotted module path of this package (``lacuna_webhooks.…``). ``theirs``
    is closed in this process whatever happens (the child holds its own copy). Raises
    ``OSError`` when the process cannot be started.
    """
    code = (
        "import sys\n"
        f"if {_PACKAGE_ROOT!r} not in sys.path: sys.path.insert(0, {_PACKAGE_ROOT!r})\n"
        f"from {module} import child_main\n"
        f"sys.exit(child_main({theirs.fileno()}))\n"
    )
    try:
        # This interpreter, running a fixed program: nothing here comes from outside.
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()


__all__ = ["start_child"]
