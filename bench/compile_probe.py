"""Does torch.compile speed up the engine's steps? Eager against compiled, on the same load, in one run.

On the default model: `--rows` requests (short prompts, `--new-tokens` each) on the base model and on the
realistic mix, stepped to the end, first with the backbone eager, then with `torch.compile` wrapped around each
decoder layer's feed-forward block (`mlp`): the part of a step that is plain dense arithmetic with shapes that
only vary in the token count (`dynamic=True`). Attention over the paged pool and the adapter hooks stay eager:
their Python decides per step what runs. Reported: seconds per step, the compile time, and whether the tokens
agree.

    python bench/compile_probe.py [--rows 32] [--new-tokens 32]
"""

# ruff: noqa: E402

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import tempfile
import time
import warnings

import transformers
from rich.console import Console
from rich.table import Table
from workload import Engine, make_prompts, make_tasks, serve

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams


def run(engine: Engine, prompts, task_ids, new_tokens: int) -> tuple[float, list[list[int]]]:
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows = [
        engine.submit(GenerationRequest(tuple(p), sampling, task_id=t), lambda d: None)
        for p, t in zip(prompts, task_ids)
    ]
    engine.step()  # the prefill: not what compile is tried on
    steps, started = engine.steps, time.perf_counter()
    engine.run_until_idle()
    return (time.perf_counter() - started) / (engine.steps - steps), [r.output_ids for r in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--adapters", type=Path, help="keep the generated PEFT adapters here and reuse them")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    backbone = Backbone.load()
    root = args.adapters or Path(tempfile.mkdtemp(prefix="taskserve-compile-"))
    tasks = make_tasks(Backbone.load(device="cpu").model, root, args.rows)
    engine = Engine(backbone, EngineSettings(max_batch_size=args.rows))
    for task in tasks:
        serve(engine.residency, task.task_id, task.path)
    prompts = make_prompts(backbone.tokenizer, args.rows, 12)
    loads = {"base": ["base"] * args.rows, "mixed": [t.task_id for t in tasks]}
    eager = {}
    for name, ids in loads.items():
        run(engine, prompts, ids, 4)  # warm-up
        eager[name] = run(engine, prompts, ids, args.new_tokens)
    started = time.perf_counter()
    for layer in backbone.model.model.layers:
        layer.mlp.compile(dynamic=True)
    compiled = {}
    for name, ids in loads.items():
        run(engine, prompts, ids, 4)  # compiles, for every token count the load brings
        compiled[name] = run(engine, prompts, ids, args.new_tokens)
    compile_seconds = time.perf_counter() - started
    table = Table(title=f"{args.rows} rows, {args.new_tokens} new tokens, decode steps (s/step)")
    for col in ("load", "eager", "compiled mlp", "compiled / eager", "same tokens"):
        table.add_column(col, justify="right")
    for name in loads:
        (e, e_out), (c, c_out) = eager[name], compiled[name]
        table.add_row(name, f"{e:.3f}", f"{c:.3f}", f"{c / e:.2f}", str(e_out == c_out))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(f"compiling (and the warm-up runs that triggered it) took {compile_seconds:.0f} s")


if __name__ == "__main__":
    main()
