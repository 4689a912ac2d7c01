"""What /health reports about the upstreams: one background check, repeated, read from memory by every call.

Asking every upstream on every /health call lets anyone who can reach the port (and every kubelet probe) multiply
its traffic by the number of candidates. Instead one task asks them all every `interval` seconds while they are
all up, and backs off (doubling, up to `max_interval`) while any is down, so a dead upstream is not hammered.
/health waits for the first check only; after that it answers at once with the last result and its age.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("zooter.gateway")


class HealthMonitor:
    def __init__(self, check, interval: float = 5.0, max_interval: float = 30.0):
        self.check = check                  # async () -> (ready, {upstream: "up" | "down: why"})
        self.interval, self.max_interval = interval, max(interval, max_interval)
        self.result: tuple[bool, dict, float] | None = None      # ready, upstreams, monotonic time of the check
        self.task: asyncio.Task | None = None
        self.first: asyncio.Event | None = None

    async def start(self) -> None:
        self.first = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="zooter-health")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def current(self) -> tuple[bool, dict, float]:
        """(ready, upstreams, seconds since the check)."""
        await self.first.wait()
        ready, upstreams, at = self.result
        return ready, upstreams, time.monotonic() - at

    async def _run(self) -> None:
        delay = self.interval
        while True:
            try:
                ready, upstreams = await self.check()
            except Exception as err:      # a check that breaks is a state to report, not a reason to stop checking
                log.warning("the upstream health check failed: %s: %s", type(err).__name__, err)
                ready, upstreams = False, {"health_check": f"down: {type(err).__name__}"}
            self.result = (ready, upstreams, time.monotonic())
            self.first.set()
            all_up = ready and all(state == "up" for state in upstreams.values())
            delay = self.interval if all_up else min(delay * 2, self.max_interval)
            await asyncio.sleep(delay)
