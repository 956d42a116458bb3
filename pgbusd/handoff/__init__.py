"""Hand-off reload: a running daemon hands its socket, its lineage and its stream to a successor.

``pgbusctl reload``, SIGHUP and ``systemctl reload`` replace the running daemon (the
*predecessor*) with a new process started from the code installed on disk (the *successor*),
so that installing a new version and reloading is an upgrade. Clients lose nothing, see nothing
twice and their generation does not move. How:

1. The predecessor (connected to PostgreSQL: there is no stream to split otherwise) starts the
   successor as its child, with the listening socket, its lock file and the metrics socket
   inherited, a socketpair for the control messages (:mod:`.protocol`), and the name of a fresh
   *marker channel* in its environment.
2. The successor reads its configuration (a refused one, or one that changes what a reload
   cannot, ends the reload here), connects to PostgreSQL and LISTENs on every channel and on the
   marker channel, holding back everything it receives; then it says ``Listening``.
3. The predecessor ships its replay buffer as it is (``Replay``: the bulk of it, while it
   still relays; the successor takes it meanwhile). Then it freezes its channel set (channels
   on demand wait), sends ``Split``: the marker's payload and every channel it listens on now,
   which the successor LISTENs on too before it says ``Ready``. Then the predecessor LISTENs
   on the marker channel and commits one NOTIFY on it. PostgreSQL delivers every notification
   to every listener from one queue, in commit order, so the marker stands at the same place
   in both streams: the predecessor relays everything before it and holds back everything
   after it; the successor drops everything it held before it and keeps everything after it.
4. At the marker the predecessor seals what it relayed and sends its ``State``: lineage (daemon
   id), generation, every channel's seq, and the frames its replay buffer kept since the
   ``Replay``. The successor takes it, LISTENs on any channel of the state it does not listen
   on yet, relays what it kept after the marker with the seqs that follow, starts accepting
   clients on the inherited socket, and says ``Serving``.
5. The predecessor stops accepting, tells systemd the successor is the main process now
   (``MAINPID=``), says ``Main`` to the successor (which then speaks to systemd and owns the
   socket file), tells its clients ``Goodbye(reload)`` and exits 0. The clients re-attach at
   once and resume: the same daemon id and generation, and the replay buffer covers whatever
   they had not read yet. A subscribe that needed a new LISTEN and arrived during the split is
   not answered by the predecessor: the client sends it again to the successor.

Until the ``State`` is sent nothing is final: if the successor fails at any step (a
configuration it refuses, an import error in new code, PostgreSQL unreachable within
``--reload-timeout``, the marker never seen), the predecessor relays what it held back and
serves on as if nothing had happened, and the reload reports why.

Once the ``State`` is out the successor may serve at any moment, and exactly one process must
end up serving, reachable at the socket. So the predecessor never serves on beside a successor
that might: it waits for the successor's word (``Serving``: it hands over; ``Abort`` or the
successor's exit: it serves on), however late it reads it (a predecessor frozen past its
timeout finds ``Serving`` waiting and hands over). Without a word in time it SIGKILLs the
successor and serves on once it is gone. A successor that served a few clients meanwhile
numbered the stream exactly as the predecessor does (the same state, the same stream), so they
resume on the predecessor with nothing to reconcile. A successor takes the socket file for its
own (it unlinks it when it stops) only once the predecessor said ``Main`` or is gone; one told
to abort after it served says ``Goodbye(reload)`` to its clients and leaves the socket to its
predecessor.
"""

from pgbusd.handoff.protocol import (
    PROTOCOL,
    Abort,
    Control,
    ControlMessage,
    HandoffError,
    Inherited,
    Listening,
    Main,
    Ready,
    Replay,
    Serving,
    Split,
    State,
    daemon_command,
    inherited,
    report_failure,
)

__all__ = [
    "PROTOCOL",
    "Abort",
    "Control",
    "ControlMessage",
    "HandoffError",
    "Inherited",
    "Listening",
    "Main",
    "Ready",
    "Replay",
    "Serving",
    "Split",
    "State",
    "daemon_command",
    "inherited",
    "report_failure",
]
