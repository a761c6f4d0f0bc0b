"""Linux process facts and settings that the fault handling reads and makes: a process's parent and
state from /proc, and prctl's child subreaper and parent-death signal. Standard library only: the supervisor
(distssl.cli.supervise), which may be a container's PID 1, imports it without torch."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    """True when the kernel took it; False off Linux or on an old kernel."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of a live process, or None when it is gone (or there is no /proc)."""
    try:
        return int(_stat(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def process_state(pid: int) -> Optional[str]:
    """'gone', 'exited' (a zombie), 'stopped' or None (running, or unknown) for a process on this host."""
    try:
        state = _stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    except (OSError, IndexError):
        return None
    return {"Z": "exited", "X": "gone", "T": "stopped", "t": "stopped"}.get(state)
