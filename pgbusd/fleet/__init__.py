"""Fleet mode: one PostgreSQL listener for a whole fleet of hosts, through NATS JetStream.

The composition root (:mod:`pgbusd.app`) builds a role with one of two builders of
:mod:`~pgbusd.fleet.roles` (docs/fleet.md):

- ``roles.bridge(config) -> Bridge`` (``--publish``): the listener's tap
  (:class:`pgbusd.postgres.listener.Tap`) and the daemon's role (:class:`pgbusd.core.feed.Role`);
- ``roles.host(config, hub) -> HostSource`` (``--source``): the daemon's feed
  (:class:`pgbusd.core.feed.Feed`, in the PostgreSQL listener's place) and its role.

The modules, one concept each (the import arrows run down this list; the core never imports
this package, and only this package imports ``nats``, the optional ``fleet`` extra):

- :mod:`~pgbusd.fleet.subjects`: the stream's subjects and the rule for its name.
- :mod:`~pgbusd.fleet.schema`: what a stream message is (msgpack Structs: runs of notifications
  in the clients' encoding, ticks, checkpoints), the headers, the versioning rule, and
  :class:`~pgbusd.fleet.schema.StreamState`: lineage, generation and the per-channel seq
  vector, which every reader of the stream computes identically.
- :mod:`~pgbusd.fleet.termlog`: :class:`TermLog`, one publisher term as a pure state machine:
  stamping, runs, the fencing chain, what to (re)send, gaps. No I/O.
- :mod:`~pgbusd.fleet.natsconn`: connecting to NATS; the stream and the lease bucket, created
  when missing; the stream's last checkpoint.
- :mod:`~pgbusd.fleet.publisher`: :class:`Publisher`, a term log pumped into the stream.
- :mod:`~pgbusd.fleet.reader`: :class:`StreamReader`, the stream read in order from a sequence,
  across reconnects and server restarts, with gaps reported.
- :mod:`~pgbusd.fleet.lease`: :class:`PublisherLease`, one publisher among bridges (a key in a
  JetStream key-value bucket, TTL and compare-and-set).
- :mod:`~pgbusd.fleet.held`: :class:`HeldBuffer`, what a bridge received that the stream does
  not (yet) hold, and where the stream's frontier falls in it.
- :mod:`~pgbusd.fleet.markers`: a bridge's marker notifications (its second PostgreSQL
  connection, barriers).
- :mod:`~pgbusd.fleet.follower`: :class:`Follower`, a standby's view of the stream.
- :mod:`~pgbusd.fleet.takeover`: how a standby opens its term, and what it publishes first.
- :mod:`~pgbusd.fleet.publishing`: :class:`Term`, the publishing loop: lease kept, markers,
  demotion.
- :mod:`~pgbusd.fleet.bridge`: :class:`Bridge`, the bridge role: it holds what PostgreSQL
  delivers, publishes while it holds the lease, and takes over exactly where the previous
  publisher stopped (marker notifications), or with one generation step when it cannot.
- :mod:`~pgbusd.fleet.statefile`: a host's position, kept across restarts.
- :mod:`~pgbusd.fleet.hostview`: :class:`HostView`, what each stream message means for a host's
  hub (history, live, lineage, local steps, a lost place). No I/O.
- :mod:`~pgbusd.fleet.source`: :class:`HostSource`, the host role: the stream read into its
  view, the state file, the feed's and the role's faces.
- :mod:`~pgbusd.fleet.roles`: the two builders.
"""
