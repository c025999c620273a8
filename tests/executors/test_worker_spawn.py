"""A worker process starts in a process group of its own, in the server's session
(worker_spawn.py), on each event loop the server may run: asyncio's and uvloop's."""

from __future__ import annotations

import os
import sys

import pytest

from profile_app.executors.worker_spawn import open_worker_process

pytestmark = pytest.mark.anyio

REPORT = "import os; print(os.getsid(0), os.getpgid(0), os.getpid())"


@pytest.fixture(params=[("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param


async def test_a_worker_gets_a_process_group_of_its_own_in_the_servers_session() -> None:
    process = await open_worker_process([sys.executable, "-c", REPORT])
    async with process:
        assert process.stdout is not None
        output = b""
        async for chunk in process.stdout:
            output += chunk
        assert await process.wait() == 0
    session, group, pid = map(int, output.split())
    assert session == os.getsid(0)  # with autogroup scheduling: the server's scheduling group
    assert group == pid != os.getpgid(0)  # a signal to the server's process group misses it
