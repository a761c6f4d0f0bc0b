"""Linux process facts and settings that the fault handling reads and makes: a process's parent from
/proc, and prctl's child subreaper and parent-death signal. Standard library only: the supervisor
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


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of a live process, or None when it is gone (or there is no /proc)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
