"""Streaming detokenisation with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character can span several tokens)
and for SentencePiece (a token's leading space depends on what precedes it). So each step
decodes a small window of recent ids twice, with and without the new ones, and emits the
difference (the prefix-offset / read-offset technique used by TGI and vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt ids that seed the decode window: enough context for the first generated token's
# leading-space handling, few enough to keep each decode cheap.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas: never emits a broken UTF-8 character,
    and holds back text that may still turn out to be the start of a stop string."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        if isinstance(stop, str):
            raise ValueError("stop must be a sequence of strings, not a single str")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self.include_stop = include_stop  # the text keeps the stop string that ends it
        self.token_ids: list[int] = []
        """Generated ids so far (prompt ids excluded)."""

        # Ids the window is cut from: the prompt's tail, then every generated id.
        self._ids: list[int] = [int(i) for i in list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0  # window start: context decoded only to diff against
        self._read_offset = len(self._ids)  # ids before this are already turned into text
        self._pending = ""  # decoded text not yet released (held back for stop strings)
        self._released: list[str] = []  # every delta returned so far
        self._stopped = False
        self._finished = False

    @property
    def stopped(self) -> bool:
        """A stop string appeared; the text ends just before it and further push() returns ''."""
        return self._stopped

    @property
    def text(self) -> str:
        """The full final text released so far (the concatenation of every returned delta)."""
        return "".join(self._released)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (may be '')."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        self.token_ids.append(int(token_id))
        if self._stopped:
            return ""
        self._ids.append(int(token_id))
        self._pending += self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back text, at the end of generation (empty if a stop string matched).

        Bytes of an unfinished character are flushed as U+FFFD, exactly as a one-shot decode
        of all ids would show them.
        """
        if self._finished:
            return ""
        self._finished = True
        if self._stopped:
            return ""
        self._pending += self._decode_new(final=True)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text added by the ids after the read offset; '' while it ends in a partial character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        # Too short: the new ids were skipped special tokens (or decoded to nothing); keep them
        # in the window so the next token is decoded in their company.
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        """Move the part of the pending text that no stop string can claim into the output."""
        cut = self._first_stop_index()
        if cut is not None:
            if self.include_stop:
                cut += max(len(s) for s in self._stop if self._pending.startswith(s, cut))
            delta, self._pending, self._stopped = self._pending[:cut], "", True
        else:
            end = len(self._pending) - (0 if final else self._stop_prefix_len())
            delta, self._pending = self._pending[:end], self._pending[end:]
        if delta:
            self._released.append(delta)
        return delta

    def _first_stop_index(self) -> int | None:
        """Where the earliest stop string starts in the pending text, if any.

        Searching only the pending text is enough: released text never ends with a partial
        stop string (that part is always held back), so no match can start before it.
        """
        hits = [i for s in self._stop if (i := self._pending.find(s)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        text = self._pending
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
