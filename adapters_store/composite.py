"""Composite tasks: several PEFT adapters of different kinds in one task version, applied together.

An upload holds a manifest `task.json` (`{"components": ["prefix", "lora"]}`, or objects `{"name": "lora",
"scale": 0.5}`) and, per component, a folder of that name with PEFT's `save_pretrained` output. The store keeps
the files flat: `task.json`, `prefix.adapter_config.json`, `prefix.adapter_model.safetensors`, ... (stored names
carry no folders). Like `format`, nothing here imports torch: the server checks each component against the
backbone when it loads the composite (`server/engine/adapters/composite.py`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from adapters_store import kinds
from adapters_store.format import (
    COMPOSITE_FILE,
    CONFIG_FILE,
    TEMPLATE_FILE,
    WEIGHTS_FILE,
    FormatError,
    PeftSummary,
    inspect_peft,
    parse_prompt_format,
)

__all__ = [
    "COMPOSITE_FILE",
    "COMPOSITE_KIND",
    "PROMPT_LEARNING_KINDS",
    "Component",
    "component_files",
    "composite_kind",
    "inspect_composite",
    "is_composite_member",
    "parse_components",
    "parse_manifest",
    "select_composite",
]

COMPOSITE_KIND = kinds.COMPOSITE.name
MAX_COMPONENTS = 8
MAX_SCALE = 2.0
COMPONENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no dots: `<name>.<file>` splits at the first
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PROMPT_LEARNING_KINDS = kinds.PROMPT_LEARNING  # at most one per composite
_FLAT = re.compile(rf"({COMPONENT_NAME.pattern})\.({'|'.join(map(re.escape, PEFT_FILES))})")


@dataclass(frozen=True)
class Component:
    name: str  # its folder in the upload
    scale: float = 1.0  # a weight on its per-layer delta (1: as trained)
    kind: str = ""  # filled by `inspect_composite`: "lora", "prefix_tuning", ...


def parse_manifest(data: bytes) -> list[Component]:
    """The components of a `task.json`, in their stated order."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{COMPOSITE_FILE} is not valid JSON: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or set(manifest) != {"components"}
        or not isinstance(manifest["components"], list)
    ):
        raise FormatError(f'{COMPOSITE_FILE} must be {{"components": [...]}}, naming each component\'s folder in order')
    entries = manifest["components"]
    if not 1 <= len(entries) <= MAX_COMPONENTS:
        raise FormatError(f"{COMPOSITE_FILE}: components must list 1 to {MAX_COMPONENTS} folders, got {len(entries)}")
    components = [_component(entry) for entry in entries]
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise FormatError(f"{COMPOSITE_FILE}: components name a folder twice ({names})")
    return components


