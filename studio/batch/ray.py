"""Batch and pipeline files on a Ray cluster: `studio run FILE --ray auto|local|ADDRESS`.

Ray schedules; studio keeps what makes a run a studio run. The driver (the `studio run` process)
plans and records exactly as Runner does (studio/batch/runner.py: resume, the key of each job,
blocked steps, the manifest); only where a job's pipeline runs changes:

    driver                                  Ray workers (one actor per model per slot)
    Runner._prepare: skip / redo / blocked
    graph.resolve: ${step.kind} -> paths, texts
    ship the input files a job reads  --->  StudioWorker.stream: write them to a scratch folder,
                                            Engine.stream(task, params) on a pipeline kept
    write each Result (OutputWriter), <---  loaded; yield each Result as it is made
    then the job-done row (Runner._record)

* A slot is one GPU on a GPU cluster (`num_gpus=1`), else one CPU. An actor holds one model group
  (task, model, preset, device: Job.group) and keeps its pipeline loaded from job to job; jobs go
  to an idle actor of their group, and a new actor is started only while a slot is free, so a
  model loads once per worker, not once per job. An idle actor whose group has no ready job makes
  room for another group; an actor whose group has no work left is ended (its memory goes with
  its process).
* Steps run as soon as every step they read has finished; independent steps run side by side.
* Outputs come back to the driver, which alone writes files, sidecars and the manifest through
  the OutputWriter, so --resume, replay and the manifest work as without Ray. With --shared-out,
  workers write into --out themselves (a folder every node mounts at the same path: NFS, a
  cluster file system) through the same `run_job` and writer, and the driver records the job.
* A worker killed mid-job (its process, or its node) loses only that job: what the driver wrote
  of it is removed (as --resume would) and it runs again on another worker, up to 3 times; every
  job ends exactly once in the manifest. Ctrl-C ends the actors; the writer's temp-file-and-claim
  means no half-written file is left.

Ray is imported only here, and only when --ray is given (`pip install 'studio[ray]'`).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any, Iterator

from studio.batch.manifest import Manifest
from studio.batch.model import Job, Output
from studio.batch.runner import Outcome, Report, Runner, WorkerLost, run_job, write_results
from studio.errors import RuntimeFailure, UsageError

ATTEMPTS = 3  # runs of one job before a worker that keeps dying counts as the job's failure
# the environment a worker takes from the driver: where the tasks are and how the hub is reached
# (not paths: a node has its own STUDIO_HOME and caches)
FORWARD_ENV = ("STUDIO_EXTRA_TASKS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "STUDIO_DEBUG",
               "HF_HUB_DISABLE_TELEMETRY")
FILE_KINDS = {"image", "audio", "video", "midi", "file"}  # request fields whose value is a file to ship


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--ray needs Ray, which is not installed", "pip install 'studio[ray]' (or: pip install ray)") from exc
    return ray


# =========================================================================== the worker (a Ray actor)
@dataclass
class Shipped:
    """A file's bytes travelling with a job or a Result: an input a worker cannot read at the
    driver's path, or a finished file (a muxed MP4) coming back."""

    name: str  # the file name (its suffix tells readers the format)
    data: bytes


@dataclass
class Inputs:
    """What travels with a job besides its parameters."""

    files: dict[str, Shipped] = field(default_factory=dict)  # the driver's path (as the params give it) -> its bytes
    keys: tuple[str, ...] = ()  # the params that hold those paths
    preset: Shipped | None = None  # a preset file of the user's


def _swap(value: Any, mapping: dict[str, str]) -> Any:
    """`value` with every string (or path) that is a key of `mapping` replaced by its value."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, PurePath):
        return type(value)(mapping[str(value)]) if str(value) in mapping else value
    if isinstance(value, dict):
        return {k: _swap(v, mapping) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, mapping) for v in value)
    return value


def _restore(result: Any, back: dict[str, str], keys: tuple[str, ...]) -> Any:
    """A Result made from local copies of the job's files, naming the driver's files again."""
    result.params = {k: _swap(v, back) if k in keys else v for k, v in result.params.items()}
    if isinstance(result.extra.get("preset"), str):
        result.extra = {**result.extra, "preset": back.get(result.extra["preset"], result.extra["preset"])}
    return result


class _Restoring:
    """An engine whose Results name the driver's files (what run_job writes with --shared-out)."""

    def __init__(self, engine: Any, back: dict[str, str], keys: tuple[str, ...]):
        self.engine, self.back, self.keys = engine, back, keys

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for result in self.engine.stream(*args, **kwargs):
            yield _restore(result, self.back, self.keys)


