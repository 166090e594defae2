"""Atomic file writes for run records: write to a temporary file beside the target, then `os.replace` it in.

A reader (a browser refreshing report.html, a script tailing the run) never sees a half-written file, and a run
killed mid-write leaves the previous version intact. Not here: what the files contain (the other modules).
"""

from __future__ import annotations

import os


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` atomically (creating parent directories); returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
