"""Fair admission: quiet tasks' time to first token while one task floods the queue.

On the default model and the realistic mix of bench/workload.py: one task keeps `--flood` requests in flight
(resubmitting as each ends), while `--quiet` other tasks each send one request every `--period` seconds. The
same load runs twice: with the flood far beyond `max_batch_size` (a long queue), and with the flood keeping just
`max_batch_size` requests in flight (a full batch, no queue). Reported: the quiet tasks' TTFT p50 and worst.

    python bench/fairness.py [--compare-with ../old-checkout]

Target: the quiet tasks' worst TTFT with the flood <= 2 x their worst TTFT with a full batch and no queue.
Under first-come-first-served admission they would wait behind the whole flood.
"""

# ruff: noqa: E402

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
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


def measure(args) -> dict:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    backbone = Backbone.load(device=args.device)
    maker = backbone.model if backbone.device.type == "cpu" else Backbone.load(device="cpu").model
    root = args.adapters or Path(tempfile.mkdtemp(prefix="taskserve-fairness-"))
    tasks = make_tasks(maker, root, args.quiet + 1, prefix="fair")
    rounds = int(args.duration / args.period) + 2  # every quiet request may still wait when the run ends
    engine = Engine(backbone, EngineSettings(max_batch_size=args.max_batch, max_queue=args.flood + args.quiet * rounds))
    for task in tasks:
        serve(engine.residency, task.task_id, task.path)
    flood_task, quiet_tasks = tasks[0].task_id, [t.task_id for t in tasks[1:]]
    prompts = make_prompts(backbone.tokenizer, 64, 12, seed=5)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    in_flight = args.flood if args.variant == "flood" else args.max_batch
    lock, stop = threading.Lock(), threading.Event()
    first_token: dict[int, float] = {}
    submitted: dict[int, float] = {}
    serial = iter(range(10**9))

    def flood_sink(delta) -> None:
        if delta.finish_reason is not None and not stop.is_set():
            submit_flood()

    def submit_flood() -> None:
        prompt = prompts[next(serial) % len(prompts)]
        engine.submit(GenerationRequest(tuple(prompt), sampling, task_id=flood_task), flood_sink)

    def quiet_sink(key: int):
        def sink(delta) -> None:
            if delta.token_ids and key not in first_token:
                with lock:
                    first_token[key] = time.perf_counter()

        return sink

    engine.start()
    try:
        for _ in range(in_flight):
            submit_flood()
        time.sleep(args.warmup)
        start = time.perf_counter()
        k = 0
        while time.perf_counter() - start < args.duration:
            for i, task in enumerate(quiet_tasks):
                key = k * len(quiet_tasks) + i
                submitted[key] = time.perf_counter()
                prompt = prompts[key % len(prompts)]
                engine.submit(GenerationRequest(tuple(prompt), sampling, task_id=task), quiet_sink(key))
            k += 1
            time.sleep(max(0.0, start + k * args.period - time.perf_counter()))
        deadline = time.perf_counter() + 300
        while len(first_token) < len(submitted) and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        engine.stop()
    ttft = sorted(first_token[key] - t for key, t in submitted.items() if key in first_token)
    return {
        "variant": args.variant,
        "in_flight": in_flight,
        "ttft_p50": ttft[len(ttft) // 2] if ttft else float("nan"),
        "ttft_max": ttft[-1] if ttft else float("nan"),
        "answered": len(ttft),
        "sent": len(submitted),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flood", type=int, default=300, help="requests the flooding task keeps in flight")
    p.add_argument("--quiet", type=int, default=8, help="other tasks, one request each per period")
    p.add_argument("--period", type=float, default=1.0, help="seconds between a quiet task's requests")
    p.add_argument("--max-batch", type=int, default=32, help="the engine's max_batch_size")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--adapters", type=Path, help="keep the generated PEFT adapters here and reuse them")
    p.add_argument("--compare-with", type=Path, help="another checkout to measure too, on the same load")
    p.add_argument("--variant", choices=["flood", "full"], default="flood", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args)))
        return
    child = without(without(list(argv or sys.argv[1:]), "--compare-with"), "--variant")
    trees = {"this checkout": None} | ({str(args.compare_with): args.compare_with} if args.compare_with else {})
    table = Table(
        title=f"{args.quiet} quiet tasks x 1 request / {args.period} s beside a flooding task "
        f"(max_batch_size {args.max_batch}, {args.new_tokens} tokens each): quiet tasks' TTFT, seconds"
    )
    for col in ("engine", "flood in flight", "TTFT p50", "TTFT worst", "worst / worst with a full batch", "answered"):
        table.add_column(col, justify="right")
    for name, tree in trees.items():
        full = run_elsewhere(__file__, [*child, "--variant", "full"], tree)
        flood = run_elsewhere(__file__, [*child, "--variant", "flood"], tree)
        for r in (full, flood):
            ratio = r["ttft_max"] / full["ttft_max"]
            table.add_row(
                name,
                str(r["in_flight"]),
                f"{r['ttft_p50']:.2f}",
                f"{r['ttft_max']:.2f}",
                f"{ratio:.2f}",
                f"{r['answered']}/{r['sent']}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
