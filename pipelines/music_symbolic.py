"""Symbolic music: a decoder-only transformer over miditok REMI tokens writes MIDI.

The model is any transformers causal LM (GPT2LMHeadModel for the models studio trains and the
tiny test model) whose vocabulary is a miditok REMI tokenizer saved beside it as
`tokenizer.json` (miditok's own file name, so `miditok.REMI.from_pretrained(folder)` reads it
too). REMI writes a piece as

    Bar TimeSig_4/4 Position_0 Tempo_121.29 Program_0 Pitch_60 Velocity_95 Duration_1.0.4 ...

and every control here is a rule on which token may come next (constrained decoding, one
LogitsProcessor), so a control is honoured by construction rather than hoped for:

- grammar: tokens follow REMI's order (Bar -> [TimeSig] -> Position -> [Tempo] -> Program ->
  Pitch -> Velocity -> Duration), positions rise inside a bar and stay inside its length, no
  empty bars, at most MAX_NOTES_PER_POSITION notes start together. Any model, even a random
  one, yields a well-formed file.
- --bars N: EOS is masked until N bars exist, and the N+1st Bar is masked (EOS instead).
  --seconds S becomes enough bars at the tempo, and notes are cut at S seconds.
- --tempo: the nearest Tempo token is forced at the first position and tempo changes are masked;
  the written MIDI then carries the exact BPM (REMI's tempo tokens are binned).
- --time-signature: its TimeSig token is forced after the first Bar (must be in the vocabulary).
- --program / --instrument: only that Program token may start a note.
- --key: Pitch tokens outside the scale are masked. The rule: every pitched note is in the key,
  except chord tones asked for with --chords (a D major chord in C major keeps its F#). Drums
  (Program -1, PitchDrum tokens) are unpitched and never constrained.
- --chords "C G Am F": one chord per bar, cycling. Notes that start on a beat must be chord
  tones; notes between beats may be passing tones (in the key when --key is given) but chord
  tones get a CHORD_BIAS logit bonus, so chord tones dominate each bar.
- --primer FILE.mid: the primer is tokenized and becomes the prompt; generation continues it
  for --bars more bars, and the output holds primer + continuation.

Longer pieces than the model's context are generated in windows (the prompt slides; the
grammar state follows the whole piece).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from studio.errors import InputFileError, UsageError
from studio.models import ModelSpec, loading
from studio.outputs import Result
from studio.pipeline import seeds_for
from studio.progress import quiet_transformers


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

DEFAULT_BARS = 8
MAX_BARS = 512
MAX_NOTES_PER_POSITION = 6  # a four-part chorale needs 4 (5 with a doubled voice); caps runaway chords
CHORD_BIAS = 4.0  # logit bonus for chord tones between beats: exp(4) ~ 55x more likely than a passing tone
SECONDS_DEFAULT_TEMPO = 120.0  # --seconds needs a tempo to count bars; Magenta's default qpm

# Scales as semitones above the tonic (the textbook modes; no library spells these more simply).
SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "harmonic-minor": (0, 2, 3, 5, 7, 8, 11),
    "melodic-minor": (0, 2, 3, 5, 7, 9, 11),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
    "major-pentatonic": (0, 2, 4, 7, 9),
    "minor-pentatonic": (0, 3, 5, 7, 10),
    "blues": (0, 3, 5, 6, 7, 10),
}
MODE_ALIASES = {"maj": "major", "ionian": "major", "min": "minor", "m": "minor", "aeolian": "minor",
                "harmonic": "harmonic-minor", "melodic": "melodic-minor", "pentatonic": "major-pentatonic"}
NOTE_PCS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
DRUM_NAMES = {"drums", "drum", "drumkit", "drum-kit", "percussion", "kit"}


@dataclass(frozen=True)
class MidiRequest:
    """What `studio music midi` asks for. Every field is recorded in the MIDI and its sidecar."""

    model: str = "auto"  # alias, hub id or folder of a causal LM with a miditok tokenizer.json
    bars: int | None = None  # bars to generate (after the primer); default 8 unless seconds is given
    seconds: float | None = None  # length in seconds instead of bars (uses tempo, default 120 BPM)
    tempo: float | None = None  # BPM written into the MIDI; None lets the model choose
    key: str | None = None  # "C:major", "A:minor", "F#:dorian", "Bb" ...: pitches stay in the scale
    time_signature: str | None = None  # "4/4", "3/4", "6/8" ...: forced and written into the MIDI
    chords: str | None = None  # "C G Am F": one chord per bar, cycling; chord tones dominate each bar
    program: int | None = None  # General MIDI program 0-127 for every note
    instrument: str | None = None  # a General MIDI instrument name instead of program ("violin", "drums")
    primer: str | None = None  # a MIDI file to continue
    temperature: float = 1.0  # sampling temperature (>0)
    top_k: int | None = None  # sample among the k likeliest tokens (None/0: all)
    top_p: float | None = None  # nucleus sampling mass (None/1: off)
    num_outputs: int = 1  # how many pieces; seeds seed, seed+1, ...
    seed: int | None = None  # random seed (the engine fills one in and records it)
    render: bool = False  # also write a WAV rendering beside each MIDI (NAME.render.wav)
    soundfont: str | None = None  # .sf2 for --render (default: pretty_midi's General MIDI soundfont)
    adapters: tuple[str, ...] = ()  # peft adapters "PATH[:SCALE]" (studio adapt train --task midi)


# ----------------------------------------------------------------------------- parsing helpers
def parse_key(text: str) -> tuple[int, str, frozenset[int]]:
    """'C:major' | 'C major' | 'Am' | 'f#:dorian' | 'Bb' -> (tonic pitch class, mode, scale pcs)."""
    m = re.fullmatch(r"\s*([A-Ga-g])([#b\u266f\u266d]?)\s*[:\s_-]?\s*([A-Za-z\-]*)\s*", text or "")
    if not m:
        raise UsageError(f"cannot read key {text!r}", "write it as TONIC:MODE, e.g. C:major, A:minor, F#:dorian")
    letter, accidental, mode = m.group(1).upper(), m.group(2), m.group(3).lower()
    tonic = (NOTE_PCS[letter] + (1 if accidental in ("#", "\u266f") else -1 if accidental in ("b", "\u266d") else 0)) % 12
    mode = MODE_ALIASES.get(mode, mode) or "major"
    if mode not in SCALES:
        raise UsageError(f"unknown mode {m.group(3)!r} in key {text!r}", f"modes: {', '.join(SCALES)}")
    return tonic, mode, frozenset((tonic + step) % 12 for step in SCALES[mode])


def parse_time_signature(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,2})\s*/\s*(\d{1,2})\s*", text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) not in (1, 2, 4, 8, 16, 32):
        raise UsageError(f"cannot read time signature {text!r}", "write it as N/D, e.g. 4/4, 3/4, 6/8")
    return int(m.group(1)), int(m.group(2))


def parse_chords(text: str) -> list[tuple[str, frozenset[int]]]:
    """'C G Am F' (or 'C | G | Am | F') -> [(symbol, chord pitch classes)] via music21's chord symbols."""
    from music21 import harmony

    symbols = [s for s in re.split(r"[\s|,]+", text or "") if s]
    if not symbols:
        raise UsageError("--chords is empty", 'give chord symbols, one per bar, e.g. --chords "C G Am F"')
    chords = []
    for symbol in symbols:
        # music21 spells flats with '-' (B-); users write Bb, Ebmaj7, F/Bb
        figure = re.sub(r"(^|/)([A-G])b", r"\1\2-", symbol)
        try:
            pcs = frozenset(p.pitchClass for p in harmony.ChordSymbol(figure).pitches)
        except Exception as exc:  # music21 raises ValueError/HarmonyException/KeyError on unknown figures
            raise UsageError(f"cannot read chord {symbol!r}", "use symbols like C, Am, G7, Fmaj7, Bb, D/F#, Bdim, Csus4") from exc
        if not pcs:
            raise UsageError(f"chord {symbol!r} has no notes", "use symbols like C, Am, G7")
        chords.append((symbol, pcs))
    return chords


