"""`studio doctor`: what this machine has and what `auto` picks, and why."""

from typing import Annotated, Any

import typer

from studio.cli.common import DEVICE, Globals, global_options


def register(root: typer.Typer) -> None:
    root.command("doctor")(doctor)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect(settings: Any) -> dict[str, Any]:
    import platform
    import shutil

    import torch

    from studio.device import NATIVE_BF16_FLAGS, DeviceManager, module_available, native_bf16, read_cpu_flags
    from studio.errors import StudioError
    from studio.limits import fmt_bytes, memory_budget
    from studio.paths import hf_cache_dir, is_offline, studio_home

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    report["libraries"] = {n: _version(n) for n in ("studio", "torch", "torchvision", "diffusers", "transformers",
                                                     "accelerate", "peft", "open_clip_torch", "torchao", "compel",
                                                     "miditok", "pretty_midi", "imageio-ffmpeg", "opencv-python-headless")}
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    # the same flags (and STUDIO_CPU_FLAGS override) the device manager decides bf16 from: x86
    # avx512_bf16 / amx_bf16 and Arm's bf16; None where the OS does not say (macOS, Windows)
    flags = read_cpu_flags()
    devices[0]["native_bf16"] = native_bf16(flags)
    devices[0]["bf16_flags"] = sorted(set(flags) & set(NATIVE_BF16_FLAGS)) if flags is not None else None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append({"device": "mps"})
    report["devices"] = devices
    report["cuda_build"] = torch.version.cuda
    try:
        manager = DeviceManager(settings, cpu_flags=flags)
        report["auto"] = manager.describe()
        budget, source = memory_budget(manager)  # what up-front request checks compare estimates with
        report["memory"] = {"available": fmt_bytes(budget) if budget is not None else None, "bytes": budget, "source": source}
    except StudioError as exc:
        report["auto"] = {"error": exc.message, "hint": exc.hint}
    ffmpeg = None
    try:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        ffmpeg = shutil.which("ffmpeg")
    fluidsynth = False
    try:
        import fluidsynth  # noqa: F401  (pyfluidsynth loads libfluidsynth at import)

        fluidsynth = True
    except Exception:
        pass
    cuda = torch.cuda.is_available()
    report["backends"] = {
        "sdpa_flash_cpu": True,  # torch's SDPA flash kernel has a CPU implementation
        "xformers": module_available("xformers") and cuda,
        "flash_attn": module_available("flash_attn") and cuda,
        "bitsandbytes": module_available("bitsandbytes") and cuda,
        "torchao": module_available("torchao"),
        "fluidsynth": fluidsynth,
        "ffmpeg": ffmpeg,
        "controlnet_aux": module_available("controlnet_aux"),
        "offload": cuda,  # diffusers offloading needs an accelerator
    }
    report["hub"] = {"cache": str(hf_cache_dir()), "offline": is_offline(), "studio_home": str(studio_home())}
    if not is_offline():
        report["hub"]["reachable"] = _hub_reachable()
    return report


def _hub_reachable(timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@global_options(*DEVICE, "json", "offline")
def doctor(opts: Globals = None) -> None:
    """Versions, devices, what `auto` picks for device/precision/attention and why, optional backends,
    and the model cache."""
    import json

    from studio.device import DeviceSettings

    settings = DeviceSettings.from_sources(flags=opts.device_flags())
    report = collect(settings)
    if opts.json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="studio doctor", show_header=True)
    table.add_column("what")
    table.add_column("value")
    table.add_row("python", report["python"])
    for name, v in report["libraries"].items():
        table.add_row(name, v or "[red]not installed")
    for d in report["devices"]:
        table.add_row(f"device {d['device']}", ", ".join(f"{k}={v}" for k, v in d.items() if k != "device"))
    auto = report["auto"]
    if "error" in auto:
        table.add_row("settings", f"[red]{auto['error']}[/] ({auto['hint']})")
    else:
        for key, value in auto["resolved"].items():
            table.add_row(f"{key} -> {value}", auto["reasons"].get(key, ""))
        for text in auto.get("warnings", []):
            table.add_row("[yellow]warning", text)
    if report.get("memory"):
        table.add_row("memory for a run", f"{report['memory']['available']} ({report['memory']['source']})")
    for name, ok in report["backends"].items():
        table.add_row(f"backend {name}", ("[green]yes" if ok else "[dim]no") + (f" ({ok})" if isinstance(ok, str) else ""))
    for key, value in report["hub"].items():
        table.add_row(f"hub {key}", str(value))
    Console().print(table)
