"""A blocking-code detector: tells you when, and where, something blocked the event loop.

The loop beats a heart every few milliseconds; a watchdog thread checks the beat, and when
the loop has been silent for longer than the threshold it captures the loop thread's
stack at that moment: the code that is blocking it (the seed's bug, named).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

import anyio

logger = logging.getLogger("profile_app.watchdog")


class LoopWatchdog:
    """Run `heartbeat()` on the loop; the watchdog thread runs while it does."""

    def __init__(self, threshold_s: float, on_block: Callable[[float, str], None] | None = None) -> None:
        self.threshold_s = threshold_s
        self.on_block = on_block
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()

    async def heartbeat(self) -> None:
        """Beat until cancelled, with a watchdog thread watching the beats."""
        loop_thread = threading.get_ident()
        beat_every_s = min(0.02, self.threshold_s / 4)
        self._stopped.clear()
        watcher = threading.Thread(target=self._watch, args=(loop_thread,), name="loop-watchdog", daemon=True)
        watcher.start()
        try:
            while True:
                self._last_beat = time.monotonic()
                await anyio.sleep(beat_every_s)
        finally:
            self._stopped.set()

    def _watch(self, loop_thread: int) -> None:
        reported_beat = None
        while not self._stopped.wait(self.threshold_s / 4):
            beat = self._last_beat
            blocked_s = time.monotonic() - beat
            if blocked_s <= self.threshold_s or beat == reported_beat:
                continue
            reported_beat = beat  # one report per blocking episode
            frame = sys._current_frames().get(loop_thread)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(stack unavailable)\n"
            logger.warning(
                "the event loop has been blocked for %.0f ms (threshold %.0f ms); it is running:\n%s",
                blocked_s * 1000,
                self.threshold_s * 1000,
                stack,
            )
            if self.on_block is not None:
                self.on_block(blocked_s, stack)
