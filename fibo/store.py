"""The MLflow store before a run uses it: a server that answers, a SQLite file created and migrated once.

* :func:`check_tracking_server`: an ``http(s)://`` tracking URI is probed (``<uri>/health``) so that an
  unreachable server is named within seconds instead of MLflow retrying for minutes;
* :func:`prepare_store`: a ``sqlite:///`` store is created or migrated under an inter-process file
  lock, and a store left half-migrated (``_alembic_tmp_*`` tables from migrations that raced) is
  repaired or named with the fix.

Imports neither Lightning nor MLflow at module level (``fibo-compare`` and ``fibo-run`` call these
first). :mod:`fibo.tracking` re-exports all three names.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("fibo")


class TrackingError(RuntimeError):
    """The MLflow store or server cannot be used; the message names it and what to check."""


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when ``uri`` is an MLflow server (``http(s)://``) that does not answer: one GET of
    ``<uri>/health`` (the MLflow server's health endpoint; any HTTP answer counts as reachable) within
    ``timeout_s`` seconds. Other URIs (``sqlite:``, ``file:``, databricks) are not probed. Without it
    MLflow retries for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``).

    Raises:
        TrackingError: naming the URI, the reason and what to check.
    """
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}, probed {uri.rstrip('/')}/health for {timeout_s:g} s): "
            f"start it (mlflow server --backend-store-uri sqlite:///mlflow.db --host <host> --port <port>) or set "
            f"MLFLOW_TRACKING_URI / logger.tracking_uri to a server that runs (unset: the local SQLite store); "
            f"MLflow's own waits are set by MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` URI (None for other URIs and in-memory stores)."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path)  # sqlite:////abs/path or sqlite:///relative/path


def absolute_sqlite_uri(uri: str, base: str | Path) -> str:
    """``uri`` with a relative ``sqlite:///<path>`` made absolute against ``base`` (the launch
    directory): ``sqlite:///rel.db`` -> ``sqlite:////<base>/rel.db``, a ``?query`` kept. Absolute
    SQLite paths, in-memory stores and other URIs (``http://``, ``file:``) come back unchanged.
    Without it a relative store follows the working directory, which ``hydra.job.chdir=true`` moves
    into the run folder (a new store per run)."""
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"sqlite:///{Path(base).expanduser().resolve() / db}" + (f"?{query}" if query else "")


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def prepare_store(uri: str, lock_timeout_s: float = 600) -> None:
    """Create or migrate an MLflow SQLite store once, under an inter-process lock (``<db>.lock``,
    :mod:`filelock`), before any run touches it: runs started together on a new store otherwise all
    run MLflow's schema migration at once and crash, leaving ``_alembic_tmp_<table>`` tables behind.

    A store left half-migrated that way is repaired: holding no runs, it is recreated; holding runs,
    each leftover ``_alembic_tmp_<t>`` whose table ``<t>`` still exists is dropped (the original holds
    the data) and the migration rerun (``mlflow db upgrade``, MLflow's public CLI). Other URIs: nothing.

    Raises:
        TrackingError: the store cannot be repaired safely (the message names the table and the fix),
            or another process holds the lock for ``lock_timeout_s`` seconds.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    from filelock import FileLock

    from filelock import Timeout

    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{db}.lock", timeout=lock_timeout_s):
            _repair_half_migrated(db, uri)
            _open_store(uri, db)
    except Timeout:
        raise TrackingError(f"MLflow store {db}: another process has held {db}.lock for {lock_timeout_s:g} s while "
                            f"creating or migrating the store; wait for it, or find the hung process (the lock is "
                            f"released when its holder exits)") from None


def _open_store(uri: str, db: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates / checks the schema
    except MlflowException as err:
        if "out-of-date database schema" not in str(err):
            raise
        _upgrade(uri, db)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _upgrade(uri: str, db: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise TrackingError(f"MLflow store {db} could not be migrated ({tail}): back it up, then run "
                            f"`mlflow db upgrade {uri}` and fix what it reports, or start a new store")


def _repair_half_migrated(db: Path, uri: str) -> None:
    if not db.is_file():
        return
    tables = _tables(db)
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not leftovers:
        return
    with sqlite3.connect(db) as con:
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    if runs == 0:  # a new store that a concurrent first migration broke: nothing to keep
        log.warning("MLflow store %s was left half-migrated (%s) and holds no runs: recreating it", db, ", ".join(leftovers))
        db.unlink()
        return
    for tmp in leftovers:
        table = tmp[len("_alembic_tmp_"):]
        if table not in tables:
            raise TrackingError(
                f"MLflow store {db} was left half-migrated: table {tmp} holds what should be table {table}, which is "
                f"gone. Back up {db}, then: sqlite3 {db} 'ALTER TABLE {tmp} RENAME TO {table}' && mlflow db upgrade {uri}")
        log.warning("MLflow store %s: dropping %s left by an interrupted migration (%s is intact)", db, tmp, table)
        with sqlite3.connect(db) as con:
            con.execute(f'DROP TABLE "{tmp}"')
    _upgrade(uri, db)
