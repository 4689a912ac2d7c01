"""Stopping the helper processes a bench or a demo starts (stub upstreams, proxies, gateways): asked first, killed
only when they overrun, never left behind."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Iterable


def stop_processes(processes: Iterable[subprocess.Popen | None], grace: float = 60.0) -> None:
    """SIGTERM to every one still running, then wait up to `grace` seconds for each; one that overruns is killed,
    with its whole process group when it leads one (started with start_new_session=True: its children go too)."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                leads_group = os.getpgid(process.pid) == process.pid
            except ProcessLookupError:     # gone between the timeout and now
                leads_group = False
            if leads_group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
