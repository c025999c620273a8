"""Schema-driven fuzzing: schemathesis against the /openapi.json of a real server.

Every phase (coverage, fuzzing, stateful) and every check runs, with a bounded number of
examples per operation and a fixed seed. The run must end with 0 failures: no 5xx, every
response's status, headers, content type and body as the document says, invalid data
rejected and valid data accepted. fuzz_hooks.py drops the two failures the contract
explains, and only those.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import Server

HERE = Path(__file__).resolve().parent.parent  # tests/, where the hooks live
MAX_EXAMPLES = 15


def test_schemathesis_finds_no_response_outside_the_document(db_path: Path, tmp_path: Path) -> None:
    server = Server(db_path).start()
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                "20261126",
                "--workers",
                "4",
                "--generation-database",
                "none",
                "--no-color",
                "--request-timeout",
                "10",
            ],
            cwd=tmp_path,  # its report directory, if any, lands here
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "fuzz_hooks.py")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        health = server.get("/health")
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", result.stdout)
    assert selected is not None and len(set(selected.groups())) == 1, result.stdout[-3_000:]
    assert health.status_code == 200
