"""Batch files and scripted multi-step pipelines: one YAML file, many jobs, one process (or many).

    # examples/batch.yaml                          # a batch: independent jobs
    out: outputs/batch                           # output folder (--out wins)
    defaults:                                    # under every job (a job's own keys win)
      model: sd-turbo
      steps: 1
      device: cpu                                # device keys may sit anywhere a param can
    jobs:
      - prompt: "a {red|blue} {cat|dog} on a sofa"   # {a|b}: one job per choice (4 here)
        seeds: [1, 2, 3]                             # one job per seed (x3: 12 jobs)
      - task: music-audio
        preset: musicgen-small                       # a preset's values sit under the job's
        prompt: "lofi beat"

    # examples/storyboard.yaml                     # a pipeline: steps reading earlier outputs
    steps:
      hero:  {task: image, prompt: "a lighthouse at dusk", seed: 7}
      desc:  {task: caption, images: "${hero.image}"}
      theme: {task: music-audio, prompt: "${desc.text}, calm piano"}
      clip:  {task: video, init_image: "${hero.image}"}
      final: {task: mux, video: "${clip.video}", audio: "${theme.audio}"}

Every task is a registered pipeline (mux included), reached through the engine like a CLI command.
The package reads top to bottom in the order a file flows through it:

    model.py     Job, Ref, Output: the units a file becomes
    parse.py     BatchFile: read (bounded, studio/presets.py), check and expand a file into Jobs
    graph.py     `${step.kind}` references, the checks on them, run order, components
    manifest.py  the output folder's manifest.jsonl: finished jobs, verified outputs, repair,
                 and what --resume may remove (only what studio provably wrote, inside --out)
    runner.py    Runner, Report, Outcome: plan and run; `run_job` runs one job
    launch.py    several processes: `--processes N` through accelerate launch, the split, the gather
    ray.py       a Ray cluster: `--ray`, one actor per model per worker slot, the driver writes
                 (imports ray only when asked)
"""

from studio.batch.graph import field_kind, output_kinds
from studio.batch.manifest import Manifest
from studio.batch.model import Job, Output, Ref
from studio.batch.parse import MAX_JOBS, BatchFile, is_batch_data, load, parse
from studio.batch.runner import Outcome, PlanItem, Report, Runner, run_file, run_job

__all__ = ["BatchFile", "Job", "MAX_JOBS", "Manifest", "Outcome", "Output", "PlanItem", "Ref", "Report", "Runner",
           "field_kind", "is_batch_data", "load", "output_kinds", "parse", "run_file", "run_job"]
