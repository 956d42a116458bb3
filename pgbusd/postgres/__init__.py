"""The PostgreSQL side: the daemon's one LISTEN connection.

- :mod:`.listener`: the connect/backoff loop, the LISTEN set, the generation, a hand-off's split.
- :mod:`.relay`: the asyncpg connection that hands every notification to one sink, and the
  sink's states (held back, relayed, split) as one visible state machine.
- :mod:`.health`: health checks and self-NOTIFY probes.
"""
