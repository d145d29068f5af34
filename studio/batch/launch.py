"""`studio run FILE --processes N`: N worker processes started with `accelerate launch`, each
running `studio run FILE` on its share of the jobs (Runner.run splits them with accelerate's
PartialState); the main worker writes the run's summary to a file this process reads back."""

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
