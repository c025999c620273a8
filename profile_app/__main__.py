"""`python -m profile_app ...`: the same command line as the `profile-app` console script."""

from profile_app.cli import main

# Worker processes import the server's __main__ module by path (as anyio's do): the guard
# keeps them from running the command line again.
if __name__ == "__main__":
    raise SystemExit(main())
