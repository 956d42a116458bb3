"""A live systemd for the test suite, booted where it cannot touch the host.

The machine runs no systemd as PID 1, yet what the unit files promise (readiness, the watchdog,
socket activation, credentials, the hardening) only shows under a running one. A lab boots
Debian's systemd as PID 1 of private PID, mount, network, UTS, IPC and cgroup namespaces, on an
overlay of ``/`` whose writes go to a tmpfs, with the host's services masked. This is the recipe
of the shared notes (``SYSTEMD_LAB.md``), which also say what a systemd booted on the real root
did (it emptied ``/tmp``, stopped the shared PostgreSQL, started every service of the host),
with a few more walls:

- PID 1 sees ``/proc/sys`` and ``/sys`` read-only (it would raise ``fs.file-max`` and
  ``fs.nr_open`` for the whole machine otherwise), a ``/dev`` of its own with a handful of
  device nodes (not the host's ``/dev/shm``), and a cgroup2 subtree of its own, entered through
  a cgroup namespace, so that its units are not the host's cgroups.
- Besides the units the notes list, every unit the host enables and every generator is masked:
  the SysV generator would start the scripts of ``/etc/init.d``, ``postgresql-generator`` the
  shared cluster.
- PostgreSQL is reached through Unix-socket directories bound read-only into the lab (TCP to
  127.0.0.1 does not cross the network namespace, and the host's ``/run`` is hidden under the
  lab's own).

Everything the lab writes lands in the tmpfs and goes with its mount namespace. It reads the
host's files through the overlay's lower layer; the host must not write to what the lab uses while
it runs (undefined for overlayfs), so what it needs (the pgbusd virtualenv, a copy of the
checkout) is prepared in the lab's directory before it boots and never changed after.

:class:`LabHome` is that directory (``/tmp/pgblab*``): a copy of the checkout, the virtualenv
built by the README's command, the boot scripts. :meth:`LabHome.boot` starts a
:class:`SystemdLab` and, on leaving, kills its PID 1 by the pid recorded at boot (the kernel then
ends every process of the namespace), removes its cgroup and checks that nothing is left: no
process of the lab, no mount on the host, kernel settings as before, the shared PostgreSQL still
answering. A run killed outright still takes the lab down (``unshare --kill-child``, and
``setpriv --pdeathsig`` on unshare itself); the next run removes the directory and cgroup such a
run leaves (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = "/lib/systemd/systemd"
#: Where the README and the units put the daemon's virtualenv.
VENV = "/opt/pgbusd"
#: The environment of every command run in the lab (not the test's: no pyenv, no PIP_*).
LAB_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
#: What the lab's copy of the checkout holds: what `pip install ./client .` and the install
#: procedure need. A copy, because pip leaves build/ directories in the tree it builds.
CHECKOUT_PARTS = ("pyproject.toml", "README.md", "client", "pgbusd", "systemd")
#: Units that must never start in the lab: those SYSTEMD_LAB.md lists, and a few more that
#: would mount kernel file systems or look at block devices. Every unit the host enables is
#: masked too (:func:`host_enabled_units`).
MASKED_UNITS = (
    "postgresql.service", "postgresql@.service", "mariadb.service", "mysql.service",
    "redis-server.service", "redis.service", "nats-server.service", "mosquitto.service",
    "rabbitmq-server.service", "epmd.socket", "epmd.service", "cron.service", "ssh.service",
    "getty@.service", "console-getty.service", "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service", "systemd-tmpfiles-clean.timer",
    "systemd-tmpfiles-clean.service", "systemd-timesyncd.service", "systemd-udevd.service",
    "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-sysctl.service",
    "systemd-modules-load.service", "systemd-remount-fs.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-random-seed.service", "systemd-hwdb-update.service", "ldconfig.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer",
    "logrotate.timer", "fstrim.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "systemd-pstore.service", "systemd-logind.service", "systemd-repart.service",
    "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service", "kmod-static-nodes.service",
    "systemd-journald-audit.socket", "sys-kernel-config.mount", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
)  # fmt: skip
#: Host units the lab keeps although the host enables them (a system bus is part of a system).
KEPT_UNITS = frozenset({"dbus.service", "dbus.socket"})
GENERATOR_DIRS = (
    "/etc/systemd/system-generators",
    "/run/systemd/system-generators",
    "/usr/local/lib/systemd/system-generators",
    "/lib/systemd/system-generators",
    "/usr/lib/systemd/system-generators",
)
#: Kernel settings that are the host's alone; a lab must leave them as they were.
HOST_SYSCTLS = (
    "fs/file-max", "fs/nr_open", "kernel/pid_max", "kernel/core_pattern", "kernel/hostname",
)  # fmt: skip
#: Seconds between two looks at something in the lab (each costs a process or two).
POLL = 0.1
#: Prefix of lab directories (in the temporary directory) and of lab cgroups.
PREFIX = "pgblab"


class LabError(Exception):
    """The lab did not boot, or a command in it failed."""


# -- can this machine run a lab? ---------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (``/sys/fs/cgroup/unified`` on a hybrid host)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def cgroup_parent() -> Path:
    """The cgroup2 directory labs are created in: the one this process is in."""
    mount = cgroup2_mount()
    assert mount is not None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return mount


def unavailable_reason() -> str | None:
    """Why this machine cannot run a lab, or None if it can (it tries the mounts it needs)."""
    if os.geteuid() != 0:
        return "the systemd lab needs root (namespaces, mounts, chroot)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd at {SYSTEMD}"
    for tool in ("unshare", "nsenter", "setpriv", "chroot", "mount", "pg_isready"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access("/usr/bin/python3", os.X_OK):
        return "no /usr/bin/python3 for the daemon's virtualenv"
    if "\toverlay\n" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted"
    with tempfile.TemporaryDirectory(prefix=PREFIX + "-probe") as probe:
        mnt = shlex.quote(probe)
        script = (
            f"mount -t tmpfs tmpfs {mnt} && mkdir {mnt}/u {mnt}/w {mnt}/r && "
            f"mount -t overlay overlay -o lowerdir=/,upperdir={mnt}/u,workdir={mnt}/w {mnt}/r"
        )
        flags = ["--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "--cgroup"]
        try:
            result = subprocess.run(
                ["unshare", *flags, "sh", "-ec", script],
                capture_output=True, text=True, timeout=60, env=LAB_ENV,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "probing the namespaces and the overlay took over 60 s"
        if result.returncode != 0:
            return f"cannot mount an overlay of / in private namespaces: {result.stderr.strip()}"
    return None


# -- leftovers of killed runs ------------------------------------------------------------------


def _lock(path: Path) -> IO[bytes] | None:
    """An exclusive lock on ``path`` if nobody holds it (the open file holds it)."""
    handle = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def remove_cgroup(path: Path, timeout: float = 30.0) -> None:
    """Remove a cgroup and its children once no process is left in them."""
    if not path.exists():
        return
    events = path / "cgroup.events"
    deadline = time.monotonic() + timeout
    while "populated 1" in events.read_text():
        if time.monotonic() > deadline:
            raise LabError(f"processes are still in {path}: {(path / 'cgroup.procs').read_text()}")
        time.sleep(0.05)
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        child.rmdir()
    path.rmdir()


def remove_stale() -> None:
    """Remove the directories and cgroups of labs whose run was killed (their lock is free)."""
    parent = cgroup_parent()
    for home in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        lock = home / ".lock"
        if not lock.exists() or (handle := _lock(lock)) is None:
            continue  # in use, or being created
        with handle:
            for cgroup in parent.glob(f"{home.name}.*"):
                if "populated 0" in (cgroup / "cgroup.events").read_text():
                    remove_cgroup(cgroup)
            shutil.rmtree(home, ignore_errors=True)


# -- the host, before and after ----------------------------------------------------------------


def pg_isready(host: str, port: int = 5432) -> bool:
    result = subprocess.run(
        ["pg_isready", "-q", "-h", host, "-p", str(port)], timeout=30, check=False
    )
    return result.returncode == 0


def host_state() -> dict[str, str]:
    """What a lab must leave as it found it: kernel settings of the host."""
    return {name: Path("/proc/sys", name).read_text() for name in HOST_SYSCTLS}


def host_enabled_units() -> set[str]:
    """Every unit the host enables (wants/requires links) or starts by a SysV runlevel link."""
    names: set[str] = set()
    etc = Path("/etc/systemd/system")
    for deps in [*etc.glob("*.wants"), *etc.glob("*.requires")]:
        names.update(p.name for p in deps.iterdir())
    for rc in Path("/etc").glob("rc[2-5].d"):
        names.update(p.name[3:] + ".service" for p in rc.iterdir() if p.name.startswith("S"))
    return names - KEPT_UNITS


# -- the lab's directory on the host -----------------------------------------------------------


class LabHome:
    """The lab's temporary directory on the host: lock, checkout copy, virtualenv, labs.

    Everything a lab needs from the host is prepared here before a lab boots: the host must not
    write to files the overlay shows while it is mounted. :meth:`remove` deletes it all.
    """

    def __init__(self) -> None:
        remove_stale()
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=tempfile.gettempdir()))
        # Locked before it has its name, so that remove_stale() never sees it free.
        unnamed = self.path / ".lock.new"
        unnamed.touch()
        self._lock: IO[bytes] | None = _lock(unnamed)
        unnamed.rename(self.path / ".lock")
        self._sigterm: Any = None
        self.checkout = self.path / "src"
        self.venv: Path | None = None
        try:
            # SIGTERM raises KeyboardInterrupt while a home exists, so that pytest tears the
            # labs down on it as on Ctrl-C (after a SIGKILL, the next run removes the home).
            if threading.current_thread() is threading.main_thread():
                self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
            # PostgreSQL (as its own OS user) makes sockets in directories below.
            self.path.chmod(0o711)
            for part in CHECKOUT_PARTS:
                source, target = REPO / part, self.checkout / part
                if source.is_dir():
                    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
                    shutil.copytree(source, target, ignore=ignore)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        except BaseException:
            self.remove()
            raise

    def build_venv(self, command: str, timeout: float = 600.0) -> Path:
        """Run the README's command that creates ``/opt/pgbusd`` and installs pgbusd into it,
        in the checkout copy, with ``/opt`` overlaid by a directory of this home: the virtualenv
        says ``/opt/pgbusd`` in every path but lands here, and each lab gets a copy of it.

        The command runs with the test's environment (its ``PATH`` may reach an interpreter
        under ``/root``, as a root shell's would): the README must name one the daemon's user
        can run.
        """
        upper, work = self.path / "opt" / "upper", self.path / "opt" / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        script = (
            f"mount -t overlay {PREFIX}-opt -o lowerdir=/opt,upperdir={upper},workdir={work} /opt"
            f" && cd {shlex.quote(str(self.checkout))} && {command}"
        )
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise LabError(f"{command!r} failed:\n{result.stdout}\n{result.stderr}")
        self.venv = upper / "pgbusd"
        return self.venv

    def directory(self, name: str, owner: str | None = None) -> Path:
        """A new directory in this home, e.g. for a socket bound into a lab."""
        path = self.path / name
        path.mkdir(mode=0o755)
        if owner is not None:
            shutil.chown(path, owner, owner)
        return path

    @contextlib.contextmanager
    def boot(self, name: str, binds: Mapping[str, Path] | None = None) -> Iterator[SystemdLab]:
        """A running lab (named ``name`` in this home), torn down and checked on leaving."""
        assert self.venv is not None, "build_venv() first"
        before = host_state()
        lab = SystemdLab(self, name, binds or {})
        try:
            lab.boot()
            yield lab
        finally:
            lab.shutdown()
        problems = lab.leftovers() + [
            f"{name} changed from {before[name]!r} to {now!r}"
            for name, now in host_state().items()
            if now != before[name]
        ]
        if not (self.path / ".lock").exists():
            problems.append(f"{self.path} was emptied while the lab ran")
        if not (pg_isready("127.0.0.1") and pg_isready("/run/postgresql")):
            problems.append("the shared PostgreSQL no longer answers (pg_isready)")
        assert not problems, "the lab left something behind: " + "; ".join(problems)

    def __enter__(self) -> LabHome:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the lab -----------------------------------------------------------------------------------


class SystemdLab:
    """A systemd running as PID 1 of private namespaces on an overlay of ``/``.

    Commands run in it as root (or as ``user=``) through ``nsenter``; its files are reachable
    from the host as :meth:`path` (``/proc/PID/root/...``), which is the lab's view, so writes
    there land in the overlay's tmpfs.
    """

    def __init__(self, home: LabHome, name: str, binds: Mapping[str, Path]) -> None:
        self.home = home
        self.name = name
        self.dir = home.path / name
        self.binds = dict(binds)
        self.cgroup = cgroup_parent() / f"{home.path.name}.{name}"
        self.pid = 0
        self.pidns = ""
        self._unshare: subprocess.Popen[bytes] | None = None

    # -- boot and teardown -------------------------------------------------------------------

    def _boot_script(self) -> str:
        """The script that becomes the lab's PID 1: mounts, masks, then exec systemd."""
        assert self.home.venv is not None
        q = shlex.quote
        masks = sorted(set(MASKED_UNITS) | host_enabled_units())
        generators = sorted(
            {p.name for d in GENERATOR_DIRS if os.path.isdir(d) for p in Path(d).iterdir()}
        )
        binds = "\n".join(f"ro_bind {q(str(h))} {q(i)}" for i, h in self.binds.items())
        return f"""set -eu
LAB={q(str(self.dir / "mnt"))}
R="$LAB/root"
ro_bind() {{ mkdir -p "$R$2"; mount --bind "$1" "$R$2"; mount -o remount,bind,ro "$R$2"; }}

# Nothing mounted here reaches the host; the lab's files live in a tmpfs.
mount --make-rprivate /
mount -t tmpfs -o size=2g,mode=0700 {PREFIX} "$LAB"
mkdir "$LAB/upper" "$LAB/work" "$R" "$LAB/upper/opt"
# The daemon's virtualenv goes into the upper layer before the overlay exists.
cp -R --preserve=mode,ownership,timestamps {q(str(self.home.venv))} "$LAB/upper{VENV}"
mount -t overlay {PREFIX} -o "lowerdir=/,upperdir=$LAB/upper,workdir=$LAB/work" "$R"

# Kernel interfaces: the host's settings read-only, the lab's own cgroup subtree.
mount -t proc proc "$R/proc"
ro_bind "$R/proc/sys" /proc/sys
if [ -e "$R/proc/sysrq-trigger" ]; then ro_bind "$R/proc/sysrq-trigger" /proc/sysrq-trigger; fi
mount -t sysfs -o ro sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"

# A /dev of its own.
mount -t tmpfs -o mode=0755,size=4m,nosuid {PREFIX}-dev "$R/dev"
mknod -m 0666 "$R/dev/null" c 1 3; mknod -m 0666 "$R/dev/zero" c 1 5
mknod -m 0666 "$R/dev/full" c 1 7; mknod -m 0666 "$R/dev/random" c 1 8
mknod -m 0666 "$R/dev/urandom" c 1 9; mknod -m 0666 "$R/dev/tty" c 5 0
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev {PREFIX}-shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"

# PostgreSQL's socket directories, read-only.
{binds}

# The host's services, and every generator, masked.
cd "$R/etc/systemd/system"
for unit in {" ".join(q(u) for u in masks)}; do ln -sf /dev/null "$unit"; done
mkdir -p "$R/etc/systemd/system-generators" && cd "$R/etc/systemd/system-generators"
for generator in {" ".join(q(g) for g in generators)}; do ln -sf /dev/null "$generator"; done
cd /

echo {uuid.uuid4().hex} > "$R/etc/machine-id"
echo {q(self.name)}-lab > "$R/etc/hostname"
mkdir -p "$R/etc/systemd/journald.conf.d"
printf '[Journal]\\nStorage=volatile\\n' > "$R/etc/systemd/journald.conf.d/lab.conf"

# systemd leaves mount propagation alone in a container, and a shared root is what it expects
# (credentials are mounted in a child namespace and propagate back).
mount --make-rshared "$R"
exec chroot "$R" /usr/bin/env container={PREFIX} {SYSTEMD} --system --unit=multi-user.target
"""

    def boot(self, timeout: float = 120.0) -> None:
        self.dir.mkdir()
        (self.dir / "mnt").mkdir()
        script = self.dir / "boot.sh"
        script.write_text(self._boot_script())
        self.cgroup.mkdir()
        unshare = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--net",
                   "--uts", "--ipc", "--cgroup"]  # fmt: skip
        with open(self.dir / "boot.log", "wb") as log:
            # In the lab's cgroup before unshare, whose cgroup namespace starts there; in a
            # session of its own, so that a Ctrl-C at the terminal does not reach PID 1 (SIGINT
            # means ctrl-alt-del to systemd).
            self._unshare = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"),
                 "setpriv", "--pdeathsig=KILL", *unshare, "sh", str(script)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(LAB_ENV),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        self.pid = self._wait_for_pid1(deadline)
        self.pidns = os.readlink(f"/proc/{self.pid}/ns/pid")
        # systemctl talks to PID 1 through its private socket, which exists once it is up.
        while not self.path("/run/systemd/private").exists():
            if time.monotonic() > deadline or self._unshare.poll() is not None:
                raise LabError("the lab's systemd never opened /run/systemd/private")
            time.sleep(0.02)
        result = self.run(
            "systemctl", "is-system-running", "--wait", check=False,
            timeout=max(1.0, deadline - time.monotonic()),
        )  # fmt: skip
        if result.stdout.strip() != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise LabError(
                f"the lab's systemd is not running: {result.stdout}{result.stderr}\n"
                f"failed units:\n{failed}"
            )

    def _wait_for_pid1(self, deadline: float) -> int:
        """The pid (on the host) of the lab's systemd, once the boot script has exec'ed it."""
        assert self._unshare is not None
        unshare = self._unshare.pid
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise LabError(
                    f"the lab did not boot (exit {self._unshare.returncode}):\n"
                    + (self.dir / "boot.log").read_text(errors="replace")
                )
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split():
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    if argv[:2] == [SYSTEMD.encode(), b"--system"]:
                        return int(child)
            time.sleep(0.02)
        raise LabError("the lab's systemd did not start in time")

    def shutdown(self) -> None:
        """Kill PID 1 by its pid (the kernel ends every process of the namespace), or unshare
        if the lab never got that far (--kill-child takes PID 1 with it); remove the cgroup."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        elif self._unshare is not None:
            self._unshare.kill()
        if self._unshare is not None:
            self._unshare.wait(60)
        remove_cgroup(self.cgroup)

    def leftovers(self) -> list[str]:
        """What of the lab is still on the host after :meth:`shutdown` (nothing, normally)."""
        problems = []
        deadline = time.monotonic() + 30
        while (left := self._processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            problems.append(f"processes of the lab remain: {left}")
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(self.home.path))
        ]
        if mounts:
            problems.append(f"mounts remain on the host: {mounts}")
        if self.cgroup.exists():
            problems.append(f"the cgroup {self.cgroup} remains")
        return problems

    def _processes(self) -> list[str]:
        """Processes of the lab's PID namespace (its systemd --system first among them)."""
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and os.readlink(entry / "ns" / "pid") == self.pidns:
                    found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()!r}")
        return found

    # -- running things inside ---------------------------------------------------------------

    def path(self, inside: str) -> Path:
        """The host's path to ``inside`` as the lab sees it (its overlay root)."""
        return Path(f"/proc/{self.pid}/root{inside}")

    def command(self, argv: Sequence[str], user: str | None = None, cwd: str = "/") -> list[str]:
        """``argv`` run in the lab's namespaces and root, as root or as ``user`` (with that
        user's groups, as after a login). The process dies with the nsenter that runs it."""
        pid = str(self.pid)
        cmd = ["nsenter", "-t", pid, "-m", "-p", "-n", "-u", "-i",
               f"--root=/proc/{pid}/root", f"--wd=/proc/{pid}/root{cwd}",
               "setpriv", "--pdeathsig=KILL"]  # fmt: skip
        if user is not None:
            cmd += [f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return [*cmd, *argv]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        cwd: str = "/",
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(argv, user, cwd), input=input, capture_output=True, text=True,
            timeout=timeout, env=dict(LAB_ENV), check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise LabError(
                f"{shlex.join(argv)} exited {result.returncode} in the lab:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)  # type: ignore[arg-type]

    def python(self, source: str, *args: str, user: str | None = None) -> list[str]:
        """The command running ``source`` with the installed pgbusd's interpreter."""
        return self.command([f"{VENV}/bin/python", "-c", source, *args], user)

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", "--no-pager", *args, check=check).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    async def wait_unit(
        self,
        unit: str,
        what: str,
        predicate: Callable[[dict[str, str]], bool],
        properties: Sequence[str] = ("ActiveState", "SubState", "MainPID", "StatusText"),
        timeout: float = 60.0,
    ) -> dict[str, str]:
        """Poll ``systemctl show`` until ``predicate`` holds for ``unit``'s properties."""
        last: dict[str, str] = {}

        def holds() -> dict[str, str] | None:
            last.update(self.show(unit, *properties))
            return dict(last) if predicate(last) else None

        try:
            shown: dict[str, str] = await wait_until(holds, timeout, POLL, f"{unit}: {what}")
        except AssertionError as exc:
            journal = self.journal("-u", unit, "-n", "30")
            raise AssertionError(f"{exc}; last: {last}\n{journal}") from None
        return shown

    def cursor(self) -> str:
        """The journal's position now, for :meth:`journal` ``--after-cursor``."""
        out = self.run("journalctl", "--show-cursor", "-n", "0", "--quiet").stdout
        return out.rsplit("-- cursor: ", 1)[1].strip()

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", *args).stdout

    async def wait_journal(self, text: str, *args: str, timeout: float = 60.0) -> str:
        """The journal (``journalctl -o cat ARGS``) once it holds ``text``: journald writes
        what services say a moment after they said it."""

        def holding() -> str | None:
            journal = self.journal(*args)
            return journal if text in journal else None

        found: str = await wait_until(holding, timeout, POLL, f"{text!r} in the journal")
        return found

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def remove(self, inside: str) -> None:
        path = self.path(inside)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# -- procedures printed in the documentation ---------------------------------------------------


def shell_blocks(markdown: str, heading: str) -> list[str]:
    """The ```sh blocks of the section ``heading`` (up to the next heading of its level)."""
    level = heading.split(" ", 1)[0]
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find(f"\n{level} ", start + 1)
    section = markdown[start : end if end >= 0 else None]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)


def logical_lines(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line)
