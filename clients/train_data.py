"""Training data for `taskserve train`: JSONL records tokenised exactly as the server will see them at inference.

Two record shapes:

* `{"input": ..., "output": ...}`: the model sees `input + "\\n"` (`SEPARATOR`), then learns `output + EOS`; the loss
  covers the output and EOS, never the input. The trainer saves that prompt format with the adapter (`template.json`,
  `{"input_suffix": "\\n"}`), so the server wraps each prompt the same way: send the input alone
  (`taskserve generate TASK "<input>"`) and the answer starts with the output itself, on every route.
* `{"messages": [{"role", "content"}, ...]}`: rendered with the backbone's chat template, as the server renders
  `messages`; the loss covers each assistant turn's content and its end-of-turn token.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "IGNORE",
    "SEPARATOR",
    "PROMPT_FORMAT",
    "DataError",
    "Record",
    "Example",
    "read_records",
    "encode",
    "batches",
    "collate",
    "init_words",
]

IGNORE = -100  # label of a token that carries no loss (PyTorch's cross-entropy ignore_index, PEFT's padding label)
SEPARATOR = "\n"  # between a plain record's input and its output
PROMPT_FORMAT = {"input_suffix": SEPARATOR}  # saved as the adapter's template.json: the server appends it too


class DataError(ValueError):
    """The training data cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One JSONL line: either input/output text or chat messages."""

    input: str | None = None
    output: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def targets(self) -> list[str]:
        """The text the model learns to write."""
        if self.messages is not None:
            return [m["content"] for m in self.messages if m["role"] == "assistant"]
        return [self.output or ""]

    def prompt(self) -> dict[str, Any]:
        """What to send the server to ask for this record's (first) answer: `prompt=` or `messages=`."""
        if self.messages is None:
            return {"prompt": self.input}
        first_answer = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return {"messages": list(self.messages[:first_answer])}


@dataclass(frozen=True)
class Example:
    """A tokenised record: `labels[i]` is `input_ids[i]` where the loss counts, `IGNORE` elsewhere."""

    input_ids: list[int]
    labels: list[int]


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL file; blank lines are skipped, anything else malformed raises `DataError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})") from None
    records = [_record(line, f"{path}:{number}") for number, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise DataError(f"{path} holds no records")
    if len({r.messages is None for r in records}) > 1:
        raise DataError(f"{path} mixes input/output records and chat records; a task is served one way: use one shape")
    return records


def _record(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object with "input" and "output", or "messages"')
    if "messages" in obj:
        messages = obj["messages"]
        valid = isinstance(messages, list) and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if not valid:
            raise DataError(f'{where}: "messages" must be a list of {{"role": system|user|assistant, "content": str}}')
        roles = [m["role"] for m in messages]
        if "assistant" not in roles or roles[0] == "assistant":
            raise DataError(f"{where}: a chat record needs an assistant turn after at least one other message")
        return Record(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))
    if not isinstance(obj.get("input"), str) or not isinstance(obj.get("output"), str):
        raise DataError(f'{where}: expected string fields "input" and "output" (or a "messages" list)')
    if not obj["input"] or not obj["output"]:
        raise DataError(f'{where}: "input" and "output" must not be empty')
    return Record(input=obj["input"], output=obj["output"])


def encode(record: Record, tokenizer, *, eos_id: int, max_length: int) -> Example | None:
    """Tokenise one record; None when truncation to `max_length` leaves no token to learn from."""
    if record.messages is not None:
        example = _encode_chat(record, tokenizer)
    else:
        example = _encode_plain(record, tokenizer, eos_id)
    ids, labels = example.input_ids[:max_length], example.labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):  # the first token is never predicted
        return None
    return Example(input_ids=ids, labels=labels)


def _encode_plain(record: Record, tokenizer, eos_id: int) -> Example:
    assert record.input is not None and record.output is not None
    # The server wraps a prompt in the saved format and encodes it with `tokenizer.encode(input + SEPARATOR)`; cut the
    # full text's ids at exactly those ids, so what the model learns to continue is what it will be given.
    prompt_ids = tokenizer.encode(record.input + SEPARATOR)
    full_ids = tokenizer.encode(record.input + SEPARATOR + record.output)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        answer_ids = full_ids[len(prompt_ids) :]
    else:  # the separator merged with the output's first token: tokenise the answer on its own
        answer_ids = tokenizer.encode(record.output)
    answer_ids = [*answer_ids, eos_id]
    return Example(input_ids=prompt_ids + answer_ids, labels=[IGNORE] * len(prompt_ids) + answer_ids)


def _encode_chat(record: Record, tokenizer) -> Example:
    assert record.messages is not None
    messages = list(record.messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of the assistant turns: content and end-of-turn token, not the newline after
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError("the backbone's chat template does not render a conversation as a prefix of a longer one")
        spans.append((len(before), len(upto.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(begin <= start < end for begin, end in spans) else IGNORE
        for token, (start, _) in zip(ids, encoded["offset_mapping"])
    ]
    return Example(input_ids=ids, labels=labels)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (`IGNORE` on padding)."""
    import torch  # here, not at the top: reading and checking data should not wait for torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # [batch, seq]
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, *, shuffle: bool, rng: random.Random | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over `examples` in batches (shuffled with `rng` when asked; the last batch may be smaller)."""
    order = list(range(len(examples)))
    if shuffle:
        (rng or random.Random(0)).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were with".split()
)


def init_words(records: Sequence[Record], *, count: int = 32) -> str:
    """The most frequent words of the training outputs (stop words left out): a task-relevant text to start a
    prompt-tuning prompt from, as Lester et al. (2021) start theirs from class labels and vocabulary."""
    counts: Counter[str] = Counter()
    for record in records:
        for target in record.targets:
            counts.update(w for w in re.findall(r"[^\W\d_]+", target.lower()) if w not in _STOPWORDS and len(w) > 1)
    words = [word for word, _ in counts.most_common(count)]
    return " ".join(words) if words else "Answer the question"
