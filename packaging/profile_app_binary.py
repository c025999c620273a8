"""The entry point of `dist/profile-app`, the single-file binary built by `make binary`.

Only the build uses it. The binary's command line is `python profile_app.py`'s:
`profile-app serve|seed|tasks ...`.
"""

import contextlib
import ctypes
import io
import os
import shutil
import signal
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def same_program(pid: int, argv: bool) -> bool:
    """Is process `pid` this binary (and, with `argv`, started with this command line)?"""
    try:
        if os.readlink(f"/proc/{pid}/exe") != os.readlink("/proc/self/exe"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as theirs, open("/proc/self/cmdline", "rb") as ours:
            return not argv or theirs.read() == ours.read()
    except OSError:
        return False


def die_with_parent() -> bool:
    """Every process running the binary's Python code gets SIGTERM when its parent dies.

    A one-file binary runs as a launcher (the pid a supervisor knows), which unpacks the
    bundle, and a child that serves. Killed with -9, the launcher cannot pass the signal on:
    without this the child would go on serving, re-parented to init, and hold the port
    against the supervisor's restart. SIGTERM makes the child stop as it would for the
    supervisor: gracefully, within the shutdown grace. Returns True in that child (its
    parent is the launcher: the same binary with the same command line).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    # Python code of the binary only ever runs under the binary: a parent that is not it
    # means the launcher (or the server of a worker) died before prctl took effect.
    if os.getppid() != parent or not same_program(parent, argv=False):
        raise SystemExit("profile_app: the process that started this one is gone")
    return same_program(parent, argv=True)


def remove_orphaned_bundle(launcher: int) -> None:
    """The launcher removes the unpacked bundle when the child exits; if it was killed, the
    child removes it itself, so nothing unpacked outlives the service."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle and os.getppid() != launcher and os.path.basename(bundle).startswith("_MEI"):
        shutil.rmtree(bundle, ignore_errors=True)


def main() -> int:
    import multiprocessing

    # `serve --workers N`: uvicorn starts its server processes with multiprocessing's spawn.
    multiprocessing.freeze_support()
    from profile_app.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    launched = os.getppid()
    under_launcher = die_with_parent()
    if sys.argv[1:] == ANYIO_WORKER:
        run_anyio_worker()
    else:
        try:
            status = main()
        finally:
            if under_launcher:
                with contextlib.suppress(OSError):
                    remove_orphaned_bundle(launched)
        raise SystemExit(status)
