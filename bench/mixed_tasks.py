"""Mixed-task throughput: the engine batching many PEFT tasks of every kind, against the backbone alone and PEFT.

Measured side by side in one run, on the default model, for each prompt length in --prompt-lengths (short ~12
tokens, long ~120) and each N in --sizes, on the realistic mix of bench/workload.py (all-linear LoRA r=16, q/v
LoRA r=8, rsLoRA r=16, prefix 16 and 10-with-projection, prompt 8 and 20, p-tuning 12, IA³), or with
--mix every on every kind served (DoRA, LoRA biases, AdaLoRA, LoHa, LoKr, ... too, and two composite tasks:
prefix + FFN LoRA, and prompt + q/v LoRA at scale 0.5 + IA³):

  (a) engine, N requests on N distinct tasks cycling through the mix, all submitted at once;
  (b) engine, the same prompts with no adapter (task "base"): the ceiling (a) is held against;
  (c) PEFT by hand, one request at a time: one PeftModel per peft type, `set_adapter` per request;
      timed on a sample of requests and extrapolated (per-request time x N); composites are left out of
      the sample (no PeftModel holds one);
  (d) a LoRA-only load with varied output lengths: the engine vs PEFT's own mixed batch
      (`generate(adapter_names=...)` on static left-padded batches of the engine's max batch size).

    python bench/mixed_tasks.py --sizes 8,32,64 --prompt-lengths 12,120 --new-tokens 64 [--json out.json]
    python bench/mixed_tasks.py --quick          # smoke run: N=8, 16 new tokens
    python bench/mixed_tasks.py --profile --sizes 32   # (a) only, under torch.profiler
"""

# ruff: noqa: E402  (the repo root and tests/ go on sys.path, and the Hub goes offline, before any import)

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import copy
import datetime
import json
import platform
import random
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass
from functools import partial
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from workload import MIXES, Engine, Task, make_prompts, make_tasks, serve

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.request import BASE_TASK, GenerationRequest
from server.engine.sampling import SamplingParams

TARGETS = {"a/b": 0.90, "a/c": 10.0, "lora engine/peft": 2.0}  # held at N=32, at every prompt length
LORA_MIX = ("lora_all_r16", "lora_qv_r8", "rslora_attn_r16")
console = Console(width=None if sys.stdout.isatty() else 160)  # no wrapping when piped to a file


@dataclass
class Row:
    """One line of results; tokens/s are useful generated tokens over wall time."""

    prompt_len: int
    n: int
    mixed_tok_s: float
    base_tok_s: float
    peft_single_tok_s: float
    peft_single_sample: int
    peft_single_agree: str
    lora_engine_tok_s: float
    lora_peft_tok_s: float

    @property
    def ratios(self) -> dict[str, float]:
        return {
            "a/b": self.mixed_tok_s / self.base_tok_s,
            "a/c": self.mixed_tok_s / self.peft_single_tok_s,
            "lora engine/peft": self.lora_engine_tok_s / self.lora_peft_tok_s,
        }


# --- workload --------------------------------------------------------------------------------------


