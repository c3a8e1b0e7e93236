"""The embedded database (bin/embedded-db: FerretDB on a private PostgreSQL cluster) for the tests
and the benchmarks."""

from __future__ import annotations

import os
import stat
import subprocess
import urllib.parse
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


class EmbeddedDatabase:
    """``bin/embedded-db start data_dir``, running from construction until ``stop``.

    As root the cluster runs as the user postgres, who must traverse ``data_dir``'s parents: give
    ``searchable_from``, the highest of them, and those up to it are made searchable (not
    readable) by others, as pytest's and tempfile's 0700 directories need.

    ``url`` is FerretDB's unix socket (no TCP port), the same at every start in ``data_dir``;
    ``port`` is accepted for older callers and ignored."""

    def __init__(self, data_dir: Path, port: int | None = None, searchable_from: Path | None = None) -> None:
        self.data_dir = data_dir
        command = [str(ROOT / "bin" / "embedded-db"), "start", str(data_dir)]
        for _ in range(3):
            if searchable_from is not None and os.geteuid() == 0:
                searchable(data_dir.parent, searchable_from)
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.process.stdout is not None
            self.url = self.process.stdout.readline().strip()  # printed once the database answers
            if self.url:
                return
            _, errors = self.process.communicate(timeout=60)
            # Any pytest session that starts, as root too, makes /tmp/pytest-of-root 0700 again.
            if "cannot reach" not in errors and "Permission denied" not in errors:
                break
        raise RuntimeError(f"the embedded database did not start: {errors.strip()}")

    @property
    def socket_path(self) -> Path:
        """FerretDB's unix socket, from the URL (mongodb:// and the percent-encoded path)."""
        return Path(urllib.parse.unquote(self.url.removeprefix("mongodb://").rstrip("/")))

    @property
    def postgres_pid(self) -> int:
        return int((self.data_dir / "postgresql" / "postmaster.pid").read_text().split()[0])

    @property
    def ferretdb_pid(self) -> int:
        return int((self.data_dir / "ferretdb.pid").read_text())

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait: returns the exit status and what it said on stderr."""
        if self.process.poll() is None:
            self.process.terminate()
        _, errors = self.process.communicate(timeout=90)
        return self.process.returncode, errors

    def __enter__(self) -> EmbeddedDatabase:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def searchable(path: Path, top: Path) -> None:
    """``path`` and its parents up to ``top`` made searchable (not readable) by others; those that
    do not exist yet are left to be made."""
    chain = [path, *path.parents]
    for directory in chain[:chain.index(top) + 1]:  # ValueError when top is not one of them
        if directory.exists():
            directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
