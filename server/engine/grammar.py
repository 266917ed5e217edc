"""Structured outputs: a request's grammar (a JSON schema, a regex, a list of choices, a Lark/GBNF grammar) turned
into a per-row token mask, with llguidance.

The API builds a `Constraint` (what the client asked, and the field it came from); `Grammars` (one per backbone)
checks and compiles it once per distinct text, and gives each row a matcher of its own; the sampling step masks
every constrained row's logits from its matcher (`mask_logits`), and the row advances its matcher with each token it
accepts. Unconstrained rows are never touched, so they share the batch at no cost but the masking of the others.

llguidance rather than xgrammar: one 3 MB wheel with no dependencies (xgrammar pulls in triton and a TVM runtime),
masks computed lazily per step in tens of microseconds without a grammar-compilation step up front (so a new schema
costs no request a compile stall), and the fullest JSON-schema coverage of the two (`docs/api.md`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from server.engine.request import InvalidRequest

Kind = Literal["json", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json", "regex", "choice", "grammar")
CACHED_GRAMMARS = 256  # distinct constraints kept compiled (keyed by their text)
# JSON without optional whitespace, as vLLM's `disable_any_whitespace`: a small model left free to pick whitespace
# can emit it until max_tokens (a known failure of unconstrained whitespace), and compact JSON costs fewer tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match. `text`: a JSON schema (JSON text), a regex, a JSON list of strings, or a
    Lark/GBNF grammar. `param`: the request field it came from, named by a refusal."""

    kind: Kind
    text: str
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")


class Grammars:
    """A backbone's grammar engine: its llguidance tokenizer (built once, on first use) and the grammars compiled
    so far. Thread-safe: the API compiles on worker threads, the engine makes matchers on its own."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[Constraint, str] = OrderedDict()

    def tokenizer(self, param: str | None = None) -> llguidance.LLTokenizer:
        """The backbone's tokenizer as llguidance reads it; `param`: the field a refusal names."""
        with self._lock:
            if self._tokenizer is None:
                if self._hf is None:
                    raise InvalidRequest("structured outputs need a tokenizer, and this backbone has none", param)
                try:
                    eos = self._eos or None
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
                except ValueError as exc:
                    message = f"structured outputs are not available for this tokenizer: {exc}"
                    raise InvalidRequest(message, param) from None
            return self._tokenizer

    def compile(self, constraint: Constraint) -> str:
        """The checked llguidance grammar of `constraint`; a 400 naming its field when it is not a valid one."""
        with self._lock:
            if (grammar := self._compiled.get(constraint)) is not None:
                self._compiled.move_to_end(constraint)
                return grammar
        grammar = _grammar(constraint)
        tokenizer = self.tokenizer(constraint.param)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            raise InvalidRequest(f"{constraint.param}: {_first_line(messages)}", param=constraint.param)
        with self._lock:
            self._compiled[constraint] = grammar
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return grammar

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `constraint`'s grammar: one per row."""
        return llguidance.LLMatcher(self.tokenizer(constraint.param), self.compile(constraint), log_level=0)


def _grammar(constraint: Constraint) -> str:
    kind, text = constraint.kind, constraint.text
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(_closed(json.loads(text)), defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "choice":
            choices = json.loads(text)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("a non-empty list of strings is needed")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise InvalidRequest(f"{constraint.param}: {_first_line([str(exc)])}", param=constraint.param) from None


def _closed(schema):
    """The schema with `additionalProperties: false` on every object schema that names its properties and says
    nothing of others (OpenAI's strict mode; vLLM's `disable_additional_properties`). What is generated still
    validates against the schema as sent; a small model left free to add properties adds them until max_tokens."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "additionalProperties" not in schema and ("properties" in schema or "patternProperties" in schema):
        closed["additionalProperties"] = False
    return closed


def _first_line(messages: list[str]) -> str:
    text = (messages[0] if messages else "invalid grammar").strip()
    return text.splitlines()[0] if text else "invalid grammar"


def mask_logits(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
    """logits [batch, vocab] fp32 -> a tensor with each constrained row's disallowed tokens at -inf; rows without a
    matcher are left as they are. The masks are computed on the CPU, where the matchers live: on an accelerator
    that overlaps the step's forward, which is still running (nothing has waited for the logits yet)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.full(((len(rows), (vocab + 31) // 32)), -1, dtype=torch.int32)  # [n, words], CPU
    for j, i in enumerate(rows):  # microseconds a row: llguidance's thread pool would only add spinning threads
        llguidance.torch.fill_next_token_bitmask(matchers[i], bitmask, j)
    device = logits.device
    bits = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)  # 32 tokens a word: the bits cross to the device, not the bools
    allowed = ((words[:, :, None] >> bits) & 1).bool().reshape(len(rows), -1)[:, :vocab]  # [n, vocab]
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, sub)
