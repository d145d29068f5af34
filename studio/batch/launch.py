"""Several processes with accelerate: `studio run FILE --processes N` starts N workers with
`accelerate launch`, each running `studio run FILE` on its share of the jobs; in a worker,
`process_state` is accelerate's PartialState, the jobs are split with its
`split_between_processes` (`process_of` says who gets which, for --dry-run), and `gather` brings
every worker's outcomes together. The main worker writes the run's summary to a file the
launching process reads back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from studio.errors import RuntimeFailure


def launch(path: str | Path, processes: int, argv: list[str], *, cpu: bool) -> dict[str, Any]:
    """Start `processes` workers on the batch file `path` (with the `studio run` flags `argv`)
    and return the run's summary (Report.summary)."""
    with socket.socket() as s:  # a free port, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="studio-run-") as tmp:
        summary = Path(tmp) / "summary.json"
        # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the
        # workers' PartialState(cpu=True) joins a gloo group instead (accelerate's --cpu launcher
        # starts one process unless MPI is installed)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "studio", "run", str(path), *argv]
        env = {**os.environ, "STUDIO_RUN_SUMMARY": str(summary), "STUDIO_RUN_ID": uuid.uuid4().hex[:12]}
        if cpu:
            env.setdefault("ACCELERATE_USE_CPU", "true")
        code = subprocess.run(cmd, env=env).returncode
        if not summary.exists():
            raise RuntimeFailure(f"accelerate launch exited with {code} before the run finished",
                                 "rerun with --debug, or without --processes to see the error")
        return json.loads(summary.read_text())


def process_state(*, cpu: bool) -> Any:
    """accelerate's PartialState when launched as several processes, else None (no import)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=cpu or not torch.cuda.is_available())


def process_of(unit: int, units: int, processes: int) -> int:
    """Which process runs unit `unit` of `units`: the split PartialState.split_between_processes
    makes (contiguous shares, the first `units % processes` one longer)."""
    per, extra = divmod(units, processes)
    for p in range(processes):
        start = p * per + min(p, extra)
        if start <= unit < start + per + (1 if p < extra else 0):
            return p
    return processes - 1


def gather(state: Any, rows: list[Any]) -> list[Any]:
    """Every process's rows, in process order, on every process."""
    from accelerate.utils import gather_object

    state.wait_for_everyone()
    return [row for part in gather_object([rows]) for row in part]
