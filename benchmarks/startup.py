"""Startup cost of `studio --help`, side by side in one run (medians of several runs):

- over a one-command Typer app's --help: the framework's floor (goal <= 1.5)
- over `python -c "import torch, diffusers"`: what a CLI that imports its models up front pays (goal <= 0.1)
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7
PY = sys.executable


def median_seconds(cmd: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        floor_app = Path(tmp) / "floor.py"
        floor_app.write_text(
            "import typer\napp = typer.Typer()\n@app.command()\ndef hello(name: str = 'x'):\n    print(name)\n"
            "if __name__ == '__main__':\n    app()\n")
        studio = median_seconds([PY, "-m", "studio", "--help"])
        floor = median_seconds([PY, str(floor_app), "--help"])
        heavy = median_seconds([PY, "-c", "import torch, diffusers"])
    print(f"studio --help                 {studio * 1000:8.1f} ms (median of {RUNS})")
    print(f"one-command typer --help      {floor * 1000:8.1f} ms")
    print(f"python -c 'import torch, diffusers' {heavy * 1000:8.1f} ms")
    print(f"ratio studio/typer floor      {studio / floor:8.2f}  (goal <= 1.5)")
    print(f"ratio studio/torch+diffusers  {studio / heavy:8.3f}  (goal <= 0.1)")


if __name__ == "__main__":
    main()
