"""A throwaway Postgres cluster for measurements that must see only their own activity.

WAL position, backend CPU and ``pg_stat_statements`` are cluster-wide: on a shared server any
other client's work would be counted as ours. The cluster comes from the machine's own Postgres
binaries (``initdb``), listens only on a unix socket in a temporary folder, and is removed on
exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from saga.errors import ConfigurationError


def _bindir() -> Path:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent  # a symlink's target has the other tools too
    # Debian and Ubuntu keep server binaries out of PATH, one folder per major version.
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True)
    if not found:
        raise ConfigurationError(
            "no Postgres server binaries (initdb) found: install the postgresql package, "
            "or pass --database-url to measure on an existing server"
        )
    return Path(found[0]).parent


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


def _free_port() -> int:
    # The port only names the socket file; nothing listens on TCP.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PrivatePostgres:
    url: str  # a superuser connection to the ``postgres`` database
    postmaster_pid: int
    data_dir: Path
    bindir: Path

    def database_url(self, dbname: str) -> str:
        return self.url.replace("/postgres?", f"/{dbname}?", 1)

    def cpu_seconds(self) -> float:
        """User + system CPU of the whole cluster so far: the postmaster, its live children, and
        the children it has reaped (their time is added to its cutime/cstime)."""
        hz = os.sysconf("SC_CLK_TCK")
        total = _ticks(self.postmaster_pid, children_too=True)
        for pid in _children(self.postmaster_pid):
            total += _ticks(pid, children_too=False)
        return total / hz

    def wal_records(self, start: str, end: str) -> dict[str, tuple[int, int, int]]:
        """WAL between two LSNs by record type: (count, record bytes, full-page-image bytes),
        from ``pg_waldump --stats=record``; empty when pg_waldump cannot read it."""
        waldump = self.bindir / "pg_waldump"
        if not waldump.exists():
            return {}
        done = subprocess.run(
            [
                self.bindir / "pg_waldump",
                "--stats=record",
                "-p",
                self.data_dir / "pg_wal",
                "-s",
                start,
                "-e",
                end,
            ],
            capture_output=True,
            text=True,
        )
        found: dict[str, tuple[int, int, int]] = {}
        for line in done.stdout.splitlines():
            m = _WALDUMP_LINE.match(line)
            if m:
                found[m["type"]] = (int(m["n"]), int(m["rec"]), int(m["fpi"]))
        return found


_WALDUMP_LINE = re.compile(
    r"^(?P<type>\S+/\S+)\s+(?P<n>\d+)\s+\(\s*[\d.]+\)\s+(?P<rec>\d+)\s+\(\s*[\d.]+\)"
    r"\s+(?P<fpi>\d+)"
)


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 on; comm may hold spaces


def _ticks(pid: int, *, children_too: bool) -> int:
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0  # exited meanwhile: the postmaster's cutime has it
    used = int(f[11]) + int(f[12])  # utime, stime
    return used + (int(f[13]) + int(f[14]) if children_too else 0)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def private_postgres(max_connections: int = 200) -> Iterator[PrivatePostgres]:
    bindir = _bindir()
    # Postgres refuses to run as root; as root, run it as the postgres system user.
    user = "postgres" if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="saga-pg-") as tmp:
        data, sock = Path(tmp) / "data", Path(tmp)
        if user is not None:
            shutil.chown(tmp, user)
        subprocess.run(
            [bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
            check=True,
            capture_output=True,
            user=user,
        )
        port = _free_port()
        options = (
            f"-c listen_addresses='' -k {sock} -p {port} -c max_connections={max_connections} "
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all "
            "-c fsync=on -c synchronous_commit=on"
        )
        subprocess.run(
            [bindir / "pg_ctl", "-D", data, "-o", options, "-l", Path(tmp) / "log", "-w", "start"],
            check=True,
            capture_output=True,
            user=user,
        )
        try:
            pid = int((data / "postmaster.pid").read_text().split()[0])
            url = f"postgresql://postgres@/postgres?host={sock}&port={port}"
            yield PrivatePostgres(url, pid, data, bindir)
        finally:
            subprocess.run(
                [bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                capture_output=True,
                user=user,
            )
