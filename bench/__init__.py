"""pgbusd benchmarks: raw asyncpg listeners and pgbus clients measured side by side, in one run.

``make bench`` (or ``python -m bench``) runs every section; ``docs/benchmarks.md`` describes the
method. Nothing here is imported by the daemon or the client library.
"""
