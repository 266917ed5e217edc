"""The console in a real browser: Debian's chromium driven by Playwright, against one live server on the default model.

Each test opens a fresh browser context (a new browser session: no key kept) and fails on any script error or
Content-Security-Policy violation in the page. With TASKSERVE_SCREENSHOTS=1 the tests also write the screenshots
that docs/console.md shows (docs/console/*.png).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import chromium, console_page, sign_in
from live_server import REPO, LiveServer, bearer
from peft_reference import make_adapter
from playwright.sync_api import Browser, Page, expect
from transformers import AutoModelForCausalLM

from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

ADMIN, INFERENCE = "console-admin-key", "console-inference-key"
SHOTS = REPO / "docs" / "console"
XSS_INSTRUCTION = '<img src=x onerror="window.__pwned=1">Answer in one word.'
XSS_DESCRIPTION = "<script>window.__pwned=2</script><b>bold?</b>"
A_DURATION = re.compile(r"^\d+(\.\d+)? (ms|s)$")
A_NUMBER = re.compile(r"^\d+(\.\d+)?$")
A_POSITIVE_NUMBER = re.compile(r"^(?!0(\.0*)?$)\d+(\.\d+)?$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(
        tmp_path_factory.mktemp("console") / "server.log",
        "--max-batch-size",
        "8",
        env={"TASKSERVE_API_KEYS": INFERENCE, "TASKSERVE_ADMIN_KEYS": ADMIN},
    )
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=bearer(ADMIN), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prompt-tuning adapter for the default model, as PEFT's save_pretrained writes it (README.md included)."""
    model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL)
    return make_adapter(model, "prompt", tmp_path_factory.mktemp("adapter") / "my-adapter", seed=5)


@pytest.fixture
def page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    with console_page(browser, server.url) as page:
        yield page


def screenshot(page: Page, name: str) -> None:
    """docs/console/NAME.png, only when asked: CI leaves the tree clean."""
    if os.environ.get("TASKSERVE_SCREENSHOTS") == "1":
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"))


def upload_template(admin: httpx.Client, task_id: str, **template) -> None:
    body = {"template": {"instruction": "Answer with the capital city only.", **template}}
    assert admin.post(f"/v1/tasks/{task_id}/versions", json=body).status_code == 201


def test_the_key_is_asked_once_per_browser_session(page: Page, browser: Browser, server: LiveServer):
    page.goto("/")
    expect(page).to_have_url(f"{server.url}/console/")
    screenshot(page, "login")
    page.fill("#api-key", "not-a-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#login [role=alert]")).to_have_text("This key is not accepted.")
    page.fill("#api-key", ADMIN)
    page.click("#login button[type=submit]")
    expect(page.locator("#who")).to_contain_text("admin key")
    page.reload()
    expect(page.locator("#nav a[data-page=upload]")).to_be_visible()  # same session: not asked again
    assert page.evaluate("localStorage.length") == 0  # the key is in sessionStorage only
    with console_page(browser, server.url) as other:
        other.goto("/console/")
        expect(other.locator("#login")).to_be_visible()  # another browser session asks again
    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_an_inference_key_gets_the_task_list_and_playground_only(page: Page, admin: httpx.Client):
    upload_template(admin, "read-only-view")
    admin.post("/v1/tasks/read-only-view/versions", json={"template": {"instruction": "Be brief."}})
    sign_in(page, INFERENCE, "#/tasks/read-only-view")
    expect(page.locator("#versions tbody tr")).to_have_count(2)
    expect(page.locator("#nav a[data-page=upload]")).to_be_hidden()
    expect(page.locator("#nav a[data-page=playground]")).to_be_visible()
    expect(page.locator("#delete-task")).to_have_count(0)
    expect(page.locator("button.rollback")).to_have_count(0)
    page.goto("/console/#/upload")
    expect(page.locator("#forbidden")).to_contain_text("needs an admin key")


def test_upload_by_drop_then_listed_then_new_version_then_rollback(page: Page, admin: httpx.Client, adapter_dir: Path):
    sign_in(page, ADMIN, "#/upload")
    page.fill("#task-id", "greeter")
    page.fill("#description", "first try")
    drop(page, "#dropzone", {p.name: p.read_bytes() for p in adapter_dir.iterdir()})
    expect(page.locator(".file-row")).to_have_count(3)  # README.md too: the server picks what it needs
    screenshot(page, "upload")
    page.click("#upload-submit")
    expect(page.locator("#current-version")).to_have_text("v1")
    expect(page.locator("#task-title")).to_contain_text("prompt_tuning")
    expect(page.locator("#config")).to_contain_text('"peft_type": "PROMPT_TUNING"')

    page.goto("/console/#/tasks")
    row = page.locator("#task-table tr[data-task=greeter]")
    expect(row).to_contain_text("prompt_tuning")
    expect(row).to_contain_text("v1")

    page.goto("/console/#/upload?task=greeter")  # the same files again: the server stores nothing, and says so
    page.set_input_files("#folder-input", str(adapter_dir))
    page.click("#upload-submit")
    expect(page.locator(".toast")).to_contain_text("Identical to greeter v1, the current version: nothing stored")
    expect(page.locator("#current-version")).to_have_text("v1")

    page.goto("/console/#/upload?task=greeter")  # a whole folder, through the folder picker, described anew
    page.fill("#description", "second try")
    page.set_input_files("#folder-input", str(adapter_dir))
    expect(page.locator(".file-row")).to_have_count(3)
    page.click("#upload-submit")
    expect(page.locator("#current-version")).to_have_text("v2")

    page.click("tr[data-version='1'] button.rollback")
    expect(page.locator("dialog")).to_contain_text("Make version 1 of greeter current?")
    screenshot(page, "rollback")
    page.click("dialog button[type=submit]")
    expect(page.locator("#current-version")).to_have_text("v1")
    assert admin.get("/v1/tasks/greeter").json()["version"] == 1
    screenshot(page, "task")


