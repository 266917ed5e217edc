"""The load every engine bench shares: real PEFT adapters of every served kind, at realistic sizes, and prompts.

The mix is the one production traffic looks like on a shared backbone (and the one the engine's targets are
set on): all-linear LoRA r=16, q/v LoRA r=8, rsLoRA r=16 on attention, prefix tuning with 16 virtual tokens
and with projection (10), prompt tuning with 8 and 20, p-tuning (MLP, 12), IA³, DoRA r=8 on q/v, LoRA r=8 with
`lora_bias` on the MLP, AdaLoRA (init r=12, pruned), LoHa and LoKr r=8 on q/v, VeRA r=256 on q/v, LLaMA-Adapter
(10 prompts on the top 8 layers) — each saved by PEFT's own `save_pretrained` with randomised (non-trivial) weights.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.append(path)  # after site-packages: tests/adapters_store must not shadow the package
if os.environ.get("TASKSERVE_TREE"):  # measure another checkout's engine (see run_elsewhere)
    sys.path.insert(0, os.environ["TASKSERVE_TREE"])

from peft import (  # noqa: E402
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
)
from peft_reference import make_adapter, make_composite  # noqa: E402

try:
    from serving import serve  # noqa: E402,F401  (re-exported: benches upload through the task layer)
except ImportError:  # checkouts from before the task layer (--compare-with): the residency registered uploads

    def serve(residency, task_id: str, path: Path):
        from server.engine.adapters import read_peft_dir

        return residency.register(task_id, *read_peft_dir(path))


try:
    from server.engine.engine import Engine  # noqa: E402
except ImportError:  # checkouts from before the engine moved to engine.py
    from server.engine.scheduler import Engine  # noqa: E402

__all__ = [
    "MIX",
    "MIXES",
    "REALISTIC",
    "Engine",
    "Task",
    "make_prompts",
    "make_tasks",
    "run_elsewhere",
    "serve",
    "without",
]

CAUSAL = {"task_type": "CAUSAL_LM"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]

# kind -> (how peft_reference randomises it, its PEFT config)
MIX = {
    "lora_all_r16": ("lora_all", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", **CAUSAL)),
    "lora_qv_r8": ("lora_qv", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], **CAUSAL)),
    "rslora_attn_r16": (
        "lora_rslora",
        LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=ATTENTION, **CAUSAL),
    ),
    "prefix_16": ("prefix", PrefixTuningConfig(num_virtual_tokens=16, **CAUSAL)),
    "prefix_proj_10": ("prefix_proj", PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, **CAUSAL)),
    "prompt_8": ("prompt", PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="RANDOM", **CAUSAL)),
    "prompt_20": ("prompt", PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="RANDOM", **CAUSAL)),
    "ptuning_mlp_12": (
        "ptuning_mlp",
        PromptEncoderConfig(num_virtual_tokens=12, encoder_reparameterization_type="MLP", **CAUSAL),
    ),
    "ia3": ("ia3", IA3Config(**CAUSAL)),
    "dora_qv_r8": (
        "dora",
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, **CAUSAL),
    ),
    "lora_bias_mlp_r8": ("lora_bias", LoraConfig(r=8, lora_alpha=16, target_modules=MLP, lora_bias=True, **CAUSAL)),
    "adalora_qv_r12": (
        "adalora",
        AdaLoraConfig(init_r=12, target_r=8, total_step=100, lora_alpha=16, target_modules=QV, **CAUSAL),
    ),
    "loha_qv_r8": ("loha", LoHaConfig(r=8, alpha=16, target_modules=QV, **CAUSAL)),
    "lokr_qv_r8": ("lokr", LoKrConfig(r=8, alpha=16, target_modules=QV, **CAUSAL)),
    "vera_qv_r256": ("vera", VeraConfig(r=256, target_modules=QV, **CAUSAL)),
    "llama_adapter_10x8": ("llama_adapter", AdaptionPromptConfig(adapter_len=10, adapter_layers=8, **CAUSAL)),
}
# composite tasks: kind -> its parts (component, how it is randomised, scale, config), in order
COMPOSITE_MIX = {
    "mam_prefix16_ffn_r16": (
        ("prefix", "prefix", 1.0, PrefixTuningConfig(num_virtual_tokens=16, **CAUSAL)),
        ("lora", "lora_all", 1.0, LoraConfig(r=16, lora_alpha=32, target_modules=MLP, **CAUSAL)),
    ),
    "prompt8_lora_qv_ia3": (
        ("prompt", "prompt", 1.0, PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="RANDOM", **CAUSAL)),
        ("lora", "lora_qv", 0.5, LoraConfig(r=8, lora_alpha=16, target_modules=QV, **CAUSAL)),
        ("ia3", "ia3", 1.0, IA3Config(**CAUSAL)),
    ),
}

SENTENCES = [
    "Please summarise the following customer review in one short sentence.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My flight was delayed by three hours, and nobody at the gate could explain why.",
    "Translate the next paragraph into French, keeping the formal tone of the original.",
    "The old lighthouse has guided fishing boats along this rocky coast since 1871.",
    "Write a polite email declining the invitation, but suggest meeting next month instead.",
    "She planted tomatoes, basil and peppers in the small garden behind the kitchen.",
    "Explain, step by step, how a hash table resolves collisions with open addressing.",
    "Classify the sentiment of this tweet as positive, negative or neutral.",
    "Which of these three laptops offers the best battery life for the price?",
]


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str
    path: Path
    peft_type: str


# The load engine v2's targets are set on (one of each kind a team typically trains), and every kind served.
REALISTIC = (
    "lora_all_r16",
    "lora_qv_r8",
    "rslora_attn_r16",
    "prefix_16",
    "prefix_proj_10",
    "prompt_8",
    "prompt_20",
    "ptuning_mlp_12",
    "ia3",
)
MIXES = {"realistic": REALISTIC, "every": (*MIX, *COMPOSITE_MIX)}


def make_tasks(model, root: Path, n: int, kinds: tuple[str, ...] = REALISTIC, seed: int = 0, prefix: str = "t"):
    """N distinct adapters cycling through `kinds` of MIX, saved with PEFT under `root` (kept: a later run with
    the same root reuses them)."""
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        path = root / f"{prefix}{i}-{kind}-seed{seed + i}"
        if kind in COMPOSITE_MIX:  # a task.json and one PEFT folder per component
            if not (path / "task.json").is_file():
                make_composite(model, COMPOSITE_MIX[kind], path, seed=seed + i)
            tasks.append(Task(f"{prefix}{i}-{kind}", kind, path, "COMPOSITE"))
            continue
        randomise_as, config = MIX[kind]
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(model, randomise_as, path, seed=seed + i, config=config)
        peft_type = json.loads((path / "adapter_config.json").read_text())["peft_type"]
        tasks.append(Task(f"{prefix}{i}-{kind}", kind, path, peft_type))
    return tasks


def make_prompts(tokenizer, n: int, length: int, spread: float = 0.25, seed: int = 0) -> list[list[int]]:
    """N prompts of about `length` tokens (±spread) cut from running English text."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        want = max(1, round(length * rng.uniform(1 - spread, 1 + spread)))
        ids, k = [], rng.randrange(len(SENTENCES))
        while len(ids) < want:
            ids += tokenizer(" " + SENTENCES[k % len(SENTENCES)], add_special_tokens=False)["input_ids"]
            k += 1
        prompts.append(ids[:want])
    return prompts


def run_elsewhere(script: str, argv: list[str], tree: Path | None = None) -> dict:
    """Run `script --child ...` in a fresh process (against another checkout's `server` when `tree` is given) and
    return the JSON it prints last: each measurement gets a clean process (memory peaks, no warm caches)."""
    env = {**os.environ, "TASKSERVE_TREE": str(tree.resolve())} if tree else dict(os.environ)
    out = subprocess.run([sys.executable, script, *argv, "--child"], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{script} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def without(argv: list[str], option: str) -> list[str]:
    """argv without `option` and its value."""
    if option not in argv:
        return argv
    i = argv.index(option)
    return argv[:i] + argv[i + 2 :]
