"""MIDI -> audio: fluidsynth with a General MIDI soundfont when it is here, plain synthesis when not.

Both paths are pretty_midi's own: `PrettyMIDI.fluidsynth` (pyfluidsynth over Debian's
libfluidsynth3, with the TimGM6mb soundfont pretty_midi ships) and `PrettyMIDI.synthesize`
(one sine-like waveform per note, no instruments). The fallback is announced with one notice,
never silent; asking for a soundfont where fluidsynth is missing is an error, since the user
asked for something that cannot be honoured.

Used by `studio music render` (the "music-render" task, `MidiRenderer` below), `studio music
midi --render` and the MIDI pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from studio.errors import BackendUnavailable, InputFileError, UsageError

if TYPE_CHECKING:  # types only (the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.models import ModelSpec
    from studio.progress import Progress

DEFAULT_RATE = 44100
FALLBACK_NOTICE = "fluidsynth is not available: plain synthesiser (apt install libfluidsynth3)"


def fluidsynth_available() -> bool:
    """True when pretty_midi can drive fluidsynth (pyfluidsynth imports and libfluidsynth loads)."""
    try:
        from pretty_midi import fluidsynth as pm_fluidsynth
    except ImportError:
        return False
    # pretty_midi sets this flag when `import fluidsynth` succeeded, which needs the C library
    return bool(getattr(pm_fluidsynth, "_HAS_FLUIDSYNTH", False))


def default_soundfont() -> Path:
    """The General MIDI soundfont (TimGM6mb) bundled with pretty_midi."""
    import pretty_midi
    from pretty_midi import fluidsynth as pm_fluidsynth

    return Path(pretty_midi.__file__).resolve().parent / pm_fluidsynth.DEFAULT_SF2


def load_midi(path: str | Path, what: str = "MIDI file") -> Any:
    """A PrettyMIDI from a file; a missing, empty or corrupt file is a clean InputFileError."""
    import pretty_midi

    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a folder", "pass a .mid file")
    try:
        return pretty_midi.PrettyMIDI(str(path))
    except Exception as exc:  # mido raises OSError/EOFError/KeyError/ValueError/IndexError on bad bytes
        raise InputFileError(f"{what} {path} is not a readable MIDI file ({type(exc).__name__})",
                             "pass a standard MIDI file (.mid)") from exc


def render(midi: Any, *, sample_rate: int = DEFAULT_RATE, soundfont: str | Path | None = None,
           use_fluidsynth: bool | None = None, note: Callable[[str], None] | None = None) -> tuple[Any, int, dict]:
    """Render a PrettyMIDI to (float32 samples (T,), rate, info).

    use_fluidsynth: None picks fluidsynth when available, else the plain synthesiser with a
    notice; False forces the plain synthesiser; True demands fluidsynth. info says which engine
    and soundfont were used, for the output's metadata.
    """
    import numpy as np

    if sample_rate <= 0:
        raise UsageError(f"sample rate must be positive, got {sample_rate}", "use e.g. 44100")
    available = fluidsynth_available() if use_fluidsynth is not False else False
    if soundfont is not None:
        soundfont = Path(soundfont).expanduser()
        if not soundfont.is_file():
            raise InputFileError(f"soundfont {soundfont} does not exist", "pass a .sf2 file")
        if not available:
            raise BackendUnavailable("--soundfont needs fluidsynth, which is not available here",
                                     "install libfluidsynth3 (apt) and pyfluidsynth, or drop --soundfont")
    if use_fluidsynth is True and not available:
        raise BackendUnavailable("fluidsynth was asked for but is not available here",
                                 "install libfluidsynth3 (apt) and pyfluidsynth")

    if not any(inst.notes for inst in midi.instruments):
        # nothing to play: silence of the file's length (both synthesisers fail on an empty score)
        silent = np.zeros(max(1, int(midi.get_end_time() * sample_rate)), dtype=np.float32)
        return silent, int(sample_rate), {"engine": "none (no notes)", "soundfont": None}
    if available:
        sf2 = Path(soundfont) if soundfont else default_soundfont()
        try:
            audio = midi.fluidsynth(fs=float(sample_rate), synthesizer=str(sf2))
        except Exception as exc:  # a soundfont fluidsynth cannot load
            raise InputFileError(f"fluidsynth could not render with {sf2.name}: {exc}", "pass another .sf2 soundfont") from exc
        info = {"engine": "fluidsynth", "soundfont": sf2.name}
    else:
        # the notice is for a fallback; --plain (use_fluidsynth=False) asked for this engine
        if note is not None and use_fluidsynth is None:
            note(FALLBACK_NOTICE)
        audio = midi.synthesize(fs=sample_rate)
        info = {"engine": "pretty_midi.synthesize", "soundfont": None}
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32))  # pretty_midi divides by the peak: 0/0 on silence
    peak = float(np.abs(audio).max())
    if peak > 1.0:  # both synthesisers can exceed full scale with dense chords: normalise, never clip
        audio = audio / peak
    return audio, int(sample_rate), info


# ----------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class RenderRequest:
    input: str = field(metadata={"kind": "midi"})  # the MIDI file to render
    soundfont: str | None = None  # .sf2 soundfont (None: pretty_midi's General MIDI font; needs fluidsynth)
    rate: int = DEFAULT_RATE  # sample rate in Hz
    plain: bool = False  # pretty_midi's plain synthesiser even where fluidsynth is here
    format: str = "wav"  # wav | flac


class MidiRenderer:
    """`studio music render` as a registered task ("music-render"), so the audio carries the task
    in its tags and sidecar and `studio replay song.wav` renders the same samples again."""

    task = "music-render"
    request_type = RenderRequest
    seedless = True  # both synthesisers are deterministic: the same file gives the same samples
    needs_model = False  # a soundfont is not a model: the engine resolves none and builds no device
    output_kinds = ("audio",)

    @classmethod
    def load(cls, spec: ModelSpec | None = None, device: DeviceManager | None = None) -> "MidiRenderer":
        return cls()

    def check_inputs(self, request: RenderRequest) -> None:
        if request.plain and request.soundfont:
            raise UsageError("--plain and --soundfont both given", "a soundfont needs fluidsynth; drop one of them")
        if request.format not in ("wav", "flac"):
            raise UsageError(f"audio format {request.format!r} is not wav or flac", "e.g. --out song.wav")
        if request.rate <= 0:
            raise UsageError(f"sample rate must be positive, got {request.rate}", "use e.g. 44100")

    def run(self, request: RenderRequest, progress: Progress | None = None) -> list[Any]:
        from studio.outputs import Result

        # 1. check inputs
        self.check_inputs(request)
        midi = load_midi(request.input)
        # 2. render (fluidsynth, or the plain synthesiser with a notice when fluidsynth is missing)
        samples, rate, info = render(midi, sample_rate=request.rate, soundfont=request.soundfont,
                                     use_fluidsynth=False if request.plain else None,
                                     note=progress.note if progress is not None else None)
        # 3. one audio Result; the writer tags it with the request
        info = {**info, "seconds": round(len(samples) / rate, 3)}
        return [Result(kind="audio", value=(samples, rate), fmt=request.format, params=dataclasses.asdict(request),
                       extra={"render": info})]
