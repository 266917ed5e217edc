"""The LoRA term's cost per layer, by method and step shape, next to the base layer's own matmul.

For one linear layer of the default model's shapes, with adapters of rank `--rank` resident in the pool, it times
the three ways `AdapterStep` can compute the LoRA term (gathered, segmented, the per-row loop) on step shapes the
engine sees: decode steps over many distinct adapters, decode steps over few adapters, prefill chunks, and a mix.
It is what `SEGMENT_MIN_TOKENS` (where `auto` splits runs between the two) is set from. Gathered weights are
built once per shape, as a decode step reuses them from the step before.

    python bench/lora_backends.py [--rank 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.adapters.base import LoadedAdapter, LoraModule  # noqa: E402
from server.engine.adapters.batched import SEGMENT_MIN_TOKENS, AdapterStep, apply_lora  # noqa: E402
from server.engine.adapters.pool import AdapterPool  # noqa: E402
from server.engine.backbone import Geometry, LinearShape  # noqa: E402

LAYERS = {"q_proj (576→576)": (576, 576), "down_proj (1536→576)": (1536, 576)}
# step shapes: (description, [(adapter index or None, tokens)...])
SHAPES = {
    "decode, 32 rows, 11 LoRA adapters": [(i % 11 if i % 3 == 0 else None, 1) for i in range(32)],
    "decode, 64 rows, 4 adapters": [(i % 4, 1) for i in range(64)],
    "decode, 64 rows, 64 adapters": [(i, 1) for i in range(64)],
    "prefill, 4 rows x 128 tokens": [(i, 128) for i in range(4)],
    "decode 24 rows + a 256-token chunk": [(i % 11, 1) for i in range(24)] + [(0, 256)],
}


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    table = Table(title=f"LoRA term per layer call (µs), rank {args.rank}, {args.threads} thread(s); base = x @ W.T")
    for col in ("layer", "step", "tokens", "base", "gathered", "segmented", "loop", "auto"):
        table.add_column(col, justify="right")
    for layer_name, (fan_in, fan_out) in LAYERS.items():
        shapes = {"layers.0.f": LinearShape(fan_in, fan_out, False)}
        geometry = Geometry("bench", 1, fan_in, 1, 1, 1, 1, 1, linear_modules=shapes)
        pool = AdapterPool(geometry, torch.device("cpu"))
        adapters = [
            pool.install(
                LoadedAdapter(
                    key=f"a{i}",
                    kind="lora",
                    lora={
                        "layers.0.f": LoraModule(
                            a=torch.randn(args.rank, fan_in, generator=g) / fan_in**0.5,
                            b=torch.randn(fan_out, args.rank, generator=g),
                            scaling=2.0,
                        )
                    },
                )
            )
            for i in range(64)
        ]
        family = pool.lora["layers.{}.f"]
        weight = torch.randn(fan_out, fan_in, generator=g)
        for shape_name, rows in SHAPES.items():
            rows = sorted(rows, key=lambda r: -1 if r[0] is None else r[0])  # as the Batch packs them: by adapter
            spans = [(None if a is None else adapters[a], n) for a, n in rows]
            tokens = sum(n for _, n in rows)
            x = torch.randn(tokens, fan_in, generator=g)
            out = torch.zeros(tokens, fan_out)
            cells = [f"{timed(partial(torch.matmul, x, weight.T), args.repeats):.0f}"]
            for method in ("gathered", "segmented", "loop", "auto"):
                # a decode step's gathered weights are reused by the next ones: build once, as the engine would
                step = AdapterStep.build(spans, pool, method).lora["layers.{}.f"]
                cells.append(f"{timed(partial(apply_lora, x, out, family, 0, step), args.repeats):.0f}")
            table.add_row(layer_name, shape_name, str(tokens), *cells)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    least = SEGMENT_MIN_TOKENS.get("cpu")
    print(f"auto on this device (cpu): runs of >= {least} tokens of one adapter segmented, shorter ones gathered")


if __name__ == "__main__":
    main()
