"""YAML files read with line numbers and bounds: presets, batch files and model cards.

Every file is bounded while it streams in, before anything is built from it: its size, the values
it holds with aliases expanded (a YAML "billion laughs" bomb stops at once), nesting, and the
entries of a counted top-level list (a batch file's `jobs:`). `YamlDoc.where(path)` names `file:line`
for an error. Core: it imports nothing of studio but errors, so presets (studio/presets.py), batch
files (studio/batch/) and model cards (studio/models.py) can all read through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import UsageError


# --------------------------------------------------------------------------- YAML with line numbers
@dataclass
class YamlDoc:
    """A parsed YAML file plus the line of every key and item, so errors can say `file:line`."""

    source: str  # the file path (or "<python>" for data built in code)
    data: Any  # the plain Python data (dicts, lists, scalars)
    lines: dict[tuple, int] = field(default_factory=dict)  # (key, key, index, ...) -> 1-based line

    def where(self, *path: Any) -> str:
        """`file:line` of the deepest known prefix of `path` (the file alone when unknown)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.source}:{line}"
        return self.source


# Bounds on a YAML file, checked while it streams in, before any of it is built: a 370-byte alias
# bomb (`&a [*a, *a, ...]` nine levels deep stands for a billion values) or a 100 MB file of a
# million jobs is refused in milliseconds instead of minutes and gigabytes. Generous for any file a
# person writes: sweeps belong in `seeds:` and `{a|b}` choices, which expand after these checks.
# Each bound also caps the work done on a file that passes: libyaml hands Python one event per
# value (~2 us each here, 6 us on a loaded 2-core machine), and building a value costs more.
MAX_YAML_BYTES = 2 << 20  # 2 MiB, about 20000 one-line jobs
MAX_YAML_NODES = 250_000  # values (scalars, lists, mappings), an alias counting as all it stands for
MAX_YAML_DEPTH = 64  # lists and mappings inside each other
MAX_YAML_ITEMS = 10_000  # entries of a counted top-level list (a batch file's `jobs:`)
_TOO_BIG_HINT = ("a batch or preset file this large is a mistake (or a YAML alias bomb): split it, and sweep "
                 "with seeds: and {a|b} choices, which expand after this check")


def read_yaml(path: str | Path | None = None, *, text: str | None = None, source: str | None = None,
              max_items: dict[str, int] | None = None) -> YamlDoc:
    """Parse YAML keeping each key's line. Syntax errors and duplicate keys (which PyYAML would
    silently collapse, losing a job or a setting) are UsageErrors with `file:line`, and so is a
    file past the bounds above. `max_items` caps top-level entries while they stream in:
    {"jobs": 20000} stops at the 20001st job, before any job is built."""
    import yaml

    if text is None:
        text, source = _read_text(Path(path).expanduser(), source)  # type: ignore[arg-type]
    elif len(text) > MAX_YAML_BYTES:
        raise UsageError(f"{source or '<text>'} is {len(text) / 2**20:.1f} MB of YAML, more than studio reads "
                         f"({MAX_YAML_BYTES >> 20} MB)", _TOO_BIG_HINT)
    source = source or "<text>"
    _check_bounds(text, source, max_items or {})
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml: ~10x faster, same marks
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from exc
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, source)
    return YamlDoc(source=source, data=data, lines=lines)


