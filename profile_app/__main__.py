"""`python -m profile_app ...`: the same command line as the `profile-app` console script."""

from profile_app.cli import main

raise SystemExit(main())