class StudioWorker:
    """One worker slot running one model group's jobs; Ray makes it an actor (`ray.remote`).
    The pipeline is loaded by the first job and cached by the registry for the actor's life."""

    def __init__(self) -> None:
        from studio.engine import Engine, RunOptions
        from studio.progress import Progress

        self.engine = Engine(RunOptions(quiet=True, write=False), progress=Progress(enabled=False))

    @contextlib.contextmanager
    def _inputs(self, params: dict[str, Any], options: Any, inputs: Inputs) -> Iterator[tuple]:
        """The job's shipped files written to a scratch folder (gone with the job): (params,
        options, back) with the driver's paths replaced by the local copies in the fields that
        hold them, and `back` to put the driver's paths into what the job records (a replay
        reads the driver's file)."""
        items = list(inputs.files.items()) + ([(options.preset, inputs.preset)] if inputs.preset else [])
        with contextlib.ExitStack() as stack:
            here: dict[str, str] = {}
            if items:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="studio-ray-job-")))
                for n, (original, item) in enumerate(items):
                    local = folder / str(n) / Path(item.name).name
                    local.parent.mkdir()
                    local.write_bytes(item.data)
                    here[original] = str(local)
            params = {k: _swap(v, here) if k in inputs.keys else v for k, v in params.items()}
            if inputs.preset:
                options = dataclasses.replace(options, preset=here[options.preset])
            yield params, dataclasses.replace(options, write=False, quiet=True, json=False), {v: k for k, v in here.items()}

    def stream(self, task: str, params: dict[str, Any], tag: str, options: Any, inputs: Inputs) -> Iterator[Any]:
        """The job's Results one by one (a Ray streaming generator): the driver writes each while
        the pipeline makes the next. A finished file travels as its bytes."""
        with self._inputs(params, options, inputs) as (params, options, back):
            for result in self.engine.stream(task, params, job=tag, options=options):
                result = _restore(result, back, inputs.keys)
                result.extra = {**result.extra, "worker": socket.gethostname()}
                if result.kind == "file":
                    result.value = Shipped(Path(result.value).name, Path(result.value).read_bytes())
                yield result

    def run_job(self, job: Job, params: dict[str, Any], tag: str, options: Any, template: str,
                inputs: Inputs) -> tuple[list[Output], list[dict[str, Any]]]:
        """--shared-out: run and write the job into the shared --out (options.out_dir, the same
        path on every node) through the usual run_job; the driver records it."""
        events: list[dict[str, Any]] = []
        with self._inputs(params, options, inputs) as (params, options, back):
            outputs = run_job(job, params, engine=_Restoring(self.engine, back, inputs.keys), options=options, tag=tag,
                              template=template, emit=events.append)
        return outputs, events


# =========================================================================== the cluster
@dataclass
class Slot:
    """One actor: the group it serves and whether a job is on it."""

    index: int  # its number in this run (the manifest's `process`)
    group: str  # the Job.group it serves
    kind: str  # the resource it holds: CPU | GPU
    handle: Any  # the Ray actor
    busy: bool = False


@dataclass
class Capacity:
    """Worker slots of the cluster by resource (CPU, GPU)."""

    total: dict[str, int]
    used: dict[str, int] = field(default_factory=dict)

    def free(self, kind: str) -> bool:
        return self.used.get(kind, 0) < self.total.get(kind, 0)


ADDRESS_HINT = ("pass auto (the cluster `ray start` began on this machine), local (a new one here), HOST:PORT "
                "(the head's port, 6379 unless `ray start --head --port` said otherwise) or ray://HOST:10001")


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def _check_address(address: str) -> None:
    """A cluster that is not there is an error now: ray.init would retry its connection for
    minutes, deaf to Ctrl-C, before it gave up."""
    if address == "local":
        return
    target = address
    if address == "auto":
        try:  # where ray.init("auto") would go: RAY_ADDRESS, else the cluster `ray start` recorded here
            from ray._private.services import get_ray_address_from_environment

            target = get_ray_address_from_environment("auto", None)
        except Exception:  # no cluster found; ray.init says so at once
            return
    found = _host_port(target)
    if found is None:
        return
    host, port = found
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"--ray {address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc})",
                         "start one with `ray start --head` (other nodes: `ray start --address HEAD:6379`), "
                         "or run on this machine alone with --ray local") from None