def instrument_program(name: str) -> int:
    """A General MIDI instrument name (exact, or a unique part of one) -> program; drums -> -1."""
    from pretty_midi.constants import INSTRUMENT_MAP

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]+", "", s.lower())

    key = norm(name)
    if key in {norm(d) for d in DRUM_NAMES}:
        return -1
    names = [norm(n) for n in INSTRUMENT_MAP]
    if key in names:
        return names.index(key)
    hits = [i for i, n in enumerate(names) if key and key in n]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UsageError(f"instrument {name!r} matches several General MIDI instruments",
                         "pick one: " + ", ".join(INSTRUMENT_MAP[i] for i in hits[:8]))
    raise UsageError(f"unknown instrument {name!r}",
                     "use a General MIDI name (acoustic grand piano, violin, flute, electric bass, drums ...) or --program N")


# ----------------------------------------------------------------------------- tokenizer
def load_midi_tokenizer(location: str | Path, revision: str | None = None) -> Any:
    """The miditok tokenizer saved beside a model (tokenizer.json), as its own class."""
    import miditok

    path = Path(location)
    if path.is_dir():
        params = path / "tokenizer.json"
    elif path.is_file():
        params = path
    else:  # a hub id (online): fetch only the tokenizer file
        from huggingface_hub import hf_hub_download

        params = Path(hf_hub_download(str(location), "tokenizer.json", revision=revision))
    if not params.is_file():
        raise UsageError(f"{location} has no miditok tokenizer.json beside the model",
                         "a MIDI model folder holds the transformers model and miditok's tokenizer.json "
                         "(`studio models make-tiny midi-lm DIR` shows the layout)")
    try:
        tokenization = json.loads(params.read_text())["tokenization"]
        return getattr(miditok, tokenization)(params=params)
    except (KeyError, AttributeError, ValueError, TypeError) as exc:
        raise UsageError(f"{params} is not a miditok tokenizer file ({type(exc).__name__}: {exc})",
                         "save the tokenizer with miditok's tokenizer.save(folder)") from exc


