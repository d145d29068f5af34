"""Running a batch / pipeline file: `Runner(file, out_dir=..., resume=True).run() -> Report`.

Jobs sharing a model run back to back, so the registry's per-process cache loads each model once,
and a model is unloaded once no later job needs it; consecutive jobs that differ only in their
seed are merged into one pipeline call. A job that fails is recorded and the rest go on (the steps
after a failed step are `blocked`). Every output goes through the OutputWriter (atomic, a
manifest.jsonl row with its sha256); after each job a `job-done` row lists its outputs and their
sha256. `resume=True` skips jobs whose row is there and whose files still match, removes what an
interrupted attempt left (manifest.py says what may go) and redoes the rest. Under `accelerate
launch` (or `--processes N`, launch.py) jobs are split with accelerate's
`PartialState().split_between_processes`; a pipeline's steps stay together.

The seam for other executors: `run_job(job, params, engine=..., options=..., tag=..., template=...)`
runs one job and returns its written Outputs; `Runner._record` is the one place that writes the
runner's manifest rows; `Runner._run_ready(..., run=...)` runs a prepared job through another
executor's `run` and records it (studio/batch/ray.py, which raises WorkerLost for a lost worker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from studio import presets, registry
from studio.batch import graph, launch
from studio.batch.manifest import Manifest
from studio.batch.model import Job, Output
from studio.batch.parse import BatchFile
from studio.errors import RuntimeFailure, StudioError
from studio.outputs import OutputWriter, _jsonable, sha256_file, within


class WorkerLost(Exception):
    """An executor lost the process running a job (a Ray worker killed, its node gone): the job is
    run again elsewhere, so `_run_ready` records nothing for it (studio/batch/ray.py)."""


# =========================================================================== what a run returns
@dataclass
class Outcome:
    """What happened to one job."""

    job: str  # the job's name
    task: str
    status: str  # done | skipped | failed | blocked
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None  # one line, for failed / blocked
    seconds: float = 0.0
    tag: str | None = None  # name#key, as the manifest records it
    process: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "task": self.task, "status": self.status, "error": self.error,
                "outputs": [str(o.path) for o in self.outputs], "seconds": round(self.seconds, 3),
                "process": self.process}


@dataclass
class Report:
    """The result of a run: one Outcome per job (all processes' when distributed)."""

    outcomes: list[Outcome]
    out_dir: Path
    seconds: float = 0.0
    processes: int = 1

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> int:
        """Jobs that did not produce their outputs (failed, or blocked by a failed step)."""
        return self.count("failed") + self.count("blocked")

    @property
    def exit_code(self) -> int:
        """How many jobs failed (capped at 100, clear of the shell's 126+ codes); 0 = all done."""
        return min(self.failed, 100)

    def outcome(self, name: str) -> Outcome:
        for o in self.outcomes:
            if o.job == name:
                return o
        raise KeyError(name)

    def paths(self, name: str) -> list[Path]:
        return [o.path for o in self.outcome(name).outputs]

    def text(self, name: str) -> str:
        return next(o for o in self.outcome(name).outputs if o.kind == "text").read_text()

    def summary(self) -> dict[str, Any]:
        return {"jobs": len(self.outcomes), "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "blocked": self.count("blocked"), "seconds": round(self.seconds, 3),
                "out": str(self.out_dir), "processes": self.processes,
                "failures": [{"job": o.job, "status": o.status, "error": o.error} for o in self.outcomes
                             if o.status in ("failed", "blocked")]}


@dataclass
class PlanItem:
    job: Job
    status: str  # run | skip | redo | run (after X)
    process: int = 0


# =========================================================================== one job
def execute(job: Job, params: dict[str, Any], *, engine: Any, options: Any, tag: str | None) -> list[Any]:
    """One pipeline call for `job` with its resolved `params`: all its Results, nothing written
    (a merged seed sweep needs them all to hand each job its own)."""
    return engine.run(job.task, params, job=tag, options=options)


def write_results(job: Job, results: Iterable[Any], *, out_dir: Path, template: str, tag: str,
                  emit: Callable[[dict[str, Any]], None] | None = None) -> list[Output]:
    """Write a job's Results through the OutputWriter as they come, each checked to land inside
    `out_dir`; only the Outputs (paths, hashes, texts) are kept."""
    from studio.engine import Engine

    writer = OutputWriter(out_dir, task=job.task, template=template)
    makes = graph.output_kinds(job.task, registry.pipeline_class(job.task))
    outputs = []
    for index, result in enumerate(results):
        result.extra = {**result.extra, "job": tag}
        path = writer.write(result, index)
        if not within(path, out_dir):  # the template is checked at validation; this is the backstop
            raise RuntimeFailure(f"{job.name} wrote {path}, outside {out_dir}", "report it: the name template escaped")
        kind = result.kind
        if kind == "file" and makes and len(makes) == 1:
            kind = makes[0]  # a finished file (a muxed MP4) is what its task makes, to whoever reads it
        text = result.value if result.kind == "text" else None
        outputs.append(Output(kind=kind, path=path, sha256=sha256_file(path) if path.is_file() else None,
                              text=str(text) if text is not None else None))
        if emit is not None:
            emit({**Engine.summary(result), "job": job.name, "status": "done"})
    if not outputs:
        raise RuntimeFailure(f"{job.task} returned no outputs", "check the job's parameters")
    return outputs


def run_job(job: Job, params: dict[str, Any], *, engine: Any, options: Any, tag: str, template: str,
            emit: Callable[[dict[str, Any]], None] | None = None) -> list[Output]:
    """Run one job on `engine` and write its outputs into `options.out_dir`: the unit another
    executor (a worker process, a cluster task) runs. The caller records the job-done row.
    Results stream (Engine.stream): each is written before the pipeline makes the next, so a job
    of 200 images holds one at a time."""
    results = engine.stream(job.task, params, job=tag, options=options)
    return write_results(job, results, out_dir=options.out_dir, template=template, tag=tag, emit=emit)


def run_file(source: str | Path | dict[str, Any], **options: Any) -> Report:
    """Run a batch / pipeline file (or the same structure as a dict) and return its Report.

        from studio.batch import run_file
        report = run_file("examples/storyboard.yaml", out_dir="outputs/story", device={"device": "cpu"})
        report.failed, report.paths("hero"), report.text("desc")
    """
    return Runner(source, **options).run()


# =========================================================================== the runner
class Runner:
    """Runs a batch / pipeline file: `Runner("file.yaml", out_dir=..., resume=True).run()`.

    Options mirror `studio run`: out_dir (else the file's `out:`, else outputs/<file name>),
    resume, device (flags that win over the file: {"device": "cpu", "precision": "bf16"}),
    quiet/json (what is printed), offline, allow_pickle, trust_remote_code, unsafe_exec (jobs may
    set `unsafe_exec: true`: `studio run --unsafe-exec`). `emit` receives one
    dict per output (what --json prints). `unload_models=False` keeps every model loaded;
    `merge=1` runs every job as its own pipeline call."""

    def __init__(self, source: str | Path | dict[str, Any] | BatchFile, *, out_dir: str | Path | None = None,
                 resume: bool = False, device: dict[str, Any] | None = None, quiet: bool = True, json: bool = False,
                 offline: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
                 progress: Any = None, emit: Callable[[dict[str, Any]], None] | None = None,
                 unload_models: bool = True, run_id: str | None = None, merge: int = 8, unsafe_exec: bool = False):
        from studio.progress import Progress

        if isinstance(source, BatchFile):
            self.file = source
        elif isinstance(source, dict):
            self.file = BatchFile.from_dict(source, unsafe_exec=unsafe_exec)
        else:
            self.file = BatchFile.load(source, unsafe_exec=unsafe_exec)
        self.out_dir = Path(out_dir).expanduser() if out_dir else (self.file.out or Path("outputs") / self.file.name)
        self.resume = resume
        self.device_flags = {k: v for k, v in (device or {}).items() if v is not None}
        self.quiet = quiet
        self.json = json
        self.offline = offline
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.progress = progress or Progress(enabled=not (quiet or json))
        self.emit = emit
        self.unload_models = unload_models
        self.merge = merge  # up to this many seed-only-different jobs per pipeline call (1 = never merge)
        self.run_id = run_id or os.environ.get("STUDIO_RUN_ID") or uuid.uuid4().hex[:12]
        self.outputs: dict[str, list[Output]] = {}
        self.manifest: Manifest | None = None  # read when the run starts
        self._group_keys: dict[str, set] = {}
        self._presets: dict[str, presets.Preset] = {}

    # ------------------------------------------------------------------ identity
    def _device_for(self, job: Job, state: Any = None) -> dict[str, Any]:
        flags = {**job.device, **self.device_flags}
        if state is not None and getattr(state, "num_processes", 1) > 1 and str(state.device).startswith("cuda"):
            if flags.get("device") in (None, "auto", "cuda"):
                flags["device"] = f"cuda:{state.local_process_index}"  # one GPU per process
        return flags

    def _preset(self, name: str) -> presets.Preset:
        if name not in self._presets:
            self._presets[name] = presets.read_preset(name, check_task_params=False)
        return self._presets[name]

    def _preset_signature(self, job: Job) -> str | None:
        """A preset counts by its contents: editing it makes its jobs new work."""
        if not job.preset:
            return None
        return hashlib.sha256(self._preset(job.preset).path.read_bytes()).hexdigest()[:16]

    def key(self, job: Job, upstream: dict[str, list[Output]] | None = None) -> str | None:
        """What makes a job's output what it is: task, parameters (a reference counts as the
        sha256 of what it reads), preset contents and device settings. None while an upstream
        step has not run yet."""
        upstream = self.outputs if upstream is None else upstream
        if any(r.step not in upstream for r in job.refs):
            return None
        params = graph.resolve(job.params, job.refs, upstream, fingerprint=True)
        device = {k: v for k, v in self._device_for(job).items() if k != "device" or v not in ("auto",)}
        payload = {"task": job.task, "params": _jsonable(params), "preset": self._preset_signature(job),
                   "device": _jsonable(device)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def _template(self, job: Job) -> str:
        template = self.file.template or ("{job}" if job.is_step else "{job}-{seed}-{slug}")
        return template.replace("{job}", job.name)

    # ------------------------------------------------------------------ planning
    def plan(self, processes: int = 1) -> list[PlanItem]:
        """What a run would do: each job with run / skip (done, files match) / redo, and which
        process would take it."""
        manifest = Manifest(self.out_dir) if self.resume else None
        known: dict[str, list[Output]] = {}
        items = []
        for job in self.file.jobs:
            status = "run"
            key = self.key(job, known)
            if manifest is not None:
                if key is None:
                    waiting = [r.step for r in job.refs if r.step not in known]
                    status = f"run (after {', '.join(sorted(set(waiting)))})"
                else:
                    tag = f"{job.name}#{key}"
                    outputs = manifest.verified(tag)
                    if outputs is not None:
                        status = "skip"
                        known[job.name] = outputs
                    elif tag in manifest.done:
                        status = "redo"
            items.append(PlanItem(job=job, status=status))
        units = self.file.components()
        index = {id(job): n for n, unit in enumerate(units) for job in unit}
        for item in items:
            item.process = launch.process_of(index[id(item.job)], len(units), processes)
        return items

    # ------------------------------------------------------------------ running
    def run(self) -> Report:
        started = time.perf_counter()
        state = launch.process_state(cpu=self.device_flags.get("device") == "cpu")
        units = self.file.components()
        if state is not None and state.num_processes > 1:
            with state.split_between_processes(units) as mine:
                units = list(mine)
        jobs = [job for unit in units for job in unit]
        self.manifest = self._open_manifest(state, jobs)
        from studio.engine import Engine, RunOptions

        base = RunOptions(out_dir=self.out_dir, quiet=self.quiet, json=self.json, offline=self.offline,
                          allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code, write=False)
        engine = Engine(base, progress=self.progress)
        outcomes = self._run_jobs(jobs, engine, base, state)
        report = Report(outcomes=outcomes, out_dir=self.out_dir, seconds=time.perf_counter() - started,
                        processes=getattr(state, "num_processes", 1))
        if state is not None and state.num_processes > 1:
            report.outcomes = self._gather(state, outcomes)
        return report

    def _open_manifest(self, state: Any, jobs: list[Job]) -> Manifest:
        """The folder's manifest, repaired first on resume (by the main process alone)."""
        if state is None or state.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resume:  # (a line a killed run tore is ended by the next append)
                stale = Manifest(self.out_dir).clear_stale_temps()
                if stale:
                    self._note(f"removed {stale} temp file(s) an interrupted run left in {self.out_dir}")
        if state is not None:
            state.wait_for_everyone()  # nobody reads the folder while temps are swept
        manifest = Manifest(self.out_dir)
        if manifest.outside:
            self._warn(f"ignored {manifest.outside} row(s) of {manifest.path} naming files outside {self.out_dir}")
        if not self.resume and manifest.done:
            again = sum(1 for job in jobs if any(t.startswith(job.name + "#") for t in manifest.done))
            if again:
                self._note(f"{again} job(s) already ran into {self.out_dir}; pass --resume to skip the finished ones")
        return manifest

    def _run_jobs(self, jobs: list[Job], engine: Any, base: Any, state: Any) -> list[Outcome]:
        last_use = {job.group: n for n, job in enumerate(jobs)}
        rank = getattr(state, "process_index", 0)
        outcomes: list[Outcome] = []
        with self.progress:
            bar = self.progress.task(f"{self.file.name}", total=len(jobs))
            position = 0
            for chunk in self._chunks(jobs):
                ready = []
                for job in chunk:  # blocked / skipped jobs are settled before anything runs
                    prepared = self._prepare(job)
                    if isinstance(prepared, Outcome):
                        outcomes.append(prepared)
                    else:
                        ready.append(prepared)
                if len(ready) > 1:
                    outcomes.extend(self._run_merged(ready, engine, base, state))
                else:
                    outcomes.extend(self._run_ready(*r, engine=engine, base=base, state=state) for r in ready)
                by_name = {o.job: o for o in outcomes[-len(chunk):]}
                for job in chunk:
                    by_name[job.name].process = rank
                    position += 1
                    self._report(by_name[job.name], position, len(jobs))
                    bar.advance()
                if self.unload_models and last_use.get(chunk[-1].group) == position - 1 and position < len(jobs):
                    self._unload(chunk[-1].group)
        return outcomes

    def _gather(self, state: Any, outcomes: list[Outcome]) -> list[Outcome]:
        """Every process's outcomes, on every process."""
        merged = []
        for o in launch.gather(state, [dataclasses.asdict(o) for o in outcomes]):
            o["outputs"] = [Output(**{**x, "path": Path(x["path"])}) for x in o["outputs"]]
            merged.append(Outcome(**o))
        return merged

    def _chunks(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs that differ only in their seed, for a task whose Request takes `seeds`
        (the image pipeline), run as one call: the prompt is encoded and the pipeline set up once
        for the lot. Each job still gets its own outputs and record."""
        chunks: list[list[Job]] = []
        last = None
        for job in jobs:
            sig = self._merge_signature(job)
            if chunks and sig is not None and sig == last and len(chunks[-1]) < self.merge:
                chunks[-1].append(job)
            else:
                chunks.append([job])
            last = sig
        return chunks

    def _merge_signature(self, job: Job) -> str | None:
        if self.merge <= 1 or job.is_step or "seed" not in job.params:
            return None
        fields = presets.request_field_types(registry.pipeline_class(job.task).request_type)
        if "seeds" not in fields or "num_outputs" not in fields or "seeds" in job.params or job.params.get("num_outputs", 1) != 1:
            return None
        if job.preset and {"seeds", "num_outputs"} & set(self._preset(job.preset).params):
            return None
        rest = {k: v for k, v in job.params.items() if k != "seed"}
        return json.dumps([job.group, _jsonable(rest)], sort_keys=True, default=str)

    def _prepare(self, job: Job) -> Outcome | tuple[Job, str, str]:
        """A blocked or skipped job's Outcome, or (job, key, tag) for a job to run."""
        # 1. inputs: a step whose upstream failed cannot run
        missing = [r.step for r in job.refs if r.step not in self.outputs]
        if missing:
            error = f"needs {', '.join(sorted(set(missing)))}, which did not finish"
            self._record({"event": "job-blocked", "job": job.name, "name": job.name, "error": error})
            return Outcome(job=job.name, task=job.task, status="blocked", error=error)
        key = self.key(job)
        tag = f"{job.name}#{key}"
        # 2. resume: skip what is done and intact; clear what an interrupted attempt left
        if self.resume:
            done = self.manifest.verified(tag)
            if done is not None:
                self.outputs[job.name] = done
                return Outcome(job=job.name, task=job.task, status="skipped", outputs=done, tag=tag)
            removed, kept = self.manifest.clear_leftovers(job.name, tag)
            for note in kept:
                self._warn(note)
            if removed:
                self._note(f"{job.name}: removed {removed} output(s) of an interrupted attempt; redoing it")
        return job, key, tag  # type: ignore[return-value]

    def _run_merged(self, ready: list[tuple[Job, str, str]], engine: Any, base: Any, state: Any) -> list[Outcome]:
        t0 = time.perf_counter()
        first = ready[0][0]
        seeds = [int(job.params["seed"]) for job, _, _ in ready]
        try:
            params = graph.coerce(registry.pipeline_class(first.task).request_type, graph.resolve(first.params, [], {}), first)
            params.update(seed=seeds[0], seeds=tuple(seeds), num_outputs=len(seeds))
            with self._tracking(first.group):
                results = execute(first, params, engine=engine, options=self._options(first, base, state), tag=None)
            by_seed = {int(r.params.get("seed", -1)): r for r in results}
            if len(results) != len(seeds) or set(by_seed) != set(seeds):
                raise RuntimeFailure("the merged call returned other seeds than asked for")
        except KeyboardInterrupt:
            raise
        except Exception:  # run them one by one, so that each failure is its own job's
            return [self._run_ready(*r, engine=engine, base=base, state=state) for r in ready]
        share = (time.perf_counter() - t0) / len(ready)
        return [self._run_ready(job, key, tag, engine=engine, base=base, state=state, results=[by_seed[int(job.params["seed"])]],
                                extra_seconds=share) for job, key, tag in ready]

    def _run_ready(self, job: Job, key: str, tag: str, *, engine: Any, base: Any, state: Any,
                   results: list[Any] | None = None, extra_seconds: float = 0.0,
                   run: Callable[[Job, dict[str, Any], Any, str, str], list[Output]] | None = None) -> Outcome:
        """Run one prepared job and record how it ended. `run(job, params, options, tag, template)
        -> Outputs` runs it elsewhere (another executor) instead of on `engine`."""
        t0 = time.perf_counter() - extra_seconds
        # 3. run and write
        try:
            if results is None:
                params = graph.resolve(job.params, job.refs, self.outputs)
                params = graph.coerce(registry.pipeline_class(job.task).request_type, params, job)
                options = self._options(job, base, state)
                if run is not None:
                    outputs = run(job, params, options, tag, self._template(job))
                else:
                    with self._tracking(job.group):
                        outputs = run_job(job, params, engine=engine, options=options, tag=tag,
                                          template=self._template(job), emit=self.emit)
            else:
                outputs = write_results(job, results, out_dir=self.out_dir, template=self._template(job), tag=tag,
                                        emit=self.emit)
        except (KeyboardInterrupt, WorkerLost):
            raise
        except StudioError as exc:
            return self._failed(job, tag, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""), t0)
        except Exception as exc:  # a library failure in one job must not end the batch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return self._failed(job, tag, f"{type(exc).__name__}: {first}", t0)
        # 4. the job's record: written last, so its presence means every output is complete
        seconds = time.perf_counter() - t0
        self._record({"event": "job-done", "job": tag, "name": job.name, "task": job.task, "key": key,
                      "process": getattr(state, "process_index", 0), "seconds": round(seconds, 4),
                      "outputs": [{"file": self.manifest.relative(o.path), "kind": o.kind, "sha256": o.sha256}
                                  for o in outputs]})
        self.outputs[job.name] = outputs
        return Outcome(job=job.name, task=job.task, status="done", outputs=outputs, seconds=seconds, tag=tag)

    def _options(self, job: Job, base: Any, state: Any) -> Any:
        return dataclasses.replace(base, preset=job.preset, device=self._device_for(job, state))

    def _failed(self, job: Job, tag: str, error: str, t0: float) -> Outcome:
        self._record({"event": "job-failed", "job": tag, "name": job.name, "error": error})
        return Outcome(job=job.name, task=job.task, status="failed", error=error, seconds=time.perf_counter() - t0, tag=tag)

    def _record(self, row: dict[str, Any]) -> None:
        """The one place the runner writes a manifest row (job-done, job-failed, job-blocked)."""
        (self.manifest or Manifest(self.out_dir)).append({**row, "run": self.run_id})

    # ------------------------------------------------------------------ models and messages
    @contextlib.contextmanager
    def _tracking(self, group: str) -> Iterator[None]:
        """Remembers which pipelines a group of jobs loaded, so they can be unloaded after it."""
        before = registry.loaded_keys()
        try:
            yield
        finally:
            self._group_keys.setdefault(group, set()).update(registry.loaded_keys() - before)

    def _unload(self, group: str) -> None:
        keys = self._group_keys.pop(group, set())
        if keys and registry.unload(keys):
            import gc

            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def _note(self, text: str) -> None:
        if not (self.quiet or self.json):
            self.progress.note(text)

    def _warn(self, text: str) -> None:
        """What the user must hear even with --quiet: a file kept, a manifest row ignored."""
        sys.stderr.write(f"warning: {text}\n")

    def _report(self, outcome: Outcome, n: int, total: int) -> None:
        if outcome.status in ("failed", "blocked"):
            sys.stderr.write(f"error: job {outcome.job} {outcome.status}: {outcome.error}\n")
        elif not (self.quiet or self.json):
            where = ", ".join(str(o.path) for o in outcome.outputs[:3]) + (" ..." if len(outcome.outputs) > 3 else "")
            verb = "skipped (done)" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f}s"
            self.progress.console.print(f"[{n}/{total}] {outcome.job} ({outcome.task}) {verb}: {where}",
                                        highlight=False, markup=False)
        if self.emit is not None and outcome.status != "done":  # done jobs emitted one line per output
            self.emit({"job": outcome.job, "task": outcome.task, "status": outcome.status, "error": outcome.error,
                       "paths": [str(o.path) for o in outcome.outputs]})
