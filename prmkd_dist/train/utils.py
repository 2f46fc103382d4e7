"""Run helpers shared by training, evaluation and benchmarks: seeding, threads, logging, tables."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

LOGGER_NAME = "prmkd_dist"


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels.

    ``warn_only`` keeps ops without a deterministic CPU implementation usable (they warn instead of
    raising): on CPU the ones used here are deterministic for a fixed thread count, which is why the
    thread count is part of the run config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_num_threads(num_threads: int) -> None:
    """``num_threads`` > 0 pins torch's intra-op threads (float sums depend on how work is split,
    so a repeatable run needs the same count); 0 keeps torch's default."""
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The project logger, with one stderr handler (added once) and level from $PRMKD_LOG_LEVEL."""
    logger = logging.getLogger(name)
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("PRMKD_LOG_LEVEL", "INFO").upper())
        root.propagate = False  # our handler prints it; do not print it again via the root logger
    return logger


def format_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None,
                 precision: int = 4) -> str:
    """Markdown table: one row per name, one column per metric (``columns`` default: the union, in
    first-seen order). Missing cells print as '-'."""
    if columns is None:
        columns = []
        for metrics in rows.values():
            columns += [c for c in metrics if c not in columns]
    header = "| model | " + " | ".join(columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [header, sep]
    for name, metrics in rows.items():
        cells = []
        for c in columns:
            v = metrics.get(c)
            if v is None:
                cells.append("-")
            elif isinstance(v, (str, int)):
                cells.append(str(v))
            else:
                cells.append(f"{v:.{precision}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """"<cores>-core <CPU model>" of this machine (Linux /proc/cpuinfo; else the architecture), for benchmark JSON."""
    import platform

    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {model}"