def varied_lengths(n: int, new_tokens: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(max(1, new_tokens // 4), new_tokens) for _ in range(n)]


def timed(device: torch.device, run: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of `run()` (device work included) and its result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    result = run()
    sync()
    return time.perf_counter() - start, result


# --- the engine --------------------------------------------------------------------------------------


def run_engine(engine: Engine, prompts, task_ids: list[str], lengths: list[int]) -> list[list[int]]:
    """Submit every request at once and step to idle on this thread; returns the outputs."""
    generations = [
        engine.submit(
            GenerationRequest(tuple(p), SamplingParams(max_new_tokens=m, ignore_eos=True), task_id=t),
            sink=lambda delta: None,
        )
        for p, t, m in zip(prompts, task_ids, lengths)
    ]
    engine.run_until_idle()
    assert [len(g.output_ids) for g in generations] == lengths, "a row stopped short"
    return [g.output_ids for g in generations]


def engine_tok_s(engine: Engine, prompts, task_ids, lengths) -> tuple[float, list[list[int]]]:
    """Tokens/s with submission included, and the outputs."""
    run_engine(engine, prompts, task_ids, [min(4, m) for m in lengths])  # warm-up: same shapes, few steps
    elapsed, outputs = timed(engine.backbone.device, lambda: run_engine(engine, prompts, task_ids, lengths))
    return sum(lengths) / elapsed, outputs


# --- PEFT by hand ------------------------------------------------------------------------------------


def load_peft(plain, tasks: list[Task]) -> PeftModel:
    """One PeftModel holding `tasks` (all of one peft type: PEFT cannot mix types in one model), on a fresh copy."""
    model = PeftModel.from_pretrained(copy.deepcopy(plain), str(tasks[0].path), adapter_name=tasks[0].task_id)
    for task in tasks[1:]:
        model.load_adapter(str(task.path), adapter_name=task.task_id)
    model.eval()
    _fix_prompt_learning_generate(model)
    return model


def _fix_prompt_learning_generate(model: PeftModel) -> None:
    """docs/adapters.md, "Traps": with peft 0.21.2 + transformers 5.x, PeftModel.generate never sees its cache.

    Unpatched, prefix tuning silently drops its prefix and prompt/p-tuning re-feed `nvt + 1` rows every
    step: wrong output, and not quite the work a correct PEFT does. We apply the documented one-line shim
    (rename "cache" to "past_key_values") so (c) times PEFT doing the right work. LoRA/IA3 are unaffected.
    """
    inner = model.base_model_prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        inputs = inner(*args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    model.base_model_prepare_inputs_for_generation = prepare


def peft_generate(model: PeftModel, ids, mask, new_tokens: int, task: Task | None = None, **kwargs) -> torch.Tensor:
    if task is not None:
        model.set_adapter(task.task_id)  # timed: switching adapters is part of PEFT's per-request cost
    lengths = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}  # min: PEFT must not stop at EOS
    pad = model.config.pad_token_id or 0
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **lengths, **kwargs)
    return out[:, ids.shape[1] :]


def peft_single(plain, tasks, prompts, new_tokens: int, sample: int, reference) -> tuple[float, str]:
    """(c): tokens/s of one-request-at-a-time PEFT, from `sample` requests spread over the load, and agreement.

    Per-request time does not depend on N here (nothing is shared between requests), so tokens/s over the
    sample is what N requests would get: extrapolated as per-request time x N.
    """
    device = next(plain.parameters()).device
    picks = sorted({i * len(tasks) // sample for i in range(min(sample, len(tasks)))})
    picks = [i for i in picks if tasks[i].peft_type != "COMPOSITE"]  # no PeftModel holds a composite task
    by_type: dict[str, list[int]] = defaultdict(list)
    for i in picks:
        by_type[tasks[i].peft_type].append(i)
    elapsed, agree, eos = 0.0, 0, plain.config.eos_token_id
    for rows in by_type.values():
        model = load_peft(plain, [tasks[i] for i in rows])
        for k, i in enumerate(rows):
            ids = torch.tensor([prompts[i]], device=device)
            if k == 0:
                peft_generate(model, ids, torch.ones_like(ids), 2, task=tasks[i])  # warm-up
            run = partial(peft_generate, model, ids, torch.ones_like(ids), new_tokens, task=tasks[i])
            seconds, out = timed(device, run)
            elapsed += seconds
            agree += _agrees(out[0].tolist(), reference[i], eos)
    return len(picks) * new_tokens / elapsed, f"{agree}/{len(picks)}"


def _agrees(peft_ids: list[int], engine_ids: list[int], eos: int | None) -> bool:
    """Equal up to the engine's first EOS: min_new_tokens makes PEFT suppress EOS, ignore_eos lets us emit it."""
    end = engine_ids.index(eos) if eos in engine_ids else len(engine_ids)
    return peft_ids[:end] == engine_ids[:end]


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def peft_mixed(plain, tasks: list[Task], prompts, lengths: list[int], batch_size: int) -> float:
    """(d) PEFT's side: all LoRA tasks in one PeftModel, static batches, each decoded to its longest row.

    Only each row's own max_new_tokens count as useful tokens: a static batch pays for its longest row.
    """
    device = next(plain.parameters()).device
    model = load_peft(plain, tasks)
    pad = model.config.pad_token_id or 0
    chunks = [range(s, min(s + batch_size, len(tasks))) for s in range(0, len(tasks), batch_size)]
    ids, mask = left_pad([prompts[i] for i in chunks[0]], pad, device)
    peft_generate(model, ids, mask, 2, adapter_names=[tasks[i].task_id for i in chunks[0]])  # warm-up

    def run() -> None:
        for chunk in chunks:
            ids, mask = left_pad([prompts[i] for i in chunk], pad, device)
            names = [tasks[i].task_id for i in chunk]
            peft_generate(model, ids, mask, max(lengths[i] for i in chunk), adapter_names=names)

    elapsed, _ = timed(device, run)
    return sum(lengths) / elapsed


# --- profile --------------------------------------------------------------------------------------------


def profile_engine(engine: Engine, prompts, task_ids, lengths) -> None:
    """(a) under torch.profiler: top ops by self time, and how much of the wall time no op accounts for."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.backbone.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run_engine(engine, prompts, task_ids, lengths)  # warm-up at full length
    hooks = engine.runner.hooks
    calls = {"hook calls": 0}
    for name in ("_scale_input", "_adapt_output"):  # count what the hooks cost: every call is Python
        bound = getattr(hooks, name)

        def counted(*args, _bound=bound):
            calls["hook calls"] += 1
            return _bound(*args)

        setattr(hooks, name, counted)
    hooks.remove()
    hooks.__init__(engine.backbone.model, hooks.pool)  # re-register with the counting methods
    steps = engine.steps
    with profile(activities=activities) as prof:
        wall, _ = timed(engine.backbone.device, lambda: run_engine(engine, prompts, task_ids, lengths))
    steps = engine.steps - steps
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(averages.table(sort_by=sort_by, row_limit=25))  # plain: rich would re-wrap the profiler's table
    op_seconds = sum(e.self_cpu_time_total for e in averages) / 1e6
    built = sum(e.count for e in averages if e.key in ("aten::lift_fresh", "aten::empty_strided", "aten::empty"))
    ops = sum(e.count for e in averages if e.key.startswith("aten::"))
    console.print(
        f"N={len(prompts)}: {steps} steps in {wall:.2f} s under the profiler ({wall / steps * 1e3:.1f} ms/step); "
        f"ops' self CPU time {op_seconds:.2f} s, so ~{max(0.0, wall - op_seconds):.2f} s is Python outside any op. "
        f"Per step: {calls['hook calls'] / steps:.0f} hook calls, {ops / steps:.0f} aten ops, "
        f"{built / steps:.0f} tensors allocated"
    )


# --- report ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, str | int]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    return {
        "cpu": cpu or platform.processor() or "?",
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def print_report(info: dict, rows: list[Row], args) -> None:
    console.print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    title = f"Mixed tasks ({args.mix} mix): {args.new_tokens} new tokens per request, greedy, ignore_eos (tokens/s)"
    mixed = Table(title=title)
    columns = ("prompt", "N", "(a) engine mixed", "(b) engine base", "(c) PEFT one-at-a-time*", "c≡a", "a/b", "a/c")
    for col in columns:
        mixed.add_column(col, justify="right")
    lora = Table(title=f"LoRA-only load, max_new_tokens in [{max(1, args.new_tokens // 4)}, {args.new_tokens}]")
    for col in ("prompt", "N", "engine", f"PEFT mixed batch (static, {args.max_batch})", "engine/PEFT"):
        lora.add_column(col, justify="right")
    for r in rows:
        q = {k: f"{v:.2f} {'✓' if v >= TARGETS[k] else '✗'}" for k, v in r.ratios.items()}
        speeds = (f"{x:.1f}" for x in (r.mixed_tok_s, r.base_tok_s, r.peft_single_tok_s))
        mixed.add_row(f"~{r.prompt_len}", str(r.n), *speeds, r.peft_single_agree, q["a/b"], q["a/c"])
        lora.add_row(
            f"~{r.prompt_len}",
            str(r.n),
            f"{r.lora_engine_tok_s:.1f}",
            f"{r.lora_peft_tok_s:.1f}",
            q["lora engine/peft"],
        )
    console.print(mixed, lora)
    console.print(
        f"* (c) timed on {min(args.peft_sample, max(r.n for r in rows))} requests spread over the load and "
        f"extrapolated (per-request time x N); c≡a: sampled PEFT outputs equal to the engine's; best of "
        f"{args.repeats} pass(es) per path. "
        f"Targets at N=32: a/b ≥ {TARGETS['a/b']}, a/c ≥ {TARGETS['a/c']}, "
        f"engine/PEFT ≥ {TARGETS['lora engine/peft']}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8,32,64", help="comma-separated N (concurrent requests = distinct tasks)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-lengths", default="12,120", help="comma-separated mean prompt lengths (tokens, ±25%%)")
    p.add_argument("--adapters", type=Path, help="keep the generated PEFT adapters here and reuse them next time")
    p.add_argument("--quick", action="store_true", help="smoke run: --sizes 8 --new-tokens 16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-batch", type=int, default=64, help="engine max_batch_size = PEFT's static batch in (d)")
    p.add_argument("--peft-sample", type=int, default=8, help="requests timed for (c)")
    p.add_argument("--repeats", type=int, default=1, help="measure all paths in turn this many times, keep each best")
    p.add_argument(
        "--mix", choices=sorted(MIXES), default="realistic", help="kinds the tasks cycle through (every: all served)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--profile", action="store_true", help="only run (a) at the largest size under torch.profiler")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.new_tokens = "8", 16
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.prompt_lengths = [int(s) for s in args.prompt_lengths.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # PEFT warns about position ids at every prompt-learning step
    transformers.logging.set_verbosity_error()
    backbone = Backbone.load(device=args.device)
    plain = Backbone.load(device=args.device).model  # hook-free copy for PEFT (the engine hooks its own)
    maker = plain if backbone.device.type == "cpu" else Backbone.load(device="cpu", dtype="float32").model
    n_max = max(args.sizes)
    with tempfile.TemporaryDirectory(prefix="taskserve-bench-") as tmp:
        root = args.adapters or Path(tmp)
        started = time.perf_counter()
        mixed = make_tasks(maker, root, n_max, kinds=MIXES[args.mix], seed=0)
        lora = [] if args.profile else make_tasks(maker, root, n_max, kinds=LORA_MIX, seed=1000, prefix="lora")
        console.print(f"{len(mixed) + len(lora)} PEFT adapters ready in {time.perf_counter() - started:.0f} s")
        engine = Engine(backbone, EngineSettings(max_batch_size=args.max_batch))
        for task in mixed + lora:
            serve(engine.residency, task.task_id, task.path)
        if args.profile:
            prompts = make_prompts(backbone.tokenizer, n_max, args.prompt_lengths[0])
            profile_engine(engine, prompts, [t.task_id for t in mixed], [args.new_tokens] * n_max)
            return
        rows = []
        for length in args.prompt_lengths:
            prompts = make_prompts(backbone.tokenizer, n_max, length)
            for n in args.sizes:
                # Repeats go round all paths in turn, so a burst of load elsewhere on a shared machine hits one pass
                # of every path rather than every repeat of one path; the fastest pass of each is the least disturbed.
                passes = [
                    measure(engine, plain, mixed[:n], lora[:n], prompts[:n], length, args) for _ in range(args.repeats)
                ]
                rows.append(Row(*(max(v) if isinstance(v[0], float) else v[0] for v in zip(*map(astuple, passes)))))
    info = machine_info(backbone.device)
    print_report(info, rows, args)
    if args.json:
        results = [{**asdict(r), "ratios": r.ratios} for r in rows]
        run = {
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "peft_sample": args.peft_sample,
            "mix": list(MIXES[args.mix]),
        }
        report = {"machine": info, "run": run, "targets": TARGETS, "results": results}
        args.json.write_text(json.dumps(report, indent=2))


def measure(engine: Engine, plain, mixed: list[Task], lora: list[Task], prompts, length: int, args) -> Row:
    n, m = len(mixed), args.new_tokens

    def log(what: str, tok_s: float) -> None:  # as we go: a cut-short run still says something
        console.print(f"prompt ~{length}, N={n}: {what}: {tok_s:.1f} tokens/s", style="dim")

    same, lengths = [m] * n, varied_lengths(n, m)
    mixed_tok_s, reference = engine_tok_s(engine, prompts, [t.task_id for t in mixed], same)
    log("(a) engine, mixed tasks", mixed_tok_s)
    base_tok_s, _ = engine_tok_s(engine, prompts, [BASE_TASK] * n, same)
    log("(b) engine, base", base_tok_s)
    single_tok_s, agree = peft_single(plain, mixed, prompts, m, args.peft_sample, reference)
    log("(c) PEFT, one request at a time", single_tok_s)
    lora_engine, _ = engine_tok_s(engine, prompts, [t.task_id for t in lora], lengths)
    log("(d) LoRA load, engine", lora_engine)
    lora_peft = peft_mixed(plain, lora, prompts, lengths, args.max_batch)
    log("(d) LoRA load, PEFT mixed batch", lora_peft)
    sample = min(args.peft_sample, n)
    return Row(length, n, mixed_tok_s, base_tok_s, single_tok_s, sample, agree, lora_engine, lora_peft)


if __name__ == "__main__":
    main()
