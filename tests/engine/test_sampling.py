"""Sampling: greedy is argmax, filters keep what they promise, seeded rows ignore batch-mates."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine import sampling
from server.engine.sampling import SamplingParams, make_generator, sample

CPU = torch.device("cpu")
VOCAB = 64


def _logits(batch: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3  # [batch, vocab]


def _run(rows: list[SamplingParams], steps: list[torch.Tensor]) -> list[list[int]]:
    """Sample `steps` consecutive [batch, vocab] logits with one generator per row."""
    gens = [make_generator(p, CPU) for p in rows]
    out = [sample(step, rows, gens).tolist() for step in steps]
    return [list(col) for col in zip(*out, strict=True)]  # per row


def _reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per-row loop in plain Python, the slow reference for the batched filter."""
    logits = (row.double() / p.temperature).tolist()
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if p.top_k:
        order = order[: p.top_k]
    top = max(logits[i] for i in order)
    weights = {i: math.exp(logits[i] - top) for i in order}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += weights[i] / total
        if p.top_p < 1.0 and mass >= p.top_p:
            break
    probs = torch.zeros(len(logits), dtype=torch.float64)
    kept_total = sum(weights[i] for i in kept)
    for i in kept:
        probs[i] = weights[i] / kept_total
    return probs


def test_greedy_is_argmax() -> None:
    logits = _logits(5)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # tie -> lowest id
    rows = [SamplingParams()] * 5
    tokens = sample(logits, rows, [None] * 5)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    assert tokens[2].item() == 7


def test_all_greedy_skips_sampling_machinery(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("all-greedy batch must be a single argmax")

    monkeypatch.setattr(sampling, "_filtered_probs", boom)
    monkeypatch.setattr(torch, "multinomial", boom)
    logits = _logits(3)
    assert torch.equal(sample(logits, [SamplingParams()] * 3, [None] * 3), logits.argmax(-1))


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    logits = _logits(4)
    rows = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(),
        SamplingParams(temperature=2.0),
    ]
    tokens = sample(logits, rows, [make_generator(p, CPU) for p in rows])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, top_k=1, seed=3), SamplingParams(temperature=1.0, top_p=1e-6, seed=3)],
    ids=["top_k=1", "tiny top_p"],
)
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    steps = [_logits(6, seed=s) for s in range(20)]
    drawn = _run([params] * 6, steps)
    greedy = _run([SamplingParams()] * 6, steps)
    assert drawn == greedy


def test_batched_filter_matches_per_row_reference() -> None:
    logits = _logits(5, vocab=40)
    rows = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.6),
        SamplingParams(temperature=2.0, top_k=100),
    ]
    got = sampling._filtered_probs(logits, rows)  # [5, vocab]
    for i, p in enumerate(rows):
        torch.testing.assert_close(got[i].double(), _reference_probs(logits[i], p), atol=1e-6, rtol=1e-5)


SEEDED = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
PLAIN_SEEDED = SamplingParams(temperature=1.0, seed=99)  # no filtering: may skip the sort when alone


@pytest.mark.parametrize("row", [SEEDED, PLAIN_SEEDED], ids=["filtered", "unfiltered"])
@pytest.mark.parametrize("position", [0, 2, 3])
def test_seeded_row_ignores_batch_mates(row: SamplingParams, position: int) -> None:
    mates = [
        SamplingParams(),
        SamplingParams(temperature=1.5, top_p=0.5),  # unseeded: global RNG
        SamplingParams(temperature=0.3, top_k=3, seed=7),
    ]
    batch = mates[:position] + [row] + mates[position:]
    steps_batched = [_logits(len(batch), seed=s) for s in range(50)]
    steps_alone = [step[position : position + 1] for step in steps_batched]

    alone = _run([row], steps_alone)[0]
    batched = _run(batch, steps_batched)
    assert len(set(alone)) > 5, "sanity: the row really samples"
    assert batched[position] == alone


def test_seeded_run_is_reproducible_and_seeds_differ() -> None:
    steps = [_logits(1, seed=s) * 0.2 for s in range(100)]  # flat-ish: many plausible tokens
    a = _run([SamplingParams(temperature=1.0, seed=1)], steps)[0]
    b = _run([SamplingParams(temperature=1.0, seed=1)], steps)[0]
    c = _run([SamplingParams(temperature=1.0, seed=2)], steps)[0]
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 50


def test_unseeded_generators_differ() -> None:
    p = SamplingParams(temperature=1.0)
    a, b = make_generator(p, CPU), make_generator(p, CPU)
    assert a is not None and b is not None
    assert a.initial_seed() != b.initial_seed()
    assert make_generator(SamplingParams(), CPU) is None


def test_draws_stay_inside_top_k() -> None:
    logits = _logits(1) * 0.3  # flat enough that tokens outside the top 5 would show up
    allowed = set(logits[0].topk(5).indices.tolist())
    params = [SamplingParams(temperature=2.0, top_k=5, seed=0)] * 2000
    gens = [make_generator(p, CPU) for p in params[:1]] * 2000  # one generator, 2000 draws
    drawn = set(sample(logits.expand(2000, -1), params, gens).tolist())
    assert drawn <= allowed
    assert len(drawn) == 5


def test_draws_stay_inside_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    n = 2000
    for top_p, nucleus in [(0.4, {1}), (0.7, {1, 3}), (0.9, {1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        params = [SamplingParams(temperature=1.0, top_p=top_p, seed=5)] * n
        gen = make_generator(params[0], CPU)
        drawn = set(sample(logits.expand(n, -1), params, [gen] * n).tolist())
        assert drawn == nucleus, top_p


def test_bf16_logits() -> None:
    logits = _logits(3).to(torch.bfloat16)
    rows = [SamplingParams(), SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=1), SamplingParams()]
    tokens = sample(logits, rows, [make_generator(p, CPU) for p in rows])
    assert tokens.dtype == torch.long and tokens.shape == (3,)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.equal(sample(logits, [SamplingParams()] * 3, [None] * 3), logits.argmax(-1))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"logprobs": 21}, "logprobs"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stop": tuple(str(i) for i in range(17))}, "stop"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": "###"}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_extreme_values_sample_safely_and_never_fail_batch_mates() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")  # a row whose forward went wrong
    rows = [SamplingParams(temperature=1e-39, top_p=1e-300, seed=1), SamplingParams(temperature=1.0, seed=2)] * 2
    tokens = sample(logits, rows[:3], [make_generator(p, torch.device("cpu")) for p in rows[:3]])
    assert tokens[0] == logits[0].argmax()  # a vanishing temperature or nucleus keeps the top token
    assert 0 <= int(tokens[1]) < 50 and tokens[2] == sample(logits[2:], rows[2:3], [make_generator(rows[2], "cpu")])[0]


def test_params_normalise_stop_list() -> None:
    p = SamplingParams(stop=["a", "b"])  # type: ignore[arg-type]
    assert p.stop == ("a", "b")
    assert hash(p) == hash(SamplingParams(stop=("a", "b")))
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy


def test_row_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="rows"):
        sample(_logits(2), [SamplingParams()], [None])