def drop(page: Page, target: str, files: dict[str, bytes]) -> None:
    """Drag-and-drop of files, as the browser delivers it: a drop event carrying a DataTransfer."""
    encoded = [[name, base64.b64encode(data).decode()] for name, data in files.items()]
    page.evaluate(
        """([target, files]) => {
            const transfer = new DataTransfer();
            for (const [name, b64] of files) {
                transfer.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
            }
            const zone = document.querySelector(target);
            zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: transfer, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [target, encoded],
    )


def test_a_bad_upload_shows_the_servers_message_next_to_the_field(page: Page, admin: httpx.Client, adapter_dir: Path):
    sign_in(page, ADMIN, "#/upload")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    files = {
        "adapter_config.json": json.dumps({**config, "num_virtual_tokens": 0}).encode(),
        "adapter_model.safetensors": (adapter_dir / "adapter_model.safetensors").read_bytes(),
    }
    page.fill("#task-id", "refused")
    drop(page, "#dropzone", files)
    page.click("#upload-submit")
    error = page.locator(".file-row[data-file='adapter_config.json'] .field-error")
    expect(error).to_contain_text("num_virtual_tokens")
    screenshot(page, "upload-error")
    assert admin.get("/v1/tasks/refused").status_code == 404  # nothing was stored

    page.fill("#task-id", "not a valid id!")
    page.click("#upload-submit")
    expect(page.locator("[data-error-for=task_id]")).to_contain_text("invalid task id")

    page.fill("#task-id", "too-many-examples")
    page.click("#tab-template")
    page.evaluate(  # one example more than a template may hold
        """() => {
            for (let i = 0; i < 65; i++) document.querySelector('#add-example').click();
            for (const box of document.querySelectorAll('#t-examples textarea')) box.value = 'x';
        }"""
    )
    page.click("#upload-submit")
    expect(page.locator("#template-panel [data-error-for=examples]")).to_contain_text("at most 64")
    assert admin.get("/v1/tasks/too-many-examples").status_code == 404


def test_upload_progress_for_a_large_file(page: Page):
    sign_in(page, ADMIN, "#/upload")
    page.evaluate(  # every text the progress line shows
        """() => {
            const status = document.querySelector('#upload-status');
            window.__statuses = [];
            new MutationObserver(() => window.__statuses.push(status.textContent))
                .observe(status, { childList: true, characterData: true, subtree: true });
        }"""
    )
    cdp = page.context.new_cdp_session(page)  # a slow link: 4 MB at 4 MB/s
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 4_000_000},
    )
    page.fill("#task-id", "big-archive")
    junk = {"name": "big.zip", "mimeType": "application/zip", "buffer": b"x" * 4_000_000}
    page.set_input_files("#file-input", files=[junk])
    page.click("#upload-submit")
    expect(page.locator(".file-row[data-file='big.zip'] .field-error")).to_contain_text("neither a .tar.gz/.tgz nor")
    statuses = page.evaluate("window.__statuses")
    partial = [s for s in statuses if "%)" in s and "(100%)" not in s]
    assert partial, statuses  # e.g. "Uploading 3.1 MiB of 7.6 MiB (40%)"


def test_template_text_and_description_are_rendered_inert(page: Page, admin: httpx.Client):
    sign_in(page, ADMIN, "#/upload")
    page.fill("#task-id", "xss-probe")
    page.fill("#description", XSS_DESCRIPTION)
    page.click("#tab-template")
    page.fill("#t-instruction", XSS_INSTRUCTION)
    page.click("#add-example")
    page.fill("#t-examples .example >> nth=0 >> [data-role=input]", "France")
    page.fill("#t-examples .example >> nth=0 >> [data-role=output]", '"><svg onload="window.__pwned=3">')
    page.fill("#t-input-prefix", "Country: ")
    page.click("#upload-submit")
    expect(page.locator("#task-description")).to_have_text(XSS_DESCRIPTION)  # the markup, as text
    expect(page.locator("#config")).to_contain_text('<img src=x onerror=\\"window.__pwned=1\\">')
    screenshot(page, "escaped")
    page.goto("/console/#/tasks?q=xss")
    expect(page.locator("#task-table tr[data-task=xss-probe]")).to_contain_text("<script>window.__pwned=2</script>")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#view img, #view script, #view b, #view svg").count() == 0
    assert admin.get("/v1/tasks/xss-probe").json()["versions"][0]["description"] == XSS_DESCRIPTION


def test_playground_streams_a_task_against_base(page: Page, admin: httpx.Client):
    upload_template(admin, "capitals", examples=[{"input": "Germany", "output": "Berlin"}], input_suffix="\nCapital:")
    sign_in(page, INFERENCE, "#/playground?a=capitals&b=base")
    page.fill("#prompt", "Country: France")
    page.fill("#s-max-new-tokens", "24")
    page.click("#run")
    # text appears while the generation is still streaming (the cursor class goes when it ends), on both sides
    for side in ("a", "b"):
        expect(page.locator(f"#output-{side} .completion.streaming")).to_have_text(re.compile(r"\S"))
    for side, served in (("a", "v1"), ("b", "base")):
        expect(page.locator(f"#stats-{side} .finish")).to_contain_text(served)
        expect(page.locator(f"#stats-{side} [data-stat=ttft] strong")).to_have_text(A_DURATION)
        expect(page.locator(f"#stats-{side} [data-stat=tps] strong")).to_have_text(A_NUMBER)
    texts = [page.locator(f"#output-{side} .completion").text_content() for side in ("a", "b")]
    assert all(texts) and texts[0] != texts[1]  # the template changes what the model says
    screenshot(page, "playground")


def test_two_versions_of_a_task_compared_side_by_side_from_its_page(page: Page, admin: httpx.Client):
    upload_template(admin, "two-versions", input_prefix="Country: ", input_suffix="\nCapital:")
    upload_template(admin, "two-versions", input_prefix="Write a long essay about ", input_suffix=".\n")
    sign_in(page, INFERENCE, "#/tasks/two-versions")
    page.click("tr[data-version='1'] a.compare")  # an inference key may compare: it changes nothing
    expect(page.locator("#version-a")).to_have_value("1")
    expect(page.locator("#version-b")).to_have_value("")
    expect(page.locator("#version-b option").first).to_have_text("current (v2)")
    page.fill("#prompt", "France")
    page.fill("#s-max-new-tokens", "12")
    page.click("#run")
    for side, served in (("a", "v1"), ("b", "v2")):
        expect(page.locator(f"#stats-{side} .finish")).to_contain_text(served)
    texts = [page.locator(f"#output-{side} .completion").text_content() for side in ("a", "b")]
    assert all(texts) and texts[0] != texts[1]
    assert admin.get("/v1/tasks/two-versions").json()["version"] == 2
    screenshot(page, "compare-versions")


def test_live_view_charts_move_with_traffic(page: Page, server: LiveServer):
    sign_in(page, INFERENCE, "#/live")
    page.select_option("#refresh", "1")
    load = threading.Thread(target=_traffic, args=(server.url,))
    load.start()
    try:
        expect(page.locator("#chart-throughput [data-series=generated]")).to_have_text(A_POSITIVE_NUMBER)
    finally:
        load.join()
    assert int(page.locator("#chart-throughput").get_attribute("data-samples")) >= 2
    expect(page.locator("#chart-ttft [data-series=mean]")).to_have_text(A_DURATION)
    expect(page.locator("#tiles [data-tile=generated] .value")).not_to_have_text("0")
    screenshot(page, "live")


def _traffic(url: str) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 32, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=bearer(INFERENCE), timeout=120) as client:
        assert client.post("/v1/tasks/base/generate", json=body).status_code == 200


def test_task_list_pages_and_searches_by_prefix(page: Page, admin: httpx.Client):
    for i in range(30):
        upload_template(admin, f"team-{'a' if i < 27 else 'b'}-{i:02d}")
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/v1/tasks?" in r.url else None)
    sign_in(page, ADMIN, "#/tasks?limit=25")
    rows = page.locator("#task-table tbody tr")
    expect(rows).to_have_count(25)
    screenshot(page, "tasks")
    page.click("#next-page")
    expect(page.locator("#page-status")).to_contain_text("Tasks 26–")
    page.click("#prev-page")
    expect(page.locator("#page-status")).to_have_text("Tasks 1–25")
    page.fill("#task-search", "team-b")
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-task", "team-b-27")
    page.fill("#task-search", "team-a-1")
    expect(rows).to_have_count(10)
    assert all("limit=25" in url for url in requested)  # a page at a time, never the whole store


def test_delete_asks_for_the_task_name(page: Page, admin: httpx.Client):
    upload_template(admin, "short-lived")
    sign_in(page, ADMIN, "#/tasks/short-lived")
    page.click("#delete-task")
    dialog = page.locator("dialog")
    expect(dialog).to_contain_text("Delete task short-lived?")
    confirm = dialog.locator("button[type=submit]")
    expect(confirm).to_be_disabled()
    dialog.locator("input").fill("short-live")
    expect(confirm).to_be_disabled()
    dialog.locator("input").fill("short-lived")
    screenshot(page, "delete")
    confirm.click()
    expect(page.locator("div.page[data-page=tasks]")).to_be_visible()
    assert admin.get("/v1/tasks/short-lived").status_code == 404
