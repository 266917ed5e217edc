"""`taskserve train`: every method yields a directory the upload format accepts (on a tiny llama, seconds), the data
is tokenised as the server will see it, and one end-to-end run on the default model changes what the server says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from client_helpers import assert_error
from peft_reference import peft_greedy
from serving import serve
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adapters_store.format import inspect_peft, parse_prompt_format, read_upload
from clients import Client
from clients.cli_train import METHOD_NAMES
from clients.train import METHODS, TrainOptions, greedy_continuation, train
from clients.train_data import IGNORE, PROMPT_FORMAT, DataError, Record, encode, init_words, read_records
from server.config import EngineSettings
from server.engine.adapters import LoadedAdapter
from server.engine.adapters.template import render_ids
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
E2E_INPUT = "name[The Eagle] eatType[coffee shop] food[Chinese] area[riverside]"
# PEFT's and transformers' own deprecation notices, about calls PEFT makes
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KINDS = {"prefix": "prefix_tuning", "prompt": "prompt_tuning", "p-tuning": "p_tuning", "lora": "lora", "ia3": "ia3"}


@pytest.fixture(scope="module")
def tiny_model(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer llama (hidden 64, GQA) with the default model's tokenizer, so training takes seconds."""
    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example tasks, made by the quick start's script."""
    out = tmp_path_factory.mktemp("examples")
    script = REPO / "clients" / "examples" / "make_data.py"
    made = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--train", "40", "--eval", "8"], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    return out


def test_make_data_is_seeded_and_well_formed(examples: Path, tmp_path: Path):
    script = REPO / "clients" / "examples" / "make_data.py"
    again = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--train", "40", "--eval", "8"])
    assert again.returncode == 0
    for name in ("e2e/train.jsonl", "e2e/eval.jsonl", "sentiment/train.jsonl", "capitals.json"):
        assert (tmp_path / name).read_bytes() == (examples / name).read_bytes(), name
    e2e = read_records(examples / "e2e" / "train.jsonl")
    assert len(e2e) == 40 and all(r.input.startswith("name[") and r.output.endswith(".") for r in e2e)
    assert {r.output for r in read_records(examples / "sentiment" / "train.jsonl")} == {"positive", "negative"}
    assert json.loads((examples / "capitals.json").read_text())["template"]["examples"]


def test_methods_match_the_cli():
    assert tuple(METHODS) == METHOD_NAMES


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if "+" not in m])
def test_each_method_saves_a_servable_adapter(method: str, tiny_model: Path, examples: Path, tmp_path: Path):
    data = examples / ("sentiment" if method in ("lora", "ia3") else "e2e") / "train.jsonl"
    options = TrainOptions(method=method, data=data, out=tmp_path / "out", model=tiny_model, steps=2, batch_size=4)
    trained = train(options)
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    summary = inspect_peft(read_upload(files, max_bytes=1 << 30))  # what the server checks first
    assert summary.kind == KINDS[method] == trained.upload.kind
    assert json.loads(files["template.json"]) == {"input_suffix": "\n"}  # the prompt format, uploaded with it
    assert trained.steps == 2 and trained.train_loss > 0
    config = summary.config
    if method == "prefix":
        # the MLP reparametrisation trains, but PEFT saves only its output: 10 tokens x 2 layers x K,V x 2 heads x 16
        assert config["prefix_projection"] is True and summary.parameters == 10 * 2 * 2 * 32
    if method == "prompt":
        assert config["prompt_tuning_init"] == "TEXT" and config["num_virtual_tokens"] == 20
        assert "positive" not in config["prompt_tuning_init_text"] and "price" in config["prompt_tuning_init_text"]
    if method == "lora":
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])


