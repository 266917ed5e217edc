"""Logit adjustments (bias, min_tokens, repetition/frequency/presence penalties) and min-p: the batched code against
a per-row reference written the plain way, rows that ask for nothing untouched."""

from __future__ import annotations

import pytest
import torch
from peft_reference import tiny_llama

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, TokenDelta
from server.engine.sampling import SamplingParams, TokenHistory, adjust_logits, make_generator, sample

CPU = torch.device("cpu")
VOCAB = 64
PROMPT = (3, 9, 9, 40)
OUTPUT = (5, 5, 5, 9, 61)
END_IDS = {0, 7}


def history(params: SamplingParams, output=OUTPUT) -> TokenHistory:
    h = TokenHistory(params, PROMPT, END_IDS, VOCAB, CPU)
    for token in output:
        h.add(token)
    return h


def reference(row: torch.Tensor, params: SamplingParams, output=OUTPUT) -> torch.Tensor:
    """vLLM's order, one row, one token at a time."""
    row = row.clone()
    for token, bias in params.logit_bias:
        row[token] += bias
    if len(output) < params.min_tokens:
        for token in END_IDS:
            row[token] = float("-inf")
    for token in set(PROMPT) | set(output):
        if params.repetition_penalty != 1.0:
            value = row[token]
            row[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token in set(output):
        row[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return row


ROWS = [
    SamplingParams(frequency_penalty=0.7, presence_penalty=-0.3),
    SamplingParams(),  # asks for nothing: no history
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(logit_bias=((5, 4.0), (12, -100.0), (5, 1.5))),
    SamplingParams(min_tokens=8, presence_penalty=1.0, repetition_penalty=0.5),
    SamplingParams(min_tokens=3),  # reached: nothing held back
]


def test_batched_adjustments_match_the_per_row_reference():
    logits = torch.randn(len(ROWS), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    histories = [history(p) if p.adjusts_logits else None for p in ROWS]
    adjusted = adjust_logits(logits, histories)
    for i, params in enumerate(ROWS):
        assert torch.allclose(adjusted[i], reference(logits[i], params), atol=1e-5), i
    assert torch.equal(adjusted[1], logits[1]) and torch.equal(adjusted[5], logits[5])
    assert not torch.equal(adjusted[0], logits[0])  # sanity: the penalties did something
    assert adjusted is not logits and torch.isfinite(logits).all()  # the raw logits (log-probs) stay as they were


def test_a_row_adjusts_the_same_whatever_shares_its_batch():
    logits = torch.randn(len(ROWS), VOCAB, generator=torch.Generator().manual_seed(1))
    histories = [history(p) if p.adjusts_logits else None for p in ROWS]
    together = adjust_logits(logits, histories)
    for i in range(len(ROWS)):
        alone = adjust_logits(logits[i : i + 1], histories[i : i + 1])
        assert torch.equal(alone[0], together[i])


def test_greedy_rows_choose_after_their_penalties():
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 2.0  # the favourite, generated three times already
    logits[:, 6] = 1.0
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams()]
    tokens = sample(logits, params, [None, None], [history(params[0]), None])
    assert tokens.tolist() == [6, 5]


def test_min_tokens_holds_back_the_end_ids_until_reached():
    params = SamplingParams(min_tokens=2)
    h = TokenHistory(params, PROMPT, END_IDS, VOCAB, CPU)
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 10.0  # an end id is the favourite
    picks = []
    for _ in range(3):
        picks.append(int(sample(logits, [params], [None], [h])))
        h.add(picks[-1])
    assert picks[0] not in END_IDS and picks[1] not in END_IDS and picks[2] == 7


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_draws_only_tokens_near_the_top(min_p):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    probs = torch.softmax(logits[0], dim=-1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    params = SamplingParams(temperature=1.0, min_p=min_p, seed=3)
    generator = make_generator(params, CPU)
    drawn = {int(sample(logits, [params], [generator])) for _ in range(300)}
    assert drawn <= allowed
    if len(allowed) > 1:
        assert len(drawn) > 1  # sanity: it still samples


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 200}, "min_tokens"),
        ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# --- in the engine's mixed batch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    engine = Engine(Backbone(tiny_llama(), None, name="tiny"), EngineSettings(max_step_tokens=8))
    yield engine
    engine.stop()
    engine.runner.hooks.remove()


def run(engine: Engine, requests: list[SamplingParams], prompt=(5, 17, 33, 8, 91, 4)) -> list[list[TokenDelta]]:
    sinks: list[list[TokenDelta]] = [[] for _ in requests]
    for params, sink in zip(requests, sinks):
        engine.submit(GenerationRequest(prompt, params), sink.append)
    engine.run_until_idle()
    return sinks


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_a_stop_token_ends_the_row_with_stop(engine):
    (free,) = run(engine, [SamplingParams(max_new_tokens=12, ignore_eos=True)])
    stop_at = tokens(free)[3]
    (stopped,) = run(engine, [SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,))])
    assert tokens(stopped) == tokens(free)[: tokens(free).index(stop_at) + 1]
    assert stopped[-1].finish_reason == "stop"


def test_penalised_rows_ignore_their_batch_mates(engine):
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    (free,) = run(engine, [plain])
    penalised = SamplingParams(
        max_new_tokens=12,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        logit_bias=((tokens(free)[0], -100.0),),
    )
    (alone,) = run(engine, [penalised])
    assert tokens(alone) != tokens(free) and tokens(free)[0] not in tokens(alone)  # sanity: they bite
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, presence_penalty=1.5, min_tokens=5)
    mixed = run(engine, [plain, penalised, sampled, plain])
    assert tokens(mixed[1]) == tokens(alone) and tokens(mixed[0]) == tokens(mixed[3]) == tokens(free)
    assert tokens(run(engine, [sampled])[0]) == tokens(mixed[2])
