"""Running streams under a stream of long-prompt arrivals: do the running rows keep their pace?

On the default model and the realistic mix of bench/workload.py: `--running` streams decode for the whole run
while new requests with ~`--prompt`-token prompts arrive as a Poisson process (`--rate` per second), each asking
for `--arrival-tokens` tokens. Reported: the running streams' inter-token latency (ITL) p50/p99 while arrivals
come, and the arrivals' time to first token (TTFT) p50/p99. Token times are taken where the engine emits them.

    python bench/arrivals.py                                   # this checkout's engine
    python bench/arrivals.py --compare-with ../old-checkout    # ... and another checkout's, on the same load

With --compare-with, the same load (same seeds, same arrival times) runs first against the other checkout's
`server` package (in a subprocess), then against this one, and both are printed in one table.

Targets (CPU here): ITL p99 <= 3 x ITL p50, and arrivals' TTFT p50/p99 within 1.2 x the other checkout's.
"""

# ruff: noqa: E402

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import random
import tempfile
import threading
import time
import warnings

import torch
import transformers
from rich.console import Console
from rich.table import Table
from workload import Engine, make_prompts, make_tasks, run_elsewhere, serve, without  # first: --compare-with

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

console = Console(width=None if sys.stdout.isatty() else 160)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(args) -> dict:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    backbone = Backbone.load(device="cpu")
    maker = Backbone.load(device="cpu").model
    root = args.adapters or Path(tempfile.mkdtemp(prefix="taskserve-arrivals-"))
    tasks = make_tasks(maker, root, args.tasks)
    del maker
    settings = {"max_batch_size": args.running + 16}
    if args.step_tokens:
        settings["max_step_tokens"] = args.step_tokens
    engine = Engine(backbone, EngineSettings(**settings))
    for task in tasks:
        serve(engine.residency, task.task_id, task.path)
    short = make_prompts(backbone.tokenizer, args.running, 12, seed=1)
    long = make_prompts(backbone.tokenizer, 1000, args.prompt, spread=0.1, seed=2)
    rng = random.Random(3)
    gaps = [rng.expovariate(args.rate) for _ in range(1000)]

    stamps: dict[str, list[float]] = {}
    submitted: dict[str, float] = {}
    lock = threading.Lock()

    def sink_for(key: str):
        def sink(delta) -> None:
            if delta.token_ids:
                now = time.perf_counter()
                with lock:
                    stamps.setdefault(key, []).append(now)

        return sink

    def request(prompt, task: str, new_tokens: int) -> GenerationRequest:
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        return GenerationRequest(tuple(prompt), sampling, task_id=task)

    engine.start()
    try:
        streams = []
        for i, prompt in enumerate(short):
            streams.append(engine.submit(request(prompt, tasks[i % len(tasks)].task_id, 2000), sink_for(f"run{i}")))
        while len(stamps) < args.running:  # every stream running before arrivals start
            time.sleep(0.05)
        time.sleep(args.warmup)
        window_start = time.perf_counter()
        arrivals, k = [], 0
        while time.perf_counter() - window_start < args.duration:
            time.sleep(gaps[k])
            key = f"arr{k}"
            submitted[key] = time.perf_counter()
            task = tasks[(k * 7) % len(tasks)].task_id
            arrivals.append(engine.submit(request(long[k], task, args.arrival_tokens), sink_for(key)))
            k += 1
        window_end = time.perf_counter()
        deadline = time.perf_counter() + 120
        while any(f"arr{j}" not in stamps for j in range(k)) and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        for s in streams:
            s.cancel()
        engine.stop()
    itl = [
        b - a
        for i in range(args.running)
        for a, b in zip(stamps[f"run{i}"], stamps[f"run{i}"][1:])
        if window_start <= a and b <= window_end
    ]
    ttft = [stamps[key][0] - t for key, t in submitted.items() if key in stamps]
    return {
        "itl_p50": percentile(itl, 50),
        "itl_p99": percentile(itl, 99),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "arrivals": len(submitted),
        "answered": len(ttft),
        "running_tokens": len(itl),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, default=24, help="streams decoding for the whole run")
    p.add_argument("--rate", type=float, default=0.25, help="arrivals per second (Poisson)")
    p.add_argument("--prompt", type=int, default=500, help="arrivals' prompt length in tokens (±10%%)")
    p.add_argument("--arrival-tokens", type=int, default=16, help="tokens each arrival asks for")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of decoding before arrivals start")
    p.add_argument("--tasks", type=int, default=32, help="distinct tasks (the realistic mix)")
    p.add_argument("--step-tokens", type=int, default=0, help="the engine's max_step_tokens (0: its default)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--adapters", type=Path, help="keep the generated PEFT adapters here and reuse them")
    p.add_argument("--compare-with", type=Path, help="another checkout to measure first, on the same load")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {}
    if args.compare_with:
        child = without(list(argv or sys.argv[1:]), "--compare-with")
        results[str(args.compare_with)] = run_elsewhere(__file__, child, args.compare_with)
    results["this checkout"] = measure(args)
    table = Table(
        title=f"{args.running} running streams; arrivals: ~{args.prompt}-token prompts at {args.rate}/s "
        f"for {args.duration:.0f} s, {args.arrival_tokens} tokens each (seconds)"
    )
    for col in ("engine", "ITL p50", "ITL p99", "p99/p50", "TTFT p50", "TTFT p99", "arrivals"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['itl_p50']:.3f}",
            f"{r['itl_p99']:.3f}",
            f"{r['itl_p99'] / r['itl_p50']:.2f}",
            f"{r['ttft_p50']:.2f}",
            f"{r['ttft_p99']:.2f}",
            f"{r['answered']}/{r['arrivals']}",
        )
    console.print(table)
    if len(results) == 2:
        old, new = results.values()
        console.print(
            f"TTFT this/other: p50 {new['ttft_p50'] / old['ttft_p50']:.2f}, p99 {new['ttft_p99'] / old['ttft_p99']:.2f}"
            f" (target <= 1.2); ITL p99/p50 here {new['itl_p99'] / new['itl_p50']:.2f} (target <= 3)"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
