"""The upload format: archives (hostile ones included), header-only PEFT inspection, templates, task ids."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters_store.format import (
    CONFIG_FILE,
    TEMPLATE_FILE,
    WEIGHTS_FILE,
    FormatError,
    InvalidTaskId,
    UploadTooLarge,
    inspect_peft,
    parse_template,
    read_upload,
    validate_task_id,
)

MB = 1 << 20
SERVED = {
    "prompt": "prompt_tuning",
    "ptuning_mlp": "p_tuning",
    "prefix": "prefix_tuning",
    "lora_qv": "lora",
    "ia3": "ia3",
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT save_pretrained directories, one per served kind (and one LoRA with every linear)."""
    from peft_reference import make_adapter, tiny_llama

    model, root = tiny_llama(), tmp_path_factory.mktemp("adapters")
    return {kind: make_adapter(model, kind, root / kind) for kind in (*SERVED, "lora_all")}


@pytest.fixture(scope="module")
def lora(adapters: dict[str, Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in adapters["lora_qv"].iterdir()}  # README.md included


def _tar_gz(*members: tuple[str, bytes] | tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(*members: tuple[str, bytes] | tuple[zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


# --- read_upload: happy paths ---------------------------------------------------------------------


def test_files_of_a_save_pretrained_dir_keep_only_what_we_serve(lora: dict[str, bytes]) -> None:
    assert "README.md" in lora
    assert read_upload(lora, max_bytes=MB) == {CONFIG_FILE: lora[CONFIG_FILE], WEIGHTS_FILE: lora[WEIGHTS_FILE]}
    in_folder = {f"my-adapter/{name}": data for name, data in lora.items()}
    assert read_upload(in_folder, max_bytes=MB) == read_upload(lora, max_bytes=MB)


@pytest.mark.parametrize("folder", ["", "my-adapter/", "./out/"])
def test_archives_in_both_formats_with_or_without_a_top_folder(lora: dict[str, bytes], folder: str) -> None:
    expected = read_upload(lora, max_bytes=MB)
    members = [(folder + name, data) for name, data in lora.items()]
    assert read_upload(archive=_tar_gz(*members), max_bytes=MB) == expected
    assert read_upload(archive=_zip(*members), max_bytes=MB) == expected
    # a single uploaded archive file goes the same way
    assert read_upload({"adapter.tgz": _tar_gz(*members)}, max_bytes=MB) == expected
    assert read_upload({"adapter.zip": _zip(*members)}, max_bytes=MB) == expected


def test_a_template_upload(lora: dict[str, bytes]) -> None:
    data = json.dumps({"instruction": "Classify."}).encode()
    assert read_upload({TEMPLATE_FILE: data, "README.md": b"x"}, max_bytes=MB) == {TEMPLATE_FILE: data}
    # beside an adapter, template.json is its prompt format: kept, and only input_prefix/input_suffix may be set
    with_format = read_upload({TEMPLATE_FILE: data, **lora}, max_bytes=MB)
    assert with_format == {TEMPLATE_FILE: data, CONFIG_FILE: lora[CONFIG_FILE], WEIGHTS_FILE: lora[WEIGHTS_FILE]}
    with pytest.raises(FormatError, match="only input_prefix and input_suffix"):
        inspect_peft(with_format)
    suffix = json.dumps({"input_suffix": "\n"}).encode()
    assert inspect_peft({**lora, TEMPLATE_FILE: suffix}).kind == "lora"


# --- read_upload: refusals ---------------------------------------------------------------------------


def test_pickle_weights_are_refused_with_a_way_out(lora: dict[str, bytes]) -> None:
    with pytest.raises(FormatError, match=r"pickle weights are never loaded.*safe_serialization=True"):
        read_upload({CONFIG_FILE: lora[CONFIG_FILE], "adapter_model.bin": b"\x80\x04..."}, max_bytes=MB)
    with pytest.raises(FormatError, match="pickle"):
        read_upload(archive=_tar_gz((CONFIG_FILE, lora[CONFIG_FILE]), ("adapter_model.bin", b"x")), max_bytes=MB)
    # beside safetensors the pickle is simply never read
    both = {**lora, "adapter_model.bin": b"\x80\x04"}
    assert "adapter_model.bin" not in read_upload(both, max_bytes=MB)


def test_missing_files_and_ambiguous_uploads(lora: dict[str, bytes]) -> None:
    with pytest.raises(FormatError, match=f"lacks {WEIGHTS_FILE}"):
        read_upload({CONFIG_FILE: lora[CONFIG_FILE]}, max_bytes=MB)
    with pytest.raises(FormatError, match=f"lacks {CONFIG_FILE}"):
        read_upload({WEIGHTS_FILE: lora[WEIGHTS_FILE]}, max_bytes=MB)
    with pytest.raises(FormatError, match="no adapter_config.json"):
        read_upload({"README.md": b"hi"}, max_bytes=MB)
    two = [(f"{d}/{n}", lora[n]) for d in ("a", "b") for n in (CONFIG_FILE, WEIGHTS_FILE)]
    with pytest.raises(FormatError, match="more than one candidate directory"):
        read_upload(archive=_tar_gz(*two), max_bytes=MB)
    with pytest.raises(FormatError, match="twice"):
        read_upload(archive=_tar_gz(*[(n, d) for n, d in lora.items()], (CONFIG_FILE, b"{}")), max_bytes=MB)
    for files, archive in ((None, None), (lora, b"x")):
        with pytest.raises(FormatError, match="either"):
            read_upload(files, archive, max_bytes=MB)


@pytest.mark.parametrize(
    "member, message",
    [
        (("/etc/adapter_config.json", b"{}"), "absolute path"),
        (("../adapter_config.json", b"{}"), r"outside the archive"),
        (("a/../../adapter_config.json", b"{}"), r"outside the archive"),
        (("C:\\x\\adapter_config.json", b"{}"), "absolute path"),
        (_special("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink"),
        (_special("adapter_model.safetensors", tarfile.LNKTYPE, "adapter_config.json"), "is a hard link"),
        (_special("adapter_model.safetensors", tarfile.CHRTYPE), "not a regular file"),
        (_special("fifo", tarfile.FIFOTYPE), "not a regular file"),
    ],
)
def test_hostile_tar_members_are_refused(lora: dict[str, bytes], member, message: str) -> None:
    archive = _tar_gz((CONFIG_FILE, lora[CONFIG_FILE]), member)
    with pytest.raises(FormatError, match=message):
        read_upload(archive=archive, max_bytes=MB)


@pytest.mark.parametrize(
    "name, message", [("/abs/adapter_config.json", "absolute path"), ("x/../../adapter_config.json", "outside")]
)
def test_hostile_zip_paths_are_refused(name: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_upload(archive=_zip((name, b"{}")), max_bytes=MB)


def test_zip_symlinks_are_refused(lora: dict[str, bytes]) -> None:
    link = zipfile.ZipInfo(WEIGHTS_FILE)
    link.create_system = 3
    link.external_attr = (0o120777) << 16  # S_IFLNK
    with pytest.raises(FormatError, match="is a symlink"):
        read_upload(archive=_zip((CONFIG_FILE, lora[CONFIG_FILE]), (link, b"/etc/passwd")), max_bytes=MB)


def test_a_zip_whose_declared_size_lies_is_refused(lora: dict[str, bytes]) -> None:
    bomb = b"\0" * (4 * MB)
    archive = bytearray(_zip((CONFIG_FILE, lora[CONFIG_FILE]), (WEIGHTS_FILE, bomb)))
    assert len(archive) < MB
    # rewrite the uncompressed size in the weights' local header and central directory entry: 4 MiB -> 100
    patched = 0
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (at := archive.find(signature, start)) >= 0:
            start = at + 4
            if struct.unpack_from("<I", archive, at + size_at)[0] == len(bomb):
                struct.pack_into("<I", archive, at + size_at, 100)
                patched += 1
    assert patched == 2
    assert zipfile.ZipFile(io.BytesIO(bytes(archive))).getinfo(WEIGHTS_FILE).file_size == 100
    with pytest.raises(FormatError):
        read_upload(archive=bytes(archive), max_bytes=MB)


def test_oversize_uploads_are_refused(lora: dict[str, bytes]) -> None:
    big = b"\0" * (2 * MB)  # compresses to a few KiB: only the uncompressed size can tell
    with pytest.raises(UploadTooLarge):
        read_upload({**lora, WEIGHTS_FILE: big}, max_bytes=MB)
    with pytest.raises(UploadTooLarge, match="more than the limit"):
        read_upload({"a": b"\0" * (MB // 2 + 1), "b": b"\0" * (MB // 2)}, max_bytes=MB)
    with pytest.raises(UploadTooLarge):
        read_upload(archive=_tar_gz((CONFIG_FILE, b"{}"), (WEIGHTS_FILE, big)), max_bytes=MB)
    with pytest.raises(UploadTooLarge):  # a member we would skip still counts
        read_upload(archive=_tar_gz(*lora.items(), ("README.md", big)), max_bytes=MB)
    with pytest.raises(UploadTooLarge):
        read_upload(archive=_zip((CONFIG_FILE, b"{}"), ("README.md", big)), max_bytes=MB)
    with pytest.raises(UploadTooLarge):
        read_upload(archive=_zip((CONFIG_FILE, b"{}"), (WEIGHTS_FILE, b"x")), max_bytes=10)


def test_what_is_not_a_tar_gz_or_zip_is_refused(lora: dict[str, bytes]) -> None:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w:bz2") as tar:
        info = tarfile.TarInfo(CONFIG_FILE)
        tar.addfile(info, io.BytesIO(b""))
    for archive in (b"hello", lora[WEIGHTS_FILE], plain.getvalue()):
        with pytest.raises(FormatError, match="neither a .tar.gz/.tgz nor a .zip"):
            read_upload(archive=archive, max_bytes=MB)
    with pytest.raises(FormatError, match="cannot be read"):
        read_upload(archive=b"\x1f\x8b" + b"garbage" * 10, max_bytes=MB)
    with pytest.raises(FormatError, match="cannot be read"):
        read_upload(archive=_tar_gz(*lora.items())[:200], max_bytes=MB)
    with pytest.raises(FormatError, match="cannot be read"):
        read_upload(archive=b"PK\x03\x04" + b"\0" * 100, max_bytes=MB)


# --- inspect_peft ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*SERVED, "lora_all"])
def test_header_only_inspection_counts_the_real_parameters(adapters: dict[str, Path], kind: str) -> None:
    from safetensors.torch import load_file

    files = read_upload({p.name: p.read_bytes() for p in adapters[kind].iterdir()}, max_bytes=64 * MB)
    summary = inspect_peft(files)
    tensors = load_file(adapters[kind] / WEIGHTS_FILE)
    assert summary.kind == SERVED.get(kind, "lora")
    assert summary.parameters == sum(t.numel() for t in tensors.values()) > 0
    assert summary.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert summary.config["peft_type"] == summary.peft_type


def _st(header: dict, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _peft(weights: bytes, config: bytes = b'{"peft_type": "LORA"}') -> dict[str, bytes]:
    return {CONFIG_FILE: config, WEIGHTS_FILE: weights}


def test_a_hand_made_header_is_counted_without_reading_data() -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]},
        "empty": {"dtype": "F16", "shape": [0, 5], "data_offsets": [28, 28]},
    }
    summary = inspect_peft(_peft(_st(header, b"\xff" * 28)))  # the data need not be valid numbers here
    assert (summary.kind, summary.parameters, summary.bytes) == ("lora", 10, 28)


@pytest.mark.parametrize(
    "weights, message",
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**6) + b"{}", "does not fit the file"),
        (_st({}, raw_header=b"{not json"), "not valid JSON"),
        (_st({}, raw_header=b"[1, 2]"), "must be a JSON object"),
        (_st({}), "holds no tensors"),
        (_st({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'I64'"),
        (_st({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "outside the data"),
        (_st({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "does not match"),
        (_st({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
        (_st({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "file holds 8"),
        (
            _st(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
    ],
)
def test_bad_safetensors_headers_are_refused(weights: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        inspect_peft(_peft(weights))


@pytest.mark.parametrize(
    "config, message",
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object with a string peft_type"),
        (b'{"r": 4}', "string peft_type"),
        (b'{"peft_type": "BOFT"}', r"'BOFT' is not served; served types: PROMPT_TUNING, P_TUNING, PREFIX_TUNING, LORA"),
    ],
)
def test_bad_configs_are_refused(config: bytes, message: str) -> None:
    weights = _st({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(FormatError, match=message):
        inspect_peft(_peft(weights, config))
    with pytest.raises(FormatError, match="lacks"):
        inspect_peft({CONFIG_FILE: config})


# --- task ids ----------------------------------------------------------------------------------------


def test_validate_task_id() -> None:
    for good in ("a", "sentiment-v2", "A.b_c-9", "x" * 128, "team-a/sentiment", "t9/A.b"):
        assert validate_task_id(good) == good
    for bad in ("", ".hidden", "a b", "a/b/c", "Team/b", "a/.b", "x" * 129, None):
        with pytest.raises(InvalidTaskId, match=r"\[A-Za-z0-9\]"):
            validate_task_id(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskId, match="reserved"):
        validate_task_id("base")
    assert issubclass(InvalidTaskId, ValueError)


# --- templates ---------------------------------------------------------------------------------------


def _template(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_plain_template_renders_a_fixed_lead_and_the_input() -> None:
    template = parse_template(
        _template(
            system="You are terse.",
            instruction="Label the sentiment.",
            examples=[{"input": "great", "output": "positive"}, {"input": "awful", "output": "negative"}],
            input_prefix="Review: ",
            input_suffix="\nLabel: ",
        )
    )
    lead, rest = template.render("fine")
    assert lead == (
        "You are terse.\n\nLabel the sentiment.\n\nReview: great\nLabel: positive\n\nReview: awful\nLabel: negative\n\n"
    )
    assert rest == "Review: fine\nLabel: "
    assert template.render("other")[0] == lead  # the lead never depends on the input: its KV is cached once
    assert parse_template(_template(instruction="Do it.")).render("x") == ("Do it.\n\n", "x")
    assert parse_template(b"{}").render("x") == ("", "x")
    with pytest.raises(ValueError, match="render_messages"):
        parse_template(_template(chat=True)).render("x")


def test_chat_template_renders_messages() -> None:
    template = parse_template(
        _template(
            system="Be brief.", instruction="Translate.", examples=[{"input": "hi", "output": "salut"}], chat=True
        )
    )
    assert template.render_messages("bye") == [
        {"role": "system", "content": "Be brief.\n\nTranslate."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "salut"},
        {"role": "user", "content": "bye"},
    ]
    assert parse_template(_template(chat=True)).render_messages("x") == [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="render"):
        parse_template(b"{}").render_messages("x")


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"not json", FormatError, "template.json is invalid"),
        (_template(examples=[{"input": "a"}]), FormatError, "examples.0.output"),
        (_template(instruction=3), FormatError, "instruction"),
        (_template(unknown="x"), FormatError, "unknown"),
        (_template(examples=[{"input": "a", "output": "b"}] * 65), FormatError, "at most 64"),
        (_template(instruction="x" * (64 << 10)), UploadTooLarge, "limited to 65536"),
    ],
)
def test_bad_templates_are_refused(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_template(data)


# --- composite tasks -------------------------------------------------------------------------------------------


def _composite(adapters: dict[str, Path], manifest: object, folders: dict[str, str]) -> dict[str, bytes]:
    """task.json and, per folder name, the files of one of `adapters` under `<folder>/` (README.md included)."""
    files = {"mix/task.json": json.dumps(manifest).encode()}
    for folder, kind in folders.items():
        files |= {f"mix/{folder}/{p.name}": p.read_bytes() for p in adapters[kind].iterdir()}
    return files


def test_a_composite_upload_is_stored_flat_and_reads_back_the_same(adapters):
    from adapters_store.composite import component_files, inspect_composite

    files = _composite(
        adapters, {"components": ["prefix", {"name": "lora", "scale": 0.5}]}, {"prefix": "prefix", "lora": "lora_qv"}
    )
    flat = read_upload(files, max_bytes=MB)
    assert sorted(flat) == [
        "lora.adapter_config.json",
        "lora.adapter_model.safetensors",
        "prefix.adapter_config.json",
        "prefix.adapter_model.safetensors",
        "task.json",
    ]
    assert read_upload(flat, max_bytes=MB) == flat  # the stored form is an upload too
    assert read_upload(archive=_tar_gz(*files.items()), max_bytes=MB) == flat
    components, summary = inspect_composite(flat)
    assert [(c.name, c.kind, c.scale) for c in components] == [("prefix", "prefix_tuning", 1.0), ("lora", "lora", 0.5)]
    assert summary.kind == "composite:prefix=prefix_tuning,lora=lora*0.5"
    assert summary.parameters == sum(inspect_peft(component_files(flat, n)).parameters for n in ("prefix", "lora"))


@pytest.mark.parametrize(
    ("manifest", "folders", "fragment"),
    [
        (
            {"components": ["prefix", "lora"]},
            {"prefix": "prefix"},
            "component 'lora': the upload lacks lora/adapter_config.json",
        ),
        ({"components": ["prefix"]}, {"prefix": "prefix", "lora": "lora_qv"}, "names no component 'lora'"),
        ({"components": []}, {}, "1 to 8"),
        ({"components": ["a.b"]}, {}, "component name 'a.b'"),
        ({"components": [{"name": "lora", "scale": "x"}]}, {"lora": "lora_qv"}, "scale must be a number"),
        ({"parts": ["lora"]}, {"lora": "lora_qv"}, '{"components": [...]}'),
    ],
)
def test_a_malformed_composite_is_refused_naming_what_is_wrong(adapters, manifest, folders, fragment):
    with pytest.raises(FormatError) as refused:
        read_upload(_composite(adapters, manifest, folders), max_bytes=MB)
    assert fragment in str(refused.value)


def test_a_composite_component_is_checked_like_a_single_upload(adapters):
    from adapters_store.composite import inspect_composite

    files = read_upload(
        _composite(adapters, {"components": ["prompt", "prefix"]}, {"prompt": "prompt", "prefix": "prefix"}),
        max_bytes=MB,
    )
    with pytest.raises(FormatError, match="at most one"):
        inspect_composite(files)
    broken = {**read_upload(_composite(adapters, {"components": ["lora"]}, {"lora": "lora_qv"}), max_bytes=MB)}
    broken["lora.adapter_config.json"] = b'{"peft_type": "OFT"}'
    with pytest.raises(FormatError, match="component 'lora': peft_type 'OFT' is not served"):
        inspect_composite(broken)


def test_the_store_and_its_kinds_table_never_import_torch_or_the_server() -> None:
    """The clients read the same table of kinds and the same checks as the server, without torch."""
    import subprocess
    import sys

    code = (
        "import sys, adapters_store.format, adapters_store.kinds, adapters_store.buckets, adapters_store.redis\n"
        "print(sorted(m for m in ('torch', 'server') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
