"""The report page in a real browser: headless Chromium (Debian's ``chromium``, which
``make system-packages`` installs) opens index.html from a file:// URL; every image on it must
load (complete, with the PNG's own pixel size). A missing binary fails the test, as the
Prometheus tests do: CI installs it, so a skip would hide a broken setup.

The page is not changed for the test: a checker page beside it loads it in an iframe
(``--allow-file-access-from-files`` lets a file:// page read another's DOM) and writes what
it finds into its own DOM, which ``--dump-dom`` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.unit.roofline_records import with_rooflines
from tuner.outputs.report import write_report

BROWSERS = ("chromium", "chromium-browser")
INSTALL_HINT = "make system-packages (or: apt-get install chromium)"

CHECKER = """<!doctype html><html><body><pre id="out">PENDING</pre>
<iframe id="page" src="{url}" width="1280" height="900"></iframe>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {{
  const out = document.getElementById("out");
  try {{
    const doc = frame.contentDocument;
    const images = Array.from(doc.images).map(i => ({{
      src: i.getAttribute("src"), complete: i.complete,
      width: i.naturalWidth, height: i.naturalHeight}}));
    const tables = doc.querySelectorAll("table").length;
    out.textContent = "RESULT" + JSON.stringify({{title: doc.title, images, tables}}) + "END";
  }} catch (e) {{ out.textContent = "FAILED" + e + "END"; }}
}});
</script></body></html>
"""


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' / '.join(BROWSERS)} is not installed: {INSTALL_HINT}", pytrace=False)


def open_in_browser(page: Path, work: Path) -> dict[str, Any]:
    """What headless Chromium sees of ``page``: its title, its images (src, complete,
    natural size) and its table count."""
    checker = work / "checker.html"
    checker.write_text(CHECKER.format(url=page.resolve().as_uri()))
    argv = [
        browser(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # tests run as root in CI containers
        "--allow-file-access-from-files",
        f"--user-data-dir={work / 'profile'}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        checker.resolve().as_uri(),
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=90)
    finally:  # Chromium's helper processes share its session: none is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = out.decode("utf-8", "replace")
    found = re.search(r"RESULT(.*?)END", text, re.S)
    assert found, f"the checker page did not report (rc {proc.returncode}): {err[-1500:]!r}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("report")
    record = out / "record.json"
    record.write_text(json.dumps(with_rooflines()))
    return write_report(record, out / "site")


def test_every_image_of_the_report_loads_in_chromium(report: Any, tmp_path: Path) -> None:
    seen = open_in_browser(report.html, tmp_path)
    assert seen["title"].startswith("vtune report:")
    assert seen["tables"] >= 2
    names = [img["src"] for img in seen["images"]]
    assert names == [p.name for p in report.images]  # every plot written is on the page
    assert "roofline.png" in names
    for img in seen["images"]:
        assert img["complete"], img
        assert (img["width"], img["height"]) == png_size(report.html.parent / img["src"]), img


def test_a_missing_image_is_seen_as_broken(report: Any, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(report.html.parent, site)
    (site / "roofline.png").unlink()
    seen = open_in_browser(site / "index.html", tmp_path)
    broken = [img["src"] for img in seen["images"] if img["width"] == 0]
    assert broken == ["roofline.png"]
