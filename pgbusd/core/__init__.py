"""The core: where notifications go once received, whatever their source.

- :mod:`.feed`: what the core needs from "where notifications come from" (:class:`~.feed.Feed`:
  the PostgreSQL listener, or a fleet host's stream) and from a client (:class:`~.feed.Subscriber`).
- :mod:`.hub`: channel -> subscribers; one encode per notification, one frame per channel per
  loop turn, the lineage, its generation and every channel's seq.
- :mod:`.replay`: the replay buffer, so that a client that comes back resumes without a gap.
- :mod:`.channels`: which channels are listened to, and when (channels on demand).

Nothing here knows PostgreSQL, sockets, the fleet or a hand-off.
"""
