"""The entry point of `dist/profile-app`, the single-file binary built by `make binary`.

Only the build uses it. The binary's command line is `python profile_app.py`'s:
`profile-app serve|seed|tasks ...`.
"""

import io
import sys

# Process kinds run in anyio's worker processes, which anyio starts as `sys.executable -u
# -m anyio.to_process`. In the binary, sys.executable is the binary itself: so that command
# line must run anyio's worker loop, before the command line parser sees it or anything
# prints. (The worker reuses the server's unpacked bundle, so its sys.path, which anyio
# sends it, is right; the __main__.__file__ it sends does not exist, so nothing re-runs.)
ANYIO_WORKER = ["-u", "-m", "anyio.to_process"]


def run_anyio_worker() -> None:
    # `-u`: the worker answers on stdout unbuffered, and the frozen interpreter has no -u.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "wb", closefd=False), write_through=True)
    from anyio.to_process import process_worker

    process_worker()


def main() -> int:
    import multiprocessing

    # `serve --workers N`: uvicorn starts its server processes with multiprocessing's spawn.
    multiprocessing.freeze_support()
    from profile_app.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    if sys.argv[1:] == ANYIO_WORKER:
        run_anyio_worker()
    else:
        raise SystemExit(main())
