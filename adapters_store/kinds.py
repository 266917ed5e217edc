"""The kinds of task we serve: one table, read by the upload checks and by the engine.

Each kind is named once here (the name stored with every version and shown by the API) with the
`peft_type` values of `adapter_config.json` it covers. The upload format (`adapters_store.format`)
accepts exactly these; the engine registers one loader per kind against this table and checks at
import that every PEFT kind has one. Torch-free, so the clients and the store can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Kind", "KINDS", "TEMPLATE", "COMPOSITE", "PROMPT_LEARNING", "by_name", "by_peft_type", "served_peft_types"]


@dataclass(frozen=True)
class Kind:
    name: str  # stored with each version: "lora", "prefix_tuning", ..., "template"
    peft_types: tuple[str, ...]  # adapter_config.json's peft_type values; () for a kind without PEFT files
    # shapes how a row starts (virtual tokens, prefix KV, gated prompts) rather than the layers' weights: no
    # adapter_scale, and at most one per composite task
    prompt_learning: bool = False


KINDS: tuple[Kind, ...] = (
    Kind("prompt_tuning", ("PROMPT_TUNING",), prompt_learning=True),
    Kind("p_tuning", ("P_TUNING",), prompt_learning=True),
    Kind("prefix_tuning", ("PREFIX_TUNING",), prompt_learning=True),
    Kind("lora", ("LORA",)),  # DoRA too (use_dora)
    Kind("ia3", ("IA3",)),
    Kind("adalora", ("ADALORA",)),
    Kind("loha", ("LOHA",)),
    Kind("lokr", ("LOKR",)),
    Kind("vera", ("VERA",)),
    Kind("adaption_prompt", ("ADAPTION_PROMPT",), prompt_learning=True),
    Kind("template", ()),  # template.json alone: an instruction and examples, no weights
    Kind("composite", ()),  # task.json and a PEFT folder per component (adapters_store/composite.py)
)

_BY_NAME = {kind.name: kind for kind in KINDS}
_BY_PEFT_TYPE = {peft_type: kind for kind in KINDS for peft_type in kind.peft_types}
TEMPLATE = _BY_NAME["template"]
COMPOSITE = _BY_NAME["composite"]
PROMPT_LEARNING = frozenset(kind.name for kind in KINDS if kind.prompt_learning)


def by_name(name: str) -> Kind | None:
    return _BY_NAME.get(name)


def by_peft_type(peft_type: object) -> Kind | None:
    """The kind serving an adapter_config.json's `peft_type`, or None when we serve no such type."""
    return _BY_PEFT_TYPE.get(peft_type) if isinstance(peft_type, str) else None


def served_peft_types() -> tuple[str, ...]:
    return tuple(_BY_PEFT_TYPE)
