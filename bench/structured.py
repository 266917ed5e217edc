"""Structured outputs on the default model: do the outputs parse and validate, and what do constrained rows cost the
free rows that share their batch?

  (a) validity: 20 varied JSON schemas (nested objects, arrays, enums, numbers with bounds, required fields,
      patterns, formats, anyOf, $ref), each asked for in a chat prompt, generated greedily under the schema, all in
      one batch; every output must parse (json) and validate (jsonschema). Target: 20/20.
  (b) cost to free rows: a batch of --batch rows, one free and the others constrained (a long JSON array each), vs
      the same batch all free; the free row's time to generate --new-tokens tokens, median of --repeats
      alternating runs. Target: the mixed batch at most 10% slower.

    python bench/structured.py [--device cpu|cuda] [--batch 8] [--new-tokens 64] [--repeats 5] [--json out.json]
"""

# ruff: noqa: E402  (the repo root goes on sys.path, and the Hub offline, before any import)

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import jsonschema
import torch

import server.engine.runner as runner_module
from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.generation import Generation
from server.engine.grammar import Constraint
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

TARGET_SLOWDOWN = 0.10

# (what the prompt asks for, the schema), each as a user would write it: no additionalProperties unless it matters
SCHEMA_FILE = Path(__file__).with_name("structured_schemas.json")
SCHEMAS: list[tuple[str, dict]] = [(item["ask"], item["schema"]) for item in json.loads(SCHEMA_FILE.read_text())]
LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 500}


def chat_ids(backbone: Backbone, text: str) -> tuple[int, ...]:
    messages = [{"role": "user", "content": text}]
    ids = backbone.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return tuple(ids)


def run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[list[int], str, float]]:
    """Each request's (token ids, finish reason, seconds from submission to its end), all sharing the batch."""
    outputs = []
    started = time.perf_counter()
    for request in requests:
        out = ([], [], [])

        def sink(delta, out=out):
            out[0].extend(delta.token_ids)
            if delta.finish_reason is not None:
                out[1].append(delta.finish_reason)
                out[2].append(time.perf_counter() - started)

        engine.submit(request, sink)
        outputs.append(out)
    engine.run_until_idle()
    return [(ids, reasons[-1], ended[-1]) for ids, reasons, ended in outputs]


def validity(engine: Engine, backbone: Backbone, max_tokens: int) -> dict:
    requests = []
    for what, schema in SCHEMAS:
        prompt = chat_ids(backbone, f"Give {what} as JSON.")
        constraint = Constraint("json", json.dumps(schema))
        requests.append(GenerationRequest(prompt, SamplingParams(max_new_tokens=max_tokens, constraint=constraint)))
    started = time.perf_counter()
    results = run(engine, requests)
    seconds = time.perf_counter() - started
    rows, valid = [], 0
    for (what, schema), (ids, reason, _) in zip(SCHEMAS, results):
        text = backbone.tokenizer.decode(ids)
        try:
            jsonschema.validate(json.loads(text), schema)
            ok, error = True, None
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            ok, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        valid += ok
        rows.append({"schema": what, "finish": reason, "tokens": len(ids), "valid": ok, "error": error, "text": text})
    return {"valid": valid, "total": len(SCHEMAS), "seconds": seconds, "outputs": rows}


def slowdown(engine: Engine, backbone: Backbone, batch: int, new_tokens: int, repeats: int) -> dict:
    prompt = chat_ids(backbone, "Count from one to one hundred, in words.")
    free = GenerationRequest(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    constrained = GenerationRequest(
        prompt, SamplingParams(max_new_tokens=new_tokens, constraint=Constraint("json", json.dumps(LONG_ARRAY)))
    )
    alone, mixed, finished_early = [], [], 0
    run(engine, [free] * batch)  # warm-up: first-step costs and the grammar's tokenizer
    run(engine, [free] + [constrained] * (batch - 1))
    grammar_seconds, steps = [0.0], engine.steps
    with _timed(runner_module, "mask_logits", grammar_seconds), _timed(Generation, "_grammar_done", grammar_seconds):
        for _ in range(repeats):
            alone.append(run(engine, [free] * batch)[0][2])
            results = run(engine, [free] + [constrained] * (batch - 1))
            mixed.append(results[0][2])
            finished_early += sum(1 for ids, _, _ in results[1:] if len(ids) < new_tokens)
    mixed_steps = (engine.steps - steps) / 2
    a, m = statistics.median(alone), statistics.median(mixed)
    return {
        "grammar_ms_per_mixed_step": grammar_seconds[0] / mixed_steps * 1e3,
        "all_free_ms_per_step": statistics.median(alone) / new_tokens * 1e3,
        "batch": batch,
        "new_tokens": new_tokens,
        "free_row_seconds_all_free": a,
        "free_row_seconds_mixed": m,
        "slowdown": m / a - 1,
        "constrained_rows_that_ended_early": finished_early,
        "runs_all_free": alone,
        "runs_mixed": mixed,
    }


@contextmanager
def _timed(owner, name: str, total: list[float]):
    """Add the seconds spent in `owner.name` to total[0] while inside."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256, help="per validity output")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("validity", "slowdown"), help="run one part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = Backbone.load(device=args.device)
    engine = Engine(backbone, EngineSettings(max_batch_size=max(32, args.batch), max_kv_tokens=32768))
    report = {"device": str(backbone.device), "torch_threads": torch.get_num_threads()}
    if args.only != "slowdown":
        report["validity"] = v = validity(engine, backbone, args.max_tokens)
        print(f"(a) validity: {v['valid']}/{v['total']} outputs parse and validate ({v['seconds']:.1f} s, one batch)")
        for row in v["outputs"]:
            mark = "ok " if row["valid"] else "BAD"
            print(f"    {mark} {row['schema']:<40} {row['finish']:<6} {row['tokens']:>4} tok  {row['text'][:70]!r}")
            if row["error"]:
                print(f"        {row['error']}")
    if args.only != "validity":
        report["slowdown"] = s = slowdown(engine, backbone, args.batch, args.new_tokens, args.repeats)
        verdict = "meets" if s["slowdown"] <= TARGET_SLOWDOWN else "MISSES"
        print(
            f"(b) a free row among {args.batch - 1} constrained: {s['free_row_seconds_mixed']:.3f} s for "
            f"{args.new_tokens} tokens vs {s['free_row_seconds_all_free']:.3f} s all free: "
            f"{s['slowdown']:+.1%} ({verdict} the {TARGET_SLOWDOWN:.0%} target); grammar work "
            f"{s['grammar_ms_per_mixed_step']:.2f} ms a step vs {s['all_free_ms_per_step']:.1f} ms an all-free step"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    engine.stop()


if __name__ == "__main__":
    main()