def _component(entry: object) -> Component:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not set(entry) <= {"name", "scale"} or "name" not in entry:
        raise FormatError(f'{COMPOSITE_FILE}: each component is a folder name or {{"name": ..., "scale": ...}}')
    name, scale = entry["name"], entry.get("scale", 1.0)
    if not isinstance(name, str) or COMPONENT_NAME.fullmatch(name) is None:
        raise FormatError(f"{COMPOSITE_FILE}: component name {name!r} must match {COMPONENT_NAME.pattern}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise FormatError(f"{COMPOSITE_FILE}: component {name!r}: scale must be a number, got {scale!r}")
    if not 0 <= scale <= MAX_SCALE:
        raise FormatError(f"{COMPOSITE_FILE}: component {name!r}: scale={scale} is outside [0, {MAX_SCALE:g}]")
    return Component(name=name, scale=float(scale))


def is_composite_member(base: str) -> bool:
    """Whether a file name is one of a stored composite's flat component files (`lora.adapter_config.json`)."""
    return _FLAT.fullmatch(base) is not None


def select_composite(entries: Mapping[str, bytes]) -> dict[str, bytes]:
    """The stored files of a composite upload: the manifest, each component's two files (flat), a template.json.

    `entries`: relative paths -> bytes. Component files lie in `<name>/` beside `task.json`, or already flat.
    """
    roots = {path.rpartition("/")[0] for path in entries if path.rpartition("/")[2] == COMPOSITE_FILE}
    if len(roots) != 1:
        raise FormatError(f"the upload holds {len(roots)} {COMPOSITE_FILE} files; a composite task has one")
    [root] = roots
    prefix = f"{root}/" if root else ""
    inside = {path[len(prefix) :]: data for path, data in entries.items() if path.startswith(prefix)}
    components = parse_manifest(inside[COMPOSITE_FILE])
    kept = {COMPOSITE_FILE: inside[COMPOSITE_FILE]}
    if TEMPLATE_FILE in inside:
        kept[TEMPLATE_FILE] = inside[TEMPLATE_FILE]
    named = {c.name for c in components}
    for path in inside:
        folder, _, base = path.partition("/")
        flat = _FLAT.fullmatch(path)
        owner = folder if base in PEFT_FILES else flat.group(1) if flat else None
        if owner is not None and owner not in named:
            raise FormatError(f"the upload holds {path!r}, but {COMPOSITE_FILE} names no component {owner!r}")
    for component in components:
        for name in PEFT_FILES:
            found = [inside[p] for p in (f"{component.name}/{name}", f"{component.name}.{name}") if p in inside]
            if not found:
                raise FormatError(
                    f"component {component.name!r}: the upload lacks {component.name}/{name} "
                    "(each component is a folder holding a PEFT save_pretrained output)"
                )
            kept[f"{component.name}.{name}"] = found[0]
    return kept


def component_files(files: Mapping[str, bytes], name: str) -> dict[str, bytes]:
    """One component's PEFT files, under their usual names."""
    return {base: files[f"{name}.{base}"] for base in PEFT_FILES}


def inspect_composite(files: Mapping[str, bytes]) -> tuple[list[Component], PeftSummary]:
    """Check the manifest and each component like a single upload; errors name the component."""
    components = parse_manifest(files[COMPOSITE_FILE])
    summaries = []
    for component in components:
        try:
            summary = inspect_peft(component_files(files, component.name))
        except KeyError:
            raise FormatError(f"component {component.name!r}: its files are missing") from None
        except FormatError as exc:
            raise type(exc)(f"component {component.name!r}: {exc}") from None
        summaries.append(summary)
    components = [Component(c.name, c.scale, s.kind) for c, s in zip(components, summaries)]
    prompts = [c.name for c in components if c.kind in PROMPT_LEARNING_KINDS]
    if len(prompts) > 1:
        raise FormatError(
            f"components {prompts} are both prompt-learning adapters (prompt, p-tuning, prefix, LLaMA-Adapter); "
            "a composite holds at most one"
        )
    for c in components:
        if c.kind in PROMPT_LEARNING_KINDS and c.scale != 1.0:
            raise FormatError(f"component {c.name!r}: scale={c.scale:g} applies to per-layer adapters only; use 1")
    if TEMPLATE_FILE in files:
        parse_prompt_format(files[TEMPLATE_FILE])
    summary = PeftSummary(
        peft_type=COMPOSITE_KIND.upper(),
        kind=composite_kind(components),
        parameters=sum(s.parameters for s in summaries),
        bytes=sum(s.bytes for s in summaries),
        config={"components": [{"name": c.name, "kind": c.kind, "scale": c.scale} for c in components]},
    )
    return components, summary


def composite_kind(components: list[Component]) -> str:
    """The kind a store records: `composite:prefix=prefix_tuning,lora=lora*0.5` (the API splits it up again)."""
    parts = [f"{c.name}={c.kind}" + ("" if c.scale == 1.0 else f"*{c.scale:g}") for c in components]
    return f"{COMPOSITE_KIND}:{','.join(parts)}"


def parse_components(kind: str) -> list[Component] | None:
    """The components a stored kind names, or None when it is not a composite's."""
    head, _, rest = kind.partition(":")
    if head != COMPOSITE_KIND or not rest:
        return None
    components = []
    for part in rest.split(","):
        name, _, what = part.partition("=")
        what, _, scale = what.partition("*")
        components.append(Component(name=name, kind=what, scale=float(scale) if scale else 1.0))
    return components
