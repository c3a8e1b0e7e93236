"""Where the embedded database (bin/embedded-db) listens, and the URL that reaches it.

One rule for both sides: bin/embedded-db makes FerretDB listen there, and the programs' default
database URL (``Settings.mongodb_url``) points there. Standard library only: bin/embedded-db runs
with the system's Python (before the virtualenv exists) and imports this file from the checkout.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from pathlib import Path

SOCKET_PATH_MAX = 107  # sun_path, less its terminating NUL


def ferretdb_socket(data_dir: Path) -> Path:
    """FerretDB's unix socket for the embedded database in ``data_dir`` (``<CM_DATA_DIR>/db``):
    ``data_dir/socket/ferretdb.sock`` (``data_dir`` resolved), or when that path is too long for a
    socket, ``/tmp/cm-ferretdb-UID-HASH/ferretdb.sock`` (HASH: the resolved ``data_dir``'s, so the
    same at every start, and the same for every program given that directory)."""
    data = Path(data_dir).expanduser().resolve()
    path = data / "socket" / "ferretdb.sock"
    if len(str(path).encode()) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cm-ferretdb-{os.geteuid()}-{digest}" / "ferretdb.sock"


def mongodb_url(socket_path: Path) -> str:
    """The URL PyMongo takes for a unix socket: its absolute path, percent-encoded."""
    return f"mongodb://{urllib.parse.quote(str(socket_path), safe='')}/"


def embedded_url(data_dir: Path) -> str:
    """The URL of the embedded database in ``data_dir``, as ``bin/embedded-db url data_dir`` prints it."""
    return mongodb_url(ferretdb_socket(data_dir))
