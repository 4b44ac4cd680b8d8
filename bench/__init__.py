"""Benchmarks (`make bench`): dispatch overhead (B1), makespan (B2) and the lock (B3).

Not part of the test suite and never a pass/fail gate on time: it prints a table and JSON
(also written to .run/bench.json). It runs on resources of its own (bench.env) and stops every
worker process it started.

This module stays free of Django imports: the raw Celery worker imports bench.rawapp.
"""


class BenchError(Exception):
    """The benchmark could not measure something; printed as is."""
