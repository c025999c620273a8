"""`make bench`: profile_app measured side by side with the seed's answers (see BENCHMARKS.md)."""