def _read_text(p: Path, source: str | None) -> tuple[str, str]:
    """The file's text, read only up to the size bound (a huge file is refused unread)."""
    if not p.exists():
        raise UsageError(f"{p} does not exist", "check the path")
    if p.is_dir():
        raise UsageError(f"{p} is a folder", "pass a YAML file")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UsageError(f"{p} is {size / 2**20:.0f} MB, more than studio reads from a YAML file "
                             f"({MAX_YAML_BYTES >> 20} MB)", _TOO_BIG_HINT)
        with open(p, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # a device or a file still growing stops here too
        if len(raw) > MAX_YAML_BYTES:
            raise UsageError(f"{p} holds more than {MAX_YAML_BYTES >> 20} MB, more than studio reads from a YAML file",
                             _TOO_BIG_HINT)
        return raw.decode("utf-8"), source or str(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {p}: {exc}", "pass a UTF-8 YAML file") from exc


def _syntax_error(exc: Exception, source: str) -> UsageError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return UsageError(f"{where} is not valid YAML ({problem})", "fix the indentation and quoting on that line")


class _Open:
    """A list or mapping whose end has not streamed in yet."""

    __slots__ = ("anchor", "opened", "children", "cap", "name", "mapping")

    def __init__(self, anchor: str | None, opened: int, cap: int | None, name: Any, mapping: bool):
        self.anchor = anchor  # its anchor (&name), if any
        self.opened = opened  # values counted before it began (its size = count at its end - this)
        self.children = 0  # child nodes so far (a mapping's keys and values both count)
        self.cap = cap  # most entries allowed (max_items), or None
        self.name = name  # the top-level key it is the value of
        self.mapping = mapping


def _check_bounds(text: str, source: str, max_items: dict[str, int]) -> None:
    """Stream the YAML events (libyaml: no nodes are built) and stop at the first bound crossed:
    more than MAX_YAML_NODES values with every alias expanded, nesting deeper than MAX_YAML_DEPTH,
    a recursive alias, or more top-level entries under a key of `max_items` than it allows.
    PyYAML builds an alias as a shared node, so its cost shows only later, in whatever walks the
    data (35 s and 2.2 GB for a 370-byte bomb); counting here keeps every later step bounded.
    Syntax errors are left to the parse that follows, which reports them with their line."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    nodes = (yaml.ScalarEvent, yaml.AliasEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    anchors: dict[str, int] = {}  # anchor -> how many values it stands for
    stack: list[_Open] = []
    total = 0  # values so far, aliases expanded
    root_key: Any = None  # the top-level key whose value streams next
    try:
        while loader.check_event():
            event = loader.get_event()
            kind = type(event)
            if kind in ends:
                done = stack.pop()
                if done.anchor is not None:
                    anchors[done.anchor] = total - done.opened
                continue
            if kind not in nodes:
                continue
            # 1. count it: an alias as everything its anchor holds
            if kind is yaml.AliasEvent:
                if event.anchor not in anchors and any(o.anchor == event.anchor for o in stack):
                    raise UsageError(f"{_at(source, event)}: alias *{event.anchor} sits inside the value it names (a recursive alias)",
                                     "remove the alias")
                total += anchors.get(event.anchor, 1)
            else:
                total += 1
            if total > MAX_YAML_NODES:
                raise UsageError(f"{_at(source, event)}: the file holds more than {MAX_YAML_NODES:,} values once its aliases are "
                                 "expanded", _TOO_BIG_HINT)
            # 2. count it as an entry of its parent; remember top-level keys
            is_key = False
            if stack:
                parent = stack[-1]
                parent.children += 1
                if parent.cap is not None and parent.children > parent.cap * (2 if parent.mapping else 1):
                    raise UsageError(f"{_at(source, event)}: more than {parent.cap:,} entries under `{parent.name}:`", _TOO_BIG_HINT)
                is_key = parent.mapping and parent.children % 2 == 1
                if is_key and len(stack) == 1:
                    root_key = event.value if kind is yaml.ScalarEvent else None
            # 3. anchors and open collections
            if kind is yaml.ScalarEvent:
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif kind is not yaml.AliasEvent:
                top_value = len(stack) == 1 and stack[0].mapping and not is_key
                name = root_key if top_value else None
                stack.append(_Open(event.anchor, total - 1, max_items.get(name) if top_value else None, name,
                                   kind is yaml.MappingStartEvent))
                if len(stack) > MAX_YAML_DEPTH:
                    raise UsageError(f"{_at(source, event)}: lists and mappings nested more than {MAX_YAML_DEPTH} deep", "flatten the file")
    except yaml.YAMLError:
        return  # the parse that follows reports it, with its line
    finally:
        loader.dispose()


def _at(source: str, event: Any) -> str:
    return f"{source}:{event.start_mark.line + 1}"


def _walk(node: Any, path: tuple, lines: dict[tuple, int], source: str) -> None:
    import yaml

    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys keep the anchor's lines
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UsageError(f"duplicate key {key!r} at {source}:{line} (first at line {seen[key]})",
                                 "each key may appear once in a mapping; rename or merge them")
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, source)
            lines[path + (key,)] = line  # the key's own line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _walk(item, path + (index,), lines, source)