def test_prefix_plus_lora_trains_two_stages_into_a_composite_the_server_serves_exactly(
    tiny_model: Path, examples: Path, tmp_path: Path
):
    """LoRA on the FFN, then the prefix on the LoRA-merged model; served like PEFT's prefix on that merged model."""
    out = tmp_path / "mam"
    data = examples / "e2e" / "train.jsonl"
    options = TrainOptions(method="prefix+lora", data=data, out=out, model=tiny_model, steps=2, batch_size=4)
    steps: list[int] = []
    trained = train(options, on_step=lambda step, total, loss: steps.append((step, total)))
    assert trained.upload.kind == "composite" and trained.steps == 4 and steps[-1] == (4, 4)
    assert json.loads((out / "task.json").read_text()) == {"components": ["prefix", "lora"]}
    lora = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert sorted(lora["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert json.loads((out / "prefix" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    # what the CLI uploads, served by an in-process engine, against PEFT's prefix on the LoRA-merged model
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    engine = Engine(Backbone(copy.deepcopy(model), None, name="tiny"), EngineSettings())
    served = serve(engine.residency, "mam", trained.upload.files)
    assert (
        served.prefix_len == 10
        and served.slots is not None
        and set(served.slots.lora) == {f"model.layers.{{}}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for text in (E2E_INPUT, "name[Blue Spice] food[French]"):
        ids = tokenizer.encode(text + "\n")
        row = engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=8), "mam"), lambda d: None)
        engine.run_until_idle()
        assert row.output_ids == peft_greedy(model, out, ids, 8)


def test_the_same_seed_trains_the_same_adapter(tiny_model: Path, examples: Path, tmp_path: Path):
    """Same seed, data, machine and thread count: bit-identical weights and losses (docs/quickstart.md, what varies)."""
    data = examples / "e2e" / "train.jsonl"

    def run(seed: int, name: str) -> tuple[float, bytes]:
        options = TrainOptions(method="prefix", data=data, out=tmp_path / name, model=tiny_model, steps=2, seed=seed)
        trained = train(options)
        return trained.train_loss, (tmp_path / name / "adapter_model.safetensors").read_bytes()

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert first == again and first[1] != other[1]


def test_plain_records_are_cut_where_the_server_cuts_prompts(default_model_dir: Path):
    """The prompt is what the server feeds the model for this input, in the saved format; no separator is learned."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    example = encode(Record(input=E2E_INPUT, output="The Eagle is a coffee shop."), tokenizer, eos_id=2, max_length=512)
    served = LoadedAdapter(key="t@1", kind="lora", template=parse_prompt_format(json.dumps(PROMPT_FORMAT).encode()))
    prompt_ids = list(render_ids(served, E2E_INPUT, tokenizer))  # exactly what the server feeds the model
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    answer = example.labels[len(prompt_ids) :]
    assert answer[-1] == 2 and tokenizer.decode(answer) == "The Eagle is a coffee shop.<|im_end|>"
    assert encode(Record(input="x " * 50, output="y"), tokenizer, eos_id=2, max_length=10) is None  # nothing to learn


def test_a_data_file_is_one_shape(tmp_path: Path):
    mixed = tmp_path / "mixed.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    mixed.write_text(json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps(chat) + "\n")
    with pytest.raises(DataError, match="mixes"):
        read_records(mixed)


def test_chat_records_learn_only_the_assistant_turns(default_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    messages = (
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome"},
    )
    example = encode(Record(messages=messages), tokenizer, eos_id=2, max_length=512)
    learned = [token for token in example.labels if token != IGNORE]
    assert tokenizer.decode(learned) == "Paris<|im_end|>Rome<|im_end|>"
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_init_words_come_from_the_outputs():
    records = [Record(input="a", output="The Eagle is a coffee shop."), Record(input="b", output="A coffee shop.")]
    assert init_words(records).split()[:2] == ["coffee", "shop"]


def test_cli_trains_chat_data_without_a_server(cli, tiny_model: Path, tmp_path: Path):
    data = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    data.write_text("\n".join(json.dumps(record) for _ in range(4)) + "\n")
    args = ["train", "--method", "prompt", "--data", str(data), "--eval", str(data), "--task", "cli-chat"]
    args += ["--model", str(tiny_model), "--steps", "2", "--out", str(tmp_path / "out"), "--no-upload", "--json"]
    result = cli(*args, "--samples", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["kind"], summary["steps"], summary["version"]) == ("prompt_tuning", 2, None)
    assert summary["eval_loss_before"] > 0 and summary["eval_loss_after"] > 0
    assert len(summary["samples"]) == 1 and "tuned" in summary["samples"][0]  # a cache-free local sample
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "template.json").exists()  # chat is rendered by the chat template, no format


def test_cli_train_errors(cli, tiny_model: Path, tmp_path: Path, closed_url: str):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a", "output": "b"}\n{"input": "a", \n')
    base = ["train", "--method", "lora", "--task", "cli-bad", "--model", str(tiny_model), "--no-upload"]
    assert_error(cli(*base, "--data", str(broken)), 1, f"{broken}:2", "not valid JSON")
    assert_error(cli(*base, "--data", str(tmp_path / "missing.jsonl")), 1, "cannot read")
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"input": "a", "output": "b"}\n')
    not_a_model = ["train", "--method", "lora", "--task", "cli-bad", "--model", str(tmp_path), "--no-upload"]
    assert_error(cli(*not_a_model, "--data", str(fine)), 1, "no config.json")
    nowhere = ["train", "--method", "lora", "--task", "cli-bad", "--data", str(fine), "--upload", closed_url]
    assert_error(cli(*nowhere), 1, "cannot reach")  # before any training


def test_prefix_end_to_end_on_the_default_model(cli, live, client: Client, examples: Path, default_model_dir: Path):
    """Train prefix for 3 steps on the example data, upload it, and see the server answer differently."""
    data = examples / "e2e" / "train.jsonl"
    out = examples / "out-e2e"
    args = ["train", "--method", "prefix", "--data", str(data), "--task", "cli-e2e", "--steps", "3"]
    result = cli(*args, "--batch-size", "2", "--out", str(out), "--samples", "1", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["kind"], summary["version"]) == ("prefix_tuning", 1)
    sample = summary["samples"][0]
    assert sample["tuned"] != sample["base"]

    served = client.generate("cli-e2e", E2E_INPUT, max_new_tokens=12)
    assert served.version == 1
    assert served.token_ids != client.generate("base", E2E_INPUT, max_new_tokens=12).token_ids

    # the trainer's cache-free greedy loop over PEFT's forward gives what the server serves
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir), out).eval()
    local = greedy_continuation(model, tokenizer, Record(input=E2E_INPUT, output="-"), max_new_tokens=12)
    assert local == tokenizer.decode([t for t in served.token_ids if t != 2], skip_special_tokens=True)
