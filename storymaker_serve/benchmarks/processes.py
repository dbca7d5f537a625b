"""What the benchmarks and tests read about running processes (a server's tree, its memory and CPU), via psutil.

Each function answers 0 (or nothing) for a process that is gone, so a measurement taken while a server stops
does not fail.
"""
from __future__ import annotations

import psutil


def child_pids(parent: int, name: str | None = None, recursive: bool = False) -> list[int]:
    """Children of `parent` (tritonserver's Python-backend stubs, a launcher's server), all descendants with
    `recursive` (a launcher's reaper, tritonserver and its stubs), optionally only those with this process name."""
    try:
        children = psutil.Process(parent).children(recursive=recursive)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if name is None or child.name() == name:
                out.append(child.pid)
        except psutil.Error:
            continue
    return out


def rss_kib(pid: int, part: str = "all") -> int:
    """Resident memory of a process in KiB: `all` (VmRSS), `anon` (its own memory: RSS less the file-backed and
    shared pages) or `file` (file-backed and shared pages, e.g. weights mapped from a build's files, which the
    kernel can drop and re-read)."""
    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    kib = {"all": info.rss, "anon": info.rss - info.shared, "file": info.shared}[part]
    return kib // 1024


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all below it (a launcher's reaper, tritonserver and its Python-backend
    stubs), KiB."""
    return sum(rss_kib(p) for p in [pid, *child_pids(pid, recursive=True)])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def command_line(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
