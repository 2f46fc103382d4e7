"""Prepare a dataset once into its canonical on-disk form, and load it (with its split) for trainers.

``prepare_dataset`` reads a builtin dataset name (``prmkd_dist/configs/data/<name>.yaml``), a reader
YAML path or a :class:`ReaderConfig`, and writes ``artifacts_root()/data/<name>`` (docs/data.md). The
meta ``source`` is a digest of the resolved config and of every input file's path, size and mtime:
preparing again from identical inputs only loads the existing directory.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from prmkd_dist.data.dataset import DatasetFormatError, InteractionData, LeaveOneOutSplit
from prmkd_dist.data.domains import combine_domains
from prmkd_dist.data.paths import artifacts_root
from prmkd_dist.data.readers import ReaderConfig, ReaderConfigError, load_reader_config, read_dataset

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"
PROVENANCE_FILE = "prepare.json"  # resolved config, input files and the reader's report
# Bump when the reader's canonical-form rules change, so older prepared directories are rebuilt.
READER_RULES_VERSION = 1


class OutputDirError(FileExistsError, ValueError):
    """The output directory holds something other than a prepared dataset (never overwritten)."""


def builtin_datasets() -> list[str]:
    """Names of the datasets shipped as reader configs."""
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def resolve_reader_config(config_or_name: ReaderConfig | str | os.PathLike) -> ReaderConfig:
    """A ReaderConfig (paths made absolute), a reader YAML path, or a builtin dataset name."""
    if isinstance(config_or_name, ReaderConfig):
        return config_or_name.with_paths_resolved()
    text = str(config_or_name)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_reader_config(path)
    builtin = BUILTIN_CONFIG_DIR / f"{text}.yaml"
    if builtin.is_file():
        return load_reader_config(builtin)
    raise ReaderConfigError(
        f"{text!r} is neither a reader config file nor a builtin dataset (builtin: {', '.join(builtin_datasets())})"
    )


def with_kcore(config: ReaderConfig, kcore: int | None) -> ReaderConfig:
    """``config`` with k-core ``kcore`` (None: unchanged). A k different from the config's appends
    ``-<k>core`` to the name, so differently filtered versions never share a directory."""
    if kcore is None or kcore == config.kcore:
        return config
    config = dataclasses.replace(config, kcore=kcore, name=f"{config.name}-{kcore}core")
    config.validate()
    return config


def _input_files(config: ReaderConfig) -> list[str]:
    tables = [config.interactions] + (list(config.item_text.sources) if config.item_text else [])
    return [t.path for t in tables]


def source_digest(config: ReaderConfig) -> tuple[str, list[dict]]:
    """(digest of the config + input file identities, the input file records it covers).

    Size + mtime stand in for content checksums so that checking a multi-GB input stays instant."""
    inputs = []
    for p in _input_files(config):
        st = os.stat(p) if os.path.exists(p) else None
        inputs.append({"path": p, "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None})
    payload = {"rules": READER_RULES_VERSION, "config": config.to_dict(), "inputs": inputs}
    blob = json.dumps(payload, sort_keys=True).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest(), inputs


def default_out_dir(name: str) -> Path:
    """Where a prepared dataset named ``name`` lives by default."""
    return artifacts_root() / "data" / name


def prepare_dataset(
    config_or_name: ReaderConfig | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    kcore: int | None = None,
) -> InteractionData:
    """Prepare (or reuse) the canonical form of a dataset and return it.

    ``kcore`` overrides the config's k-core; a value different from the config's appends
    ``-<k>core`` to the dataset name (and so to the default directory). ``force`` rebuilds even when
    the directory was prepared from identical inputs. The directory is written next to its final
    place and swapped in, so a crash never leaves a half-written dataset behind.
    """
    config = with_kcore(resolve_reader_config(config_or_name), kcore)
    out = Path(out_dir) if out_dir is not None else default_out_dir(config.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several ranks of one job may prepare the same dataset at once: one builds, the others then reuse.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(config, out, force)


def _prepare_locked(config: ReaderConfig, out: Path, force: bool) -> InteractionData:
    digest, inputs = source_digest(config)
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        with open(meta_path) as f:
            previous = json.load(f).get("source")
        if previous == digest:
            try:
                return InteractionData.load(str(out))
            except DatasetFormatError as e:
                raise DatasetFormatError(f"{e} (prepare with force=True / --force to rebuild it)") from e
    if out.exists() and not meta_path.is_file() and any(out.iterdir()):
        raise OutputDirError(f"{out}: exists, is not empty and is not a prepared dataset; refusing to overwrite it")

    data, report = read_dataset(config, source=digest)
    provenance = {"source": digest, "config": config.to_dict(), "inputs": inputs, "report": report.as_dict()}
    _save_swapped(data, out, provenance)
    return data


def _save_swapped(data: InteractionData, out: Path, provenance: dict | None = None) -> None:
    """Save ``data`` (and its ``prepare.json``) next to ``out`` and swap it in: a crash never leaves a
    half-written dataset in ``out``."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save(str(tmp))
    if provenance is not None:
        with open(tmp / PROVENANCE_FILE, "w") as f:
            json.dump(provenance, f, indent=2)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_provenance(directory: str | os.PathLike) -> dict | None:
    """The ``prepare.json`` written by :func:`prepare_dataset` (None for directories saved otherwise)."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def load_dataset(name_or_dir: str | os.PathLike) -> InteractionData:
    """A prepared directory, a reader YAML / builtin name (prepared on first use, then reused), the
    name of a dataset already prepared under ``artifacts_root()/data``, or "a+b" for the multi-domain dataset of
    datasets a and b (combined on first use, :func:`combine_prepared`)."""
    path = Path(name_or_dir)
    if (path / "meta.json").is_file():
        return InteractionData.load(str(path))
    text = str(name_or_dir)
    if path.suffix in (".yaml", ".yml") or path.is_file() or (BUILTIN_CONFIG_DIR / f"{text}.yaml").is_file():
        return prepare_dataset(text)
    if "+" in text and all(part for part in text.split("+")):  # before the stored copy: its parts may have changed
        return combine_prepared(text.split("+"))[0]
    if (default_out_dir(text) / "meta.json").is_file():
        return InteractionData.load(str(default_out_dir(text)))
    raise DatasetFormatError(
        f"{text!r} is not a prepared dataset directory, a reader config, a builtin dataset "
        f"({', '.join(builtin_datasets())}) or a dataset prepared under {default_out_dir('')}"
    )


def combine_prepared(parts: list[str], name: str | None = None, out_dir: str | os.PathLike | None = None,
                     force: bool = False) -> tuple[InteractionData, bool]:
    """The multi-domain dataset (``prmkd_dist.data.domains``) of the datasets ``parts`` (each loaded as by
    :func:`load_dataset`), named ``name`` (default "a+b+..."), kept in ``out_dir`` (default ``default_out_dir``)
    like a prepared dataset; returns (dataset, whether it was written now). Reused when the directory holds it
    from identical inputs; rebuilt when it holds the same name from other inputs (a part was re-prepared) or with
    ``force``; any other content of ``out_dir`` is refused."""
    data = combine_domains([load_dataset(p) for p in parts], name)  # cheap next to what uses it: seconds
    out = Path(out_dir) if out_dir is not None else default_out_dir(data.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # ranks of one job: one combines, the others reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "meta.json").is_file() and not force:
            previous = InteractionData.load(str(out))
            if previous.source == data.source and previous.fingerprint == data.fingerprint:
                return previous, False
            if previous.name != data.name:
                raise OutputDirError(f"{out}: holds another dataset ({previous.name}); pass force=True / --force to "
                                     f"replace it with {data.name}")
        elif out.exists() and not (out / "meta.json").is_file() and any(out.iterdir()):
            raise OutputDirError(f"{out}: exists, is not empty and is not a prepared dataset; refusing to overwrite it")
        _save_swapped(data, out)
        return data, True


def load_split(name_or_dir: str | os.PathLike) -> tuple[InteractionData, LeaveOneOutSplit]:
    """Convenience for trainers: :func:`load_dataset` plus its leave-one-out split."""
    data = load_dataset(name_or_dir)
    return data, LeaveOneOutSplit.of(data)


def dataset_statistics(data: InteractionData, split: LeaveOneOutSplit | None = None) -> dict:
    """``data.stats()`` plus the minimum sequence length and the split sizes."""
    split = split if split is not None else LeaveOneOutSplit.of(data)
    lens = data.lengths()
    stats = data.stats()
    stats.update(
        seq_len_min=int(lens.min()) if len(lens) else 0,
        seq_len_p90=float(np.percentile(lens, 90)) if len(lens) else 0.0,
        train_interactions=int(len(split.train_items)),
        valid_users=int(len(split.eval_users("valid"))),
        test_users=int(len(split.eval_users("test"))),
        users_without_eval=int((lens < 3).sum()),
        items_with_text=sum(t is not None for t in data.item_text) if data.item_text is not None else 0,
    )
    return stats
