"""Where the shared real datasets and the project's artefacts live.

The real datasets are never copied into the repository: they are read from a shared directory next to
the project (``<project root>/../shared/data``) or from ``$PRMKD_SHARED_DATA``. Everything the project
produces (prepared datasets, shards, checkpoints) goes under ``$PRMKD_ARTIFACTS`` or ``./artifacts``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SHARED_DATA_ENV = "PRMKD_SHARED_DATA"
ARTIFACTS_ENV = "PRMKD_ARTIFACTS"

# The project root is the parent of the `prmkd_dist` package directory (editable install or checkout).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SharedDataNotFoundError(FileNotFoundError, ValueError):
    """The shared data directory could not be located (the message lists every place looked at)."""


def shared_data_root() -> Path:
    """Directory holding the shared real datasets (``ml-latest-small/``, ``amazon-games/``).

    Looked up in order: ``$PRMKD_SHARED_DATA`` (if set, it must exist: a wrong explicit setting is an
    error, never silently replaced), ``<project root>/../shared/data``, ``<cwd>/../shared/data``.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise SharedDataNotFoundError(f"${SHARED_DATA_ENV}={env!r} is not a directory")
        return root.resolve()
    candidates = [PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in candidates:
        if root.is_dir():
            return root.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise SharedDataNotFoundError(
        f"shared data directory not found; looked at ${SHARED_DATA_ENV} (unset), {looked}. "
        f"Set ${SHARED_DATA_ENV} to the directory holding ml-latest-small/ and amazon-games/."
    )


def artifacts_root() -> Path:
    """Root for everything the project writes: ``$PRMKD_ARTIFACTS``, else ``<cwd>/artifacts``.

    The directory is not created here; writers create the sub-directory they need.
    """
    env = os.environ.get(ARTIFACTS_ENV)
    return Path(env).expanduser().resolve() if env else Path.cwd().resolve() / "artifacts"


def write_json_atomic(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` so that no reader ever sees half a file: written beside it under a name
    unique to this process, flushed to disk, then renamed over (a manifest marks a finished export; a benchmark
    report is read by another lane while runs still come). ``dump_kwargs`` go to ``json.dump`` (indent 2 unless
    given)."""
    dump_kwargs.setdefault("indent", 2)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
