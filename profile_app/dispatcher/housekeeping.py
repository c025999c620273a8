"""The dispatcher's housekeeping: heartbeat, cancellations, recovery, progress."""

from __future__ import annotations

import itertools
import logging
import math

import anyio

from profile_app.db.database import (
    StorageUnavailable,
)
from profile_app.dispatcher.attempt import StopReason

logger = logging.getLogger("profile_app.dispatcher")


class Housekeeping:
    """The Dispatcher's loop that renews leases, stops cancelled attempts and writes progress."""

    async def _housekeeping(self) -> None:
        tick_s = min(0.25, self.config.lease_s / 4)
        renew_every = max(1, math.floor(self.config.lease_s / 3 / tick_s))
        recover_every = max(1, math.floor(self.config.lease_s / 2 / tick_s))
        gc_every = max(1, math.floor(3600 / tick_s))
        for tick in itertools.count(1):
            await anyio.sleep(tick_s)
            try:
                await self._stop_cancelled()
                await self._flush_progress()
                if tick % renew_every == 0:
                    await self.db.renew_leases(list(self._attempts), self.config.lease_s)
                if tick % recover_every == 0 and await self.db.recover_lost():
                    self._wakeup.set()
                if tick % recover_every == 0 and await self.db.release_stepped_back_backoffs():
                    self._wakeup.set()
                if tick % renew_every == 0:  # other server processes may have moved a kind
                    self._placements = await self.db.placements()
                if tick % gc_every == 0:
                    await self.db.forget_idempotency_keys(self.config.idempotency_ttl_s)
            except StorageUnavailable as exc:
                logger.warning("housekeeping skipped a beat: %s", exc)

    async def _stop_cancelled(self) -> None:
        ids = list(self._attempts)
        if not ids:
            return
        still_ours = await self.db.still_running(ids)
        for task_id in ids:
            attempt = self._attempts.get(task_id)
            if task_id not in still_ours and attempt is not None and attempt.stop_reason is None:
                attempt.stop(StopReason.CANCELLED)

    async def _flush_progress(self) -> None:
        pending, self._live_progress = self._live_progress, {}
        await self.db.set_progress((task_id, *progress) for task_id, progress in pending.items())