def default_tokenizer() -> Any:
    """The REMI tokenizer studio trains with: REMI+ (programs, tempos, time signatures), 16th-note grid
    (8 positions per beat up to a bar of 4/4 would double the vocabulary for chorale-like music)."""
    from miditok import REMI, TokenizerConfig

    config = TokenizerConfig(
        pitch_range=(21, 109),
        beat_res={(0, 4): 4, (4, 12): 2},
        num_velocities=8,
        use_tempos=True, num_tempos=32, tempo_range=(40, 250),
        use_time_signatures=True,
        use_programs=True, one_token_stream_for_programs=True, programs=list(range(-1, 128)),
        special_tokens=["PAD", "BOS", "EOS", "MASK"],
    )
    return REMI(config)


def score_to_pretty_midi(score: Any) -> Any:
    import pretty_midi

    return pretty_midi.PrettyMIDI(io.BytesIO(score.dumps_midi()))




# ----------------------------------------------------------------------------- constrained decoding
class RemiVocab:
    """Token ids of a REMI vocabulary grouped by type, as boolean masks over the model's logits."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        import torch

        if getattr(tokenizer, "is_trained", False):
            raise UsageError("this MIDI model's tokenizer was trained with BPE/Unigram merges",
                             "constrained decoding needs plain REMI tokens; use a model with an untrained tokenizer")
        config = tokenizer.config
        if type(tokenizer).__name__ != "REMI":
            raise UsageError(f"this MIDI model uses miditok {type(tokenizer).__name__} tokens",
                             "studio's constrained decoding reads REMI; train one with `studio music train`")
        if config.use_programs and (config.program_changes or not config.one_token_stream_for_programs):
            raise UsageError("this MIDI model's tokenizer uses program changes / one stream per track",
                             "use a REMI tokenizer with one_token_stream_for_programs and without program_changes")
        self.size = max(vocab_size, len(tokenizer))
        self.type_of: dict[int, tuple[str, str]] = {}
        for token, idx in tokenizer.vocab.items():
            kind, _, value = token.partition("_")
            self.type_of[idx] = (kind, value)
        ids = lambda kind: {v: i for i, (k, v) in self.type_of.items() if k == kind}  # noqa: E731
        self.bar = ids("Bar").get("None")
        self.bos = tokenizer["BOS_None"] if "BOS_None" in tokenizer.vocab else None
        self.eos = tokenizer["EOS_None"] if "EOS_None" in tokenizer.vocab else None
        self.pad = tokenizer.pad_token_id
        if self.bar is None or self.eos is None or self.bos is None:
            raise UsageError("this MIDI model's tokenizer lacks Bar, BOS or EOS tokens",
                             "use a REMI tokenizer with special tokens PAD, BOS, EOS")
        self.timesigs = {tuple(int(x) for x in v.split("/")): i for v, i in ids("TimeSig").items()}
        self.positions = {int(v): i for v, i in ids("Position").items()}
        self.tempos = {float(v): i for v, i in ids("Tempo").items()}
        self.programs = {int(v): i for v, i in ids("Program").items()}
        self.pitches = {int(v): i for v, i in ids("Pitch").items()}
        self.drum_pitches = {int(v): i for v, i in ids("PitchDrum").items()}
        self.velocities = list(ids("Velocity").values())
        self.durations = list(ids("Duration").values())
        self.pos_per_beat = int(config.max_num_pos_per_beat)
        self.use_programs = bool(config.use_programs)
        self._torch = torch
        self._cache: dict[Any, Any] = {}

    def mask(self, ids: Any) -> Any:
        key = ("ids", tuple(sorted(ids)))
        if key not in self._cache:
            m = self._torch.zeros(self.size, dtype=self._torch.bool)
            m[list(ids)] = True
            self._cache[key] = m
        return self._cache[key]

    def bar_length(self, ts: tuple[int, int]) -> int:
        """Positions in a bar: REMI counts max_num_pos_per_beat positions per beat of the denominator."""
        return max(1, min(ts[0] * self.pos_per_beat, len(self.positions)))

    def nearest_tempo(self, bpm: float) -> int | None:
        if not self.tempos:
            return None
        return self.tempos[min(self.tempos, key=lambda t: abs(t - bpm))]


@dataclass
class RemiState:
    """Where one sequence is in the REMI grammar; updated token by token."""

    bars: int = 0  # Bar tokens so far; the current bar is bars - 1
    last: str = "start"  # type of the last token
    pos: int = -1  # current position in the bar (-1: none yet)
    ts: tuple[int, int] = (4, 4)  # current time signature
    ts_seen: bool = False  # a TimeSig token has been written
    tempo_seen: bool = False  # a Tempo token has been written
    program: int | None = None  # program of the note being written
    notes_here: int = 0  # notes started at the current position


@dataclass(frozen=True)
class Controls:
    """The resolved controls the processor enforces."""

    target_bars: int  # total Bar tokens when the piece ends (primer bars + new bars)
    first_new_bar: int  # index of the first generated bar (chords count from here)
    time_signature: tuple[int, int] | None  # forced TimeSig
    tempo_token: int | None  # forced Tempo token id
    program: int | None  # forced program
    scale: frozenset[int] | None  # allowed pitch classes (--key)
    chords: tuple[frozenset[int], ...] = ()  # chord pitch classes per bar, cycling
    chord_bias: float = CHORD_BIAS


@dataclass(frozen=True)
class Primer:
    """A MIDI file to continue, as the generator needs it."""

    ids: list[int]  # its REMI tokens (the prompt)
    tempos: tuple[tuple[float, float], ...]  # its exact tempo map: (time in quarter notes, BPM)
    time_signature: tuple[int, int] | None  # its last time signature, which the continuation keeps


class RemiConstraint:
    """A transformers LogitsProcessor: masks every token the REMI grammar or a control forbids.

    It ingests the tokens it has not seen yet on each call, so one instance follows a piece
    across several `generate` calls (the windows of a long piece): call `begin(prompt_len)`
    before each call.
    """

    def __init__(self, vocab: RemiVocab, controls: Controls, on_bar: Callable[[int], None] | None = None):
        self.v = vocab
        self.c = controls
        self.state = RemiState()
        self.on_bar = on_bar
        self._seen = 0

    # -- state
    def ingest(self, token_id: int) -> None:
        st = self.state
        kind, value = self.v.type_of.get(int(token_id), ("Unknown", ""))
        if kind == "Bar":
            st.bars += 1
            st.pos, st.notes_here = -1, 0
            if self.on_bar is not None:
                self.on_bar(st.bars)
        elif kind == "TimeSig":
            st.ts, st.ts_seen = tuple(int(x) for x in value.split("/")), True  # type: ignore[assignment]
        elif kind == "Position":
            st.pos, st.notes_here = int(value), 0
        elif kind == "Tempo":
            st.tempo_seen = True
        elif kind == "Program":
            st.program = int(value)
        elif kind in ("Pitch", "PitchDrum"):
            st.notes_here += 1
        st.last = "start" if kind in ("BOS", "PAD") else kind

    def begin(self, prompt_len: int) -> None:
        self._seen = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.v._torch
        if input_ids.shape[0] != 1:
            raise ValueError("RemiConstraint follows one sequence at a time")
        for token in input_ids[0, self._seen:].tolist():
            self.ingest(token)
        self._seen = input_ids.shape[1]
        mask, bias = self.allowed()
        mask = mask[: scores.shape[-1]].to(scores.device)
        out = scores + bias[: scores.shape[-1]].to(scores.device, scores.dtype) if bias is not None else scores
        return torch.where(mask, out, torch.full_like(out, -math.inf))

    # -- rules
    def _need_timesig(self) -> int | None:
        st, ts = self.state, self.c.time_signature
        if ts is not None and (not st.ts_seen or st.ts != ts):
            return self.v.timesigs.get(ts)
        return None

    def _positions(self, after: int) -> set[int]:
        length = self.v.bar_length(self.state.ts)
        return {i for p, i in self.v.positions.items() if after < p < length}

    def _note_start(self) -> tuple[Any, Any]:
        """What may open a note: its Program token (REMI+), or directly its Pitch."""
        v, c = self.v, self.c
        if v.use_programs:
            ids = {v.programs[c.program]} if c.program is not None else set(v.programs.values())
            return v.mask(ids), None
        return self._pitch_mask()

    def _pitch_mask(self) -> tuple[Any, Any]:
        v, st, c = self.v, self.state, self.c
        program = st.program if v.use_programs else c.program
        if program == -1:  # drums: unpitched, never constrained
            return v.mask(set(v.drum_pitches.values())), None
        bar = st.bars - 1
        chord = c.chords[(bar - c.first_new_bar) % len(c.chords)] if c.chords and bar >= c.first_new_bar else None
        on_beat = st.pos % v.pos_per_beat == 0
        key = ("pitch", c.scale, chord, on_beat)
        if key not in v._cache:
            torch = v._torch
            if chord is not None and on_beat:
                allowed = {i for p, i in v.pitches.items() if p % 12 in chord}
            else:
                allowed = {i for p, i in v.pitches.items()
                           if c.scale is None or p % 12 in c.scale or (chord is not None and p % 12 in chord)}
            bias = None
            if chord is not None and not on_beat:
                bias = torch.zeros(v.size)
                bias[[i for p, i in v.pitches.items() if p % 12 in chord]] = c.chord_bias
            v._cache[key] = (v.mask(allowed), bias)
        return v._cache[key]

    def allowed(self) -> tuple[Any, Any]:
        """(bool mask over the vocabulary, optional additive bias) for the next token."""
        v, st, c = self.v, self.state, self.c
        last = st.last

        def union(*masks: Any) -> Any:
            return v._torch.stack(masks).any(0)

        if last == "start":
            return v.mask({v.bar}), None
        if last == "Bar":
            ts_token = self._need_timesig()
            if ts_token is not None:
                return v.mask({ts_token}), None
            ids = self._positions(-1)  # no empty bars: a Bar is followed by a note's Position
            if c.time_signature is None and v.timesigs:
                ids |= set(v.timesigs.values())  # the model may choose (or change) its metre
            return v.mask(ids), None
        if last == "TimeSig":
            return v.mask(self._positions(-1)), None
        if last == "Position":
            if c.tempo_token is not None:
                if not st.tempo_seen:
                    return v.mask({c.tempo_token}), None  # the forced tempo opens the piece
                return self._note_start()  # and never changes
            if v.tempos:
                return union(self._note_start()[0], v.mask(set(v.tempos.values()))), None
            return self._note_start()
        if last == "Tempo":
            return self._note_start()
        if last == "Program":
            return self._pitch_mask()
        if last in ("Pitch", "PitchDrum"):
            return v.mask(set(v.velocities) or set(v.durations)), None
        if last == "Velocity" and v.durations:
            return v.mask(set(v.durations)), None
        # after a complete note (or a token type the grammar never generates, e.g. in a primer):
        # another note here, a later position, or the next bar (EOS once the last bar is written)
        parts, bias = [v.mask(self._positions(st.pos))], None
        if st.notes_here < MAX_NOTES_PER_POSITION and st.pos >= 0:
            note_mask, bias = self._note_start()
            parts.append(note_mask)
        parts.append(v.mask({v.bar} if st.bars < c.target_bars else {v.eos}))
        return union(*parts), bias


# ----------------------------------------------------------------------------- the pipeline
def _check_ranges(r: MidiRequest) -> None:
    """The request's own ranges (no weights needed: check_request runs it before they load). Length
    is bounded by MAX_BARS alone: generation slides a window over the model's positions
    (MidiGenerator._generate), so memory stays at one context's cache however many bars; bars
    cost time, not memory."""
    if r.bars is not None and r.seconds is not None:
        raise UsageError("--bars and --seconds both given", "pass one of them")
    if r.bars is not None and not 1 <= r.bars <= MAX_BARS:
        raise UsageError(f"--bars must be between 1 and {MAX_BARS}, got {r.bars}", "e.g. --bars 8")
    if r.seconds is not None and not 0 < r.seconds <= 3600:
        raise UsageError(f"--seconds must be positive (at most 3600), got {r.seconds}", "e.g. --seconds 20")
    if r.tempo is not None and not 20 <= r.tempo <= 400:
        raise UsageError(f"--tempo must be between 20 and 400 BPM, got {r.tempo}", "e.g. --tempo 96")
    if r.temperature is None or r.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {r.temperature}", "e.g. --temperature 1.0")
    if r.top_k is not None and r.top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {r.top_k}", "e.g. --top-k 20 (0 turns it off)")
    if r.top_p is not None and not 0 < r.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {r.top_p}", "e.g. --top-p 0.95")
    if r.num_outputs < 1:
        raise UsageError(f"--num must be at least 1, got {r.num_outputs}", "e.g. --num 4")
    if r.soundfont and not r.render:
        raise UsageError("--soundfont applies to --render", "add --render, or use `studio music render`")
    if r.program is not None and r.instrument is not None:
        raise UsageError("--program and --instrument both given", "pass one of them")
    if r.program is not None and not 0 <= r.program <= 127:
        raise UsageError(f"--program must be 0-127 (General MIDI), got {r.program}", "use --instrument drums for drums")
    if r.primer is not None and not Path(r.primer).expanduser().is_file():
        p = Path(r.primer).expanduser()
        raise InputFileError(f"primer {p} does not exist" if not p.exists() else f"primer {p} is not a file",
                             "pass a .mid file to continue")


class MidiGenerator:
    """task "music-midi": a causal LM over REMI tokens, decoded with RemiConstraint."""

    task = "music-midi"
    request_type = MidiRequest

    def __init__(self, model: Any, tokenizer: Any, device: DeviceManager, spec: ModelSpec):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.vocab = RemiVocab(tokenizer, int(model.config.vocab_size))
        cfg = model.config
        self.context = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)

    @classmethod
    def load(cls, spec: ModelSpec, device: DeviceManager) -> "MidiGenerator":
        from transformers import AutoModelForCausalLM

        with loading(spec, "MIDI model"), quiet_transformers():
            tokenizer = load_midi_tokenizer(spec.location(), spec.revision)
            model = AutoModelForCausalLM.from_pretrained(spec.location(), **spec.load_kwargs())
        if model.config.vocab_size < len(tokenizer):
            raise UsageError(f"model vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's ({len(tokenizer)})",
                             "the model and tokenizer.json in this folder do not belong together")
        model.eval()
        model = device.prepare(model)
        return cls(model, tokenizer, device, spec)

    # -- 1. inputs
    def _resolve(self, r: MidiRequest, primer: Primer | None = None) -> dict[str, Any]:
        """Validate a request against this model's vocabulary; returns the parsed controls.
        A primer's tempo and metre hold in its continuation unless --tempo/--time-signature say
        otherwise (the README's promise: primer + continuation at the primer's exact tempo)."""
        out: dict[str, Any] = {}
        _check_ranges(r)
        v = self.vocab
        program = r.program if r.program is not None else (instrument_program(r.instrument) if r.instrument else None)
        if program is not None and v.use_programs and program not in v.programs:
            raise UsageError(f"this model has no token for program {program}",
                             f"its programs: {', '.join(str(p) for p in sorted(v.programs)[:20])} ...")
        if program == -1 and not v.use_programs:
            raise UsageError("this model has no drum track tokens", "pick a pitched --instrument")
        out["program"] = program

        ts = parse_time_signature(r.time_signature) if r.time_signature else None
        if ts is not None and v.timesigs and ts not in v.timesigs:
            raise UsageError(f"this model has no token for time signature {ts[0]}/{ts[1]}",
                             f"its time signatures: {', '.join(f'{n}/{d}' for n, d in sorted(v.timesigs))}")
        if ts is not None and not v.timesigs and ts != (4, 4):
            raise UsageError(f"this model only writes 4/4 (its tokenizer has no time-signature tokens)",
                             "drop --time-signature or use a model trained with time signatures")
        if ts is None and primer is not None and primer.time_signature is not None and (
                primer.time_signature in v.timesigs or (not v.timesigs and primer.time_signature == (4, 4))):
            ts = primer.time_signature  # forced like --time-signature: the model may not change the metre
        out["time_signature"] = ts
        out["key"] = parse_key(r.key) if r.key else None
        out["chords"] = parse_chords(r.chords) if r.chords else []
        primer_tempo = primer.tempos[-1][1] if primer is not None and primer.tempos else None
        # the tempo the file is written at; a primer's own tempo map is kept whole in _decode
        tempo = r.tempo if r.tempo is not None else (SECONDS_DEFAULT_TEMPO if r.seconds is not None and primer_tempo is None else None)
        out["tempo"] = tempo
        out["primer_tempo"] = primer_tempo if r.tempo is None else None
        if r.seconds is not None:
            n, d = ts or (4, 4)
            bar_seconds = n * (4.0 / d) * 60.0 / (tempo or primer_tempo)
            out["bars"] = max(1, math.ceil(r.seconds / bar_seconds - 1e-9))
        else:
            out["bars"] = r.bars if r.bars is not None else DEFAULT_BARS
        if out["bars"] > MAX_BARS:
            raise UsageError(f"{r.seconds} s is {out['bars']} bars at {tempo} BPM, more than {MAX_BARS}",
                             "ask for fewer seconds or a faster --tempo")
        return out

    @classmethod
    def check_request(cls, request: MidiRequest, spec: ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the
        request's ranges; what needs the vocabulary (programs, time signatures) waits for check_inputs."""
        _check_ranges(request)

    def check_inputs(self, request: MidiRequest) -> None:
        self._resolve(request, self._read_primer(request.primer) if request.primer else None)

    def _primer_ids(self, path: str) -> list[int]:
        return self._read_primer(path).ids

    def _read_primer(self, path: str) -> Primer:
        """The primer's REMI ids, exact tempo map and last time signature."""
        from symusic import Score

        p = Path(path).expanduser()
        if not p.is_file():
            raise InputFileError(f"primer {p} does not exist" if not p.exists() else f"primer {p} is not a file",
                                 "pass a .mid file to continue")
        try:
            score = Score.from_file(str(p))
            seq = self.tokenizer.encode(score)
        except Exception as exc:  # symusic raises RuntimeError/ValueError on bad bytes
            raise InputFileError(f"primer {p} is not a readable MIDI file ({type(exc).__name__})",
                                 "pass a standard MIDI file (.mid)") from exc
        if isinstance(seq, list):  # tokenizers with one sequence per track
            seq = seq[0] if seq else None
        tpq = float(score.ticks_per_quarter or 480)
        # a MIDI file without a tempo event plays at 120 BPM (the standard's default)
        tempos = tuple((t.time / tpq, float(t.qpm)) for t in score.tempos) or ((0.0, 120.0),)
        if tempos[0][0] > 0:
            tempos = ((0.0, 120.0),) + tempos
        last_ts = score.time_signatures[-1] if len(score.time_signatures) else None
        ts = (int(last_ts.numerator), int(last_ts.denominator)) if last_ts is not None else (4, 4)
        return Primer(ids=list(seq.ids) if seq is not None else [], tempos=tempos, time_signature=ts)

    # -- 2-4. generate, decode, results
    def run(self, request: MidiRequest, progress: Progress) -> Iterator[Result]:
        """Yields each piece (and its rendering) as soon as it is made."""

        # 1. check inputs and resolve the controls; adapters on (or all off when none are asked for)
        primer_file = self._read_primer(request.primer) if request.primer else None
        ctl = self._resolve(request, primer_file)
        from studio.adapters.peft_adapters import apply_adapters

        apply_adapters(self.model, tuple(request.adapters or ()), base_label=self.spec.alias or self.spec.name,
                       allow_pickle=self.spec.allow_pickle, offline=self.spec.offline)
        primer = primer_file.ids if primer_file is not None else []
        primer_bars = sum(1 for t in primer if t == self.vocab.bar)
        scale = ctl["key"][2] if ctl["key"] else None
        # a continuation holds its primer's (last) tempo: its token is forced, changes are masked
        tempo = ctl["tempo"] if ctl["tempo"] is not None else ctl["primer_tempo"]
        controls = Controls(
            target_bars=primer_bars + ctl["bars"], first_new_bar=primer_bars,
            time_signature=ctl["time_signature"],
            tempo_token=self.vocab.nearest_tempo(tempo) if tempo is not None else None,
            program=ctl["program"] if self.vocab.use_programs else None, scale=scale,
            chords=tuple(pcs for _, pcs in ctl["chords"]),
        )
        prompt = [self.vocab.bos] + primer
        base = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}

        for index, seed in enumerate(seeds_for(request.seed or 0, request.num_outputs)):
            handle = progress.task(f"music {index + 1}/{request.num_outputs} (bars)", total=ctl["bars"])
            constraint = RemiConstraint(self.vocab, controls,
                                        on_bar=lambda n: handle.advance(1) if n > primer_bars + 1 else None)
            for token in prompt:
                constraint.ingest(token)
            # 2. generate (windows past the model's context)
            ids = self._generate(prompt, constraint, request, seed)
            handle.finish()
            # 3. decode tokens -> MIDI, then write the controls the tokens cannot hold exactly
            midi = self._decode(ids, ctl, request, primer_file)
            chords_per_bar = [ctl["chords"][(b % len(ctl["chords"]))][0] for b in range(ctl["bars"])] if ctl["chords"] else None
            extra = {"music": {"tokens": len(ids), "new_tokens": len(ids) - len(prompt), "bars": ctl["bars"],
                               "primer_bars": primer_bars, "chords_per_bar": chords_per_bar,
                               "tempo_token": self.vocab.type_of.get(controls.tempo_token, (None, None))[1]
                               if controls.tempo_token is not None else None}}
            params = {**base, "seed": seed}
            result = Result(kind="midi", value=midi, params=params, fmt="mid", extra=extra)
            # 4. optional rendering beside the MIDI (NAME.render.wav)
            if request.render:
                from studio.pipelines.music_render import render

                samples, rate, info = render(midi, soundfont=request.soundfont, note=progress.note)
                result.companions["render"] = (samples, rate)
                result.extra["render"] = info
            yield result

    def _generate(self, prompt: list[int], constraint: RemiConstraint, request: MidiRequest, seed: int) -> list[int]:
        import torch
        from transformers import LogitsProcessorList

        v = self.vocab
        ids = list(prompt)
        bar_len = max(v.bar_length(ts) for ts in (list(v.timesigs) or [(4, 4)]))
        # an upper bound the grammar guarantees: per bar one Bar + TimeSig, per position one
        # Position + Tempo and at most MAX_NOTES_PER_POSITION notes of 4 tokens
        budget = (constraint.c.target_bars - constraint.state.bars + 1) * (2 + bar_len * (2 + 4 * MAX_NOTES_PER_POSITION))
        window = max(16, self.context // 2)  # new tokens per generate call once the context is full
        sampling = dict(do_sample=True, temperature=float(request.temperature), top_k=int(request.top_k or 0),
                        top_p=float(request.top_p or 1.0), pad_token_id=v.pad, eos_token_id=v.eos, bos_token_id=v.bos)
        devices = [self.device.device] if self.device.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.device.inference():
            torch.manual_seed(int(seed))
            while budget > 0 and ids[-1] != v.eos:
                room = self.context - len(ids)
                if room >= min(window, budget):  # the whole piece still fits in the context
                    context, new = ids, min(budget, room)
                else:  # slide: keep the latest tokens, make room for `window` new ones
                    context, new = ids[-(self.context - window):], min(window, budget)
                constraint.begin(len(context))
                input_ids = torch.tensor([context], dtype=torch.long, device=self.device.device)
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=new, logits_processor=LogitsProcessorList([constraint]),
                                          **sampling)
                produced = out[0, len(context):].tolist()
                if not produced:
                    break
                ids.extend(produced)
                budget -= len(produced)
                # generate's last token never reached the processor: keep the grammar state whole
                constraint.ingest(produced[-1])
        return ids

    def _decode(self, ids: list[int], ctl: dict[str, Any], request: MidiRequest, primer: Primer | None = None) -> Any:
        from symusic import Tempo, TimeSignature

        v = self.vocab
        body = [t for t in ids if t not in (v.bos, v.eos, v.pad)]
        try:
            score = self.tokenizer.decode(body if self.tokenizer.one_token_stream else [body])
        except Exception as exc:  # a model whose tokens the tokenizer cannot decode
            raise UsageError(f"the tokens could not be decoded to MIDI ({type(exc).__name__}: {exc})",
                             "is tokenizer.json the one this model was trained with?") from exc
        if ctl["tempo"] is not None:
            # tempo tokens are binned (e.g. 121.29 for 120): the file gets the exact BPM asked for
            score.tempos.clear()
            score.tempos.append(Tempo(0, qpm=float(ctl["tempo"])))
        elif primer is not None:
            # a continuation is written at the primer's exact tempo map (its tokens hold the
            # nearest bins, e.g. 96.77 for 96), and the continuation has no tempo change of its own
            tpq = score.ticks_per_quarter
            score.tempos.clear()
            for quarter, qpm in primer.tempos:
                score.tempos.append(Tempo(int(round(quarter * tpq)), qpm=qpm))
        ts = ctl["time_signature"]
        if ts is not None and not len(score.time_signatures):
            score.time_signatures.append(TimeSignature(0, ts[0], ts[1]))
        if ctl["program"] is not None and not v.use_programs:
            for track in score.tracks:
                track.program, track.is_drum = max(0, ctl["program"]), False
        midi = score_to_pretty_midi(score)
        if request.seconds is not None:
            cut = float(request.seconds)
            for inst in midi.instruments:
                inst.notes = [n for n in inst.notes if n.start < cut]
                for n in inst.notes:
                    n.end = min(n.end, cut)
        return midi