@contextlib.contextmanager
def connected(address: str, *, debug: bool = False) -> Iterator[Any]:
    """ray.init for the run and ray.shutdown after it (which, for `local`, stops the cluster it
    started). Ray's own SIGTERM handler would end the driver without cleanup: ours is kept."""
    if address not in ("auto", "local") and _host_port(address) is None:
        raise UsageError(f"--ray {address}: not an address", ADDRESS_HINT)
    ray = require_ray()
    _check_address(address)
    _token_auth(address)
    _quiet_notices(ray, debug)
    kwargs: dict[str, Any] = dict(address=address, namespace="studio", log_to_driver=debug,
                                  logging_level=logging.INFO if debug else logging.ERROR)
    if address == "local":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # studio does not report usage on its own
        kwargs["include_dashboard"] = False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({first})",
                         "start one with `ray start --head` (other nodes: `ray start --address HEAD:6379`), or run "
                         "on this machine alone with --ray local; a cluster with token authentication needs its token "
                         "here (RAY_AUTH_TOKEN, or ~/.ray/auth_token)") from exc
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()


def _token_auth(address: str) -> None:
    """Ray's token authentication (2.5x on): a new local cluster gets a token, and `ray start`
    turns it on for a node when the machine holds one (~/.ray/auth_token, or RAY_AUTH_TOKEN).
    A driver presents it only under RAY_AUTH_MODE=token, so without that studio does what
    `ray start` does: present the machine's token when there is one (a cluster without
    authentication accepts it too). For `--ray local` the token is a fresh one for the run, held
    in this process's environment: Ray would write it to ~/.ray/auth_token, which turns
    authentication on for every `ray start` on the machine from then on. RAY_AUTH_MODE set by the
    user is left as it is."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    if address == "local":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    elif not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    with contextlib.suppress(Exception):
        Config.initialize("")  # Ray's own switch does this too: the cached config sees the mode


def _quiet_notices(ray: Any, debug: bool) -> None:
    """Ray's driver prints its nodes' notices ("A worker died ...", a paragraph each) on stdout,
    where a --json reader expects JSON alone. studio says what it does about a lost worker in one
    line; Ray's own notice goes to stderr under --debug, else nowhere. (Ray has no setting for
    this: its module-level printer is replaced, and left alone if a Ray release renames it.)"""
    module = getattr(getattr(ray, "_private", None), "worker", None)
    current = getattr(module, "print_to_stdstream", None)
    if current is None:
        return
    original = getattr(current, "original", current)

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        if debug:
            original({**data, "is_err": True}, ignore_prefix)

    to_stderr.original = original  # type: ignore[attr-defined]
    module.print_to_stdstream = to_stderr


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker, node or object that went away (not the job's own failure)."""
    names = ("RayActorError", "ActorUnavailableError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
             "NodeDiedError", "ObjectFetchTimedOutError", "ObjectReconstructionFailedError", "LocalRayletDiedError",
             "RaySystemError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


class Cancelled(WorkerLost):
    """The driver was interrupted: the job is neither retried nor recorded."""


# =========================================================================== the driver
class RayRun:
    """Runs `runner`'s file on a Ray cluster: `RayRun(runner, "auto").run() -> Report`."""

    def __init__(self, runner: Runner, address: str, *, shared_out: bool = False, debug: bool = False,
                 attempts: int = ATTEMPTS):
        self.runner = runner
        self.address = address
        self.shared_out = shared_out
        self.debug = debug
        self.attempts = attempts
        self.cancelled = threading.Event()
        self._emit_lock = threading.Lock()
        self._numbers = itertools.count()
        self.slots: list[Slot] = []
        self.retried: list[str] = []  # job names run again after their worker was lost

    # ------------------------------------------------------------------ the run
    def run(self) -> Report:
        r = self.runner
        started = time.perf_counter()
        if self.shared_out:
            r.out_dir = r.out_dir.expanduser().resolve()  # the workers write to the same path
        with connected(self.address, debug=self.debug) as ray:
            self.ray = ray
            self.lost = _lost_errors(ray)
            self.capacity = self._capacity()
            r.manifest = r._open_manifest(None, r.file.jobs)
            emit = r.emit
            if emit is not None:  # outputs are written from several threads: one JSON line at a time
                def locked(event: dict[str, Any]) -> None:
                    with self._emit_lock:
                        emit(event)
                r.emit = locked
            from studio.engine import RunOptions

            self.base = RunOptions(out_dir=r.out_dir, quiet=True, json=False, offline=r.offline,
                                   allow_pickle=r.allow_pickle, trust_remote_code=r.trust_remote_code, write=False)
            self.scratch = Path(tempfile.mkdtemp(prefix="studio-ray-driver-"))
            try:
                outcomes = self._schedule()
            finally:
                self.cancelled.set()
                for slot in list(self.slots):
                    self._end(slot)
                shutil.rmtree(self.scratch, ignore_errors=True)
                r.emit = emit
        by_name = {o.job: o for o in outcomes}
        ordered = [by_name[job.name] for job in r.file.jobs if job.name in by_name]
        return Report(outcomes=ordered, out_dir=r.out_dir, seconds=time.perf_counter() - started,
                      processes=sum(self.capacity.total.values()))

    def _slots(self) -> dict[str, int]:
        resources = self.ray.cluster_resources()
        return {"CPU": int(resources.get("CPU", 0)), "GPU": int(resources.get("GPU", 0))}

    def _capacity(self) -> Capacity:
        total = self._slots()
        if not any(total.values()):
            raise UsageError(f"the Ray cluster at {self.address} offers no CPU or GPU to run on",
                             "start its nodes with --num-cpus N (or --num-gpus N)")
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        slots = f"{total['GPU']} GPU" if total["GPU"] else f"{total['CPU']} CPU"
        self.runner._note(f"ray: {nodes} node(s), {slots} worker slot(s)")
        return Capacity(total)

    def _kind(self, job: Job) -> str:
        """The slot a job's actor takes: a GPU when the cluster has them and the job may use one."""
        from studio import registry

        device = str(self.runner._device_for(job).get("device") or "auto")
        needs_model = getattr(registry.pipeline_class(job.task), "needs_model", True)
        if self.capacity.total.get("GPU") and needs_model and device != "cpu":
            return "GPU"
        return "CPU"

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> list[Outcome]:
        r = self.runner
        jobs = {job.name: job for job in r.file.jobs}
        total = len(jobs)
        steps = [job for job in jobs.values() if job.needs]  # wait for the steps they read
        queues: dict[str, deque] = {}  # group -> ready (job, key, tag, tries so far), in run order
        running: dict[futures.Future, tuple[Slot, Job, str, str, int]] = {}
        settled: dict[str, Outcome] = {}
        remaining: dict[str, int] = {}  # group -> jobs not settled yet (an actor is ended when none is left)
        for job in jobs.values():
            remaining[job.group] = remaining.get(job.group, 0) + 1
        pool = futures.ThreadPoolExecutor(max_workers=max(1, sum(self.capacity.total.values())),
                                          thread_name_prefix="studio-ray")
        try:
            with r.progress:
                bar = r.progress.task(r.file.name, total=total)

                def settle(outcome: Outcome) -> None:
                    settled[outcome.job] = outcome
                    remaining[jobs[outcome.job].group] -= 1
                    r._report(outcome, len(settled), total)
                    bar.advance()

                def prepare(job: Job) -> None:
                    """Skipped (resume), blocked (a step it reads failed), or ready to run."""
                    prepared = r._prepare(job)
                    if isinstance(prepared, Outcome):
                        settle(prepared)
                    else:
                        queues.setdefault(job.group, deque()).append((*prepared, 0))

                for job in jobs.values():
                    if not job.needs:
                        prepare(job)
                while len(settled) < total:
                    # 1. steps whose inputs are settled (one settling may free the next)
                    while ready_steps := [s for s in steps if all(n in settled for n in s.needs)]:
                        for step in ready_steps:
                            steps.remove(step)
                            prepare(step)
                    # 2. actors whose group has no work left end; ready jobs go to actors
                    for slot in [s for s in self.slots if not s.busy and remaining.get(s.group, 0) == 0]:
                        self._end(slot)
                    for item in self._dispatch(queues):
                        running[pool.submit(self._attempt, *item[:4])] = item
                    if not running:
                        if len(settled) == total:
                            break
                        job = next((q[0][0] for q in queues.values() if q), None)
                        if job is not None:  # nothing runs, so every slot is free: none is of this kind
                            raise UsageError(f"job {job.name} needs a {self._kind(job)} and the Ray cluster at "
                                             f"{self.address} has none", "add a node with one, or pass --device cpu")
                        raise RuntimeFailure(f"steps {', '.join(s.name for s in steps)} wait for steps that never ran",
                                             "report it: a bug in studio's Ray scheduler")
                    # 3. wait for a job to end (Ctrl-C lands here)
                    done, _ = futures.wait(running, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                    for future in done:
                        slot, job, key, tag, tries = running.pop(future)
                        slot.busy = False
                        try:
                            outcome = future.result()
                        except WorkerLost as exc:
                            self._lose(slot, job, tag)
                            if tries + 1 < self.attempts:
                                r._warn(f"job {job.name}: its worker was lost ({exc}); running it again")
                                self.retried.append(job.name)
                                queues.setdefault(job.group, deque()).appendleft((job, key, tag, tries + 1))
                                continue
                            error = (f"its worker was lost {tries + 1} times (last: {exc}); a job that ends "
                                     f"its worker (out of memory?) is not tried again")
                            r._record({"event": "job-failed", "job": tag, "name": job.name, "error": error})
                            outcome = Outcome(job=job.name, task=job.task, status="failed", error=error, tag=tag)
                        outcome.process = slot.index
                        settle(outcome)
        except BaseException:
            self.cancelled.set()  # running jobs stop at their next output; nothing more is written
            for slot in list(self.slots):
                self._end(slot)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return list(settled.values())

    def _dispatch(self, queues: dict[str, deque]) -> list[tuple[Slot, Job, str, str, int]]:
        """Ready jobs paired with actors: an idle actor takes its own group's next job; a group
        with jobs left gets new actors while a slot is free, or in place of an idle actor whose
        group has nothing ready. Groups are served in run order (a file's jobs of one model come
        together), so a model fills the slots, and the next model takes them as it finishes."""
        started = []

        def take(slot: Slot, queue: deque) -> None:
            slot.busy = True
            started.append((slot, *queue.popleft()))

        for slot in self.slots:
            if not slot.busy and queues.get(slot.group):
                take(slot, queues[slot.group])
        for group, queue in queues.items():
            while queue:
                kind = self._kind(queue[0][0])
                if not self.capacity.free(kind):
                    spare = next((s for s in self.slots if not s.busy and s.kind == kind and not queues.get(s.group)), None)
                    if spare is None:
                        break
                    self._end(spare)
                take(self._start(queue[0][0], kind), queue)
        return started

    def _start(self, job: Job, kind: str) -> Slot:
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        if self.runner.offline:
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        resources = {"num_gpus": 1} if kind == "GPU" else {"num_cpus": 1}
        actor = self.ray.remote(StudioWorker).options(max_restarts=0, max_concurrency=1, runtime_env={"env_vars": env},
                                                **resources)
        slot = Slot(index=next(self._numbers), group=job.group, kind=kind, handle=actor.remote())
        self.capacity.used[kind] = self.capacity.used.get(kind, 0) + 1
        self.slots.append(slot)
        return slot

    def _end(self, slot: Slot) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
            self.capacity.used[slot.kind] = self.capacity.used.get(slot.kind, 1) - 1
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)

    def _lose(self, slot: Slot, job: Job, tag: str) -> None:
        """A lost worker's actor is ended, and what the driver wrote of its job is removed (as
        --resume would), so that the retry's outputs are the job's only ones."""
        self._end(slot)
        if self.cancelled.is_set():
            return
        with contextlib.suppress(Exception):  # a node that went away takes its slots with it
            self.capacity.total = self._slots()
        _, kept = Manifest(self.runner.out_dir).clear_leftovers(job.name, tag)
        for note in kept:
            self.runner._warn(note)

    # ------------------------------------------------------------------ one job, in a driver thread
    def _attempt(self, slot: Slot, job: Job, key: str, tag: str) -> Outcome:
        """Runner._run_ready (resolve, run, record job-done or job-failed) with the job run on
        `slot`'s actor. A lost worker raises WorkerLost and records nothing."""
        state = SimpleNamespace(process_index=slot.index)

        def remote(job: Job, params: dict[str, Any], options: Any, tag: str, template: str) -> list[Output]:
            inputs, params = self._ship(job, params, options)
            if slot.kind == "GPU" and str(options.device.get("device") or "").startswith("cuda:"):
                # Ray shows an actor its one GPU as cuda:0: a file's cuda:N names a GPU it cannot see
                options = dataclasses.replace(options, device={**options.device, "device": "cuda"})
            if self.shared_out:
                ref = slot.handle.run_job.remote(job, params, tag, options, template, inputs)
                outputs, events = self._get(ref)
                for event in events:
                    if self.runner.emit is not None:
                        self.runner.emit(event)
                return outputs
            gen = slot.handle.stream.options(num_returns="streaming").remote(job.task, params, tag, options, inputs)
            return write_results(job, self._results(gen), out_dir=options.out_dir, template=template, tag=tag,
                                 emit=self.runner.emit)

        return self.runner._run_ready(job, key, tag, engine=None, base=self.base, state=state, run=remote)

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.lost as exc:
            raise (Cancelled if self.cancelled.is_set() else WorkerLost)(_first_line(exc)) from exc
        except self.ray.exceptions.RayTaskError as exc:  # the job's own failure, as it was raised
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else RuntimeFailure(_first_line(exc))) from None

    def _results(self, gen: Any) -> Iterator[Any]:
        """The Results of a streaming call, each fetched as it is ready; a finished file's bytes
        land in the driver's scratch folder for the writer to copy."""
        while True:
            if self.cancelled.is_set():
                raise Cancelled("interrupted")
            try:
                ref = next(gen)
            except StopIteration:
                return
            except self.lost as exc:
                raise (Cancelled if self.cancelled.is_set() else WorkerLost)(_first_line(exc)) from exc
            result = self._get(ref)
            if isinstance(result.value, Shipped):
                folder = Path(tempfile.mkdtemp(dir=self.scratch))
                (folder / result.value.name).write_bytes(result.value.data)
                result.value = str(folder / result.value.name)
            if self.cancelled.is_set():
                raise Cancelled("interrupted")
            yield result

    def _ship(self, job: Job, params: dict[str, Any], options: Any) -> tuple[Inputs, dict[str, Any]]:
        """The files a job reads (its request fields that take a file) and a preset of the
        user's, as bytes: a worker on another node cannot read the driver's disk. A model is not
        shipped (each node has it, or its hub cache); a local model path is made absolute, for
        workers on this machine. With --shared-out, outputs of earlier steps are read where they
        are. A built-in preset is in every node's install."""
        from studio import registry
        from studio.batch import graph
        from studio.outputs import within
        from studio.paths import PACKAGE_PRESETS

        request_type = registry.pipeline_class(job.task).request_type
        inputs = Inputs()
        keys = []

        def visit(value: Any) -> bool:
            if isinstance(value, (list, tuple)):
                return any([visit(v) for v in value])
            if not isinstance(value, (str, PurePath)):
                return False
            path = Path(str(value)).expanduser()
            if not path.is_file() or (self.shared_out and within(path, self.runner.out_dir)):
                return False
            if str(value) not in inputs.files:
                inputs.files[str(value)] = Shipped(path.name, path.read_bytes())
            return True

        out = dict(params)
        for key, value in params.items():
            if key == "model" and isinstance(value, str) and value and Path(value).expanduser().exists():
                out[key] = str(Path(value).expanduser().resolve())
            elif graph.field_kind(request_type, key) in FILE_KINDS and visit(value):
                keys.append(key)
        inputs.keys = tuple(keys)
        if options.preset:
            path = self.runner._preset(options.preset).path
            if path.parent.resolve() != PACKAGE_PRESETS.resolve():
                inputs.preset = Shipped(path.name, path.read_bytes())
        return inputs, out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_on_ray(runner: Runner, address: str, *, shared_out: bool = False, debug: bool = False) -> Report:
    """Run `runner`'s file on the Ray cluster at `address` (auto | local | HOST:PORT | ray://...)."""
    return RayRun(runner, address, shared_out=shared_out, debug=debug).run()


__all__ = ["RayRun", "StudioWorker", "connected", "require_ray", "run_on_ray"]
