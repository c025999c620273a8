"""The peers part of `make bench` (issue 20): arq, Celery, Dramatiq and procrastinate."""
