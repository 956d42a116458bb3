"""pgbusd: one PostgreSQL LISTEN connection per host, relayed to local processes over a Unix
socket."""

__version__ = "0.1.0"
