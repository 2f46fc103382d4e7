"""Start ``dist_worker.py`` under torchrun (real processes, gloo) and return its per-rank JSON reports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, restarts: int = 0,
             timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC dist_worker.py ARGS`` with a c10d rendezvous on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--max-restarts", str(restarts), str(HERE / "dist_worker.py"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PRMKD_LOG_LEVEL": "WARNING", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        out = Path(args[1]) if len(args) > 1 else None
        done = sorted(f.name for f in out.glob("*_done_rank*")) if out is not None and out.is_dir() else []
        pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}); ranks that finished their scenario: {done}\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-8000:]}")
    return p


def torchrun_nodes(args: list[str], nnodes: int = 2, nproc: int = 1, env: dict | None = None,
                   timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun agents on this machine, each started like a node of a cluster (``--nnodes NNODES
    --nproc-per-node NPROC``, the same c10d rendezvous on 127.0.0.1 and rendezvous id; the agents agree on the
    node ranks between themselves), running ``dist_worker.py ARGS``."""
    endpoint = f"127.0.0.1:{free_port()}"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PRMKD_LOG_LEVEL": "WARNING", **(env or {})}
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "prmkd-two-nodes",
             str(HERE / "dist_worker.py"), *args] for _ in range(nnodes)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    done = []
    try:
        for c, p in zip(cmds, procs):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, p in enumerate(done):
        if p.returncode != 0:
            pytest.fail(f"node {node}: {' '.join(p.args)} failed ({p.returncode})\n{p.stdout[-3000:]}\n"
                        f"{p.stderr[-8000:]}")
    return done


def reports(out: Path, name: str, world: int = 2) -> list[dict]:
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(world)]
