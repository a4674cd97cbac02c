"""The secret canary: unique marker values in every secret-bearing input of a real ``vtune
search`` (engine args, the storage URL's query, the Pushgateway URL's password, OPENAI_API_KEY
and HF_TOKEN in the environment), then ``vtune deploy`` of its profile; no marker may appear in
anything the two leave behind or show. The fake vLLM process requires the API key given as an
engine arg (it gets it as VLLM_API_KEY, as vLLM would), so the search's requests must carry it:
the objective is > 0 only if they did.

Also: Pushgateway basic auth against the real (Debian) Pushgateway with a ``--web.config.file``
of bcrypt-hashed users (the hash made with the system's libcrypt).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from tests.faults import searchproc as sp
from tests.prom import PUSHGATEWAY, _start, find_binary, free_port, http_get, running_pushgateway
from tuner.outputs.prometheus_serve import Pushgateway

pytestmark = pytest.mark.faults


def _canaries() -> dict[str, str]:
    names = ("api_key", "hf_token", "storage", "pushgateway", "openai_env", "hf_env")
    return {name: f"CANARY{i}x{sp.new_mark()[:12]}" for i, name in enumerate(names, 1)}


class _Scraper:
    """Fetches a /metrics page every 0.3 s while a search runs; keeps every page."""

    def __init__(self, url: str) -> None:
        self.url, self.pages = url, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            with contextlib.suppress(urllib.error.URLError, OSError):
                self.pages.append(http_get(self.url, timeout=2).decode())

    def __enter__(self) -> _Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_no_secret_reaches_any_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    c = _canaries()
    out, mark = tmp_path / "out", sp.new_mark()
    db = tmp_path / "study" / "study.db"
    db.parent.mkdir()
    metrics_port = free_port()
    env = sp.fake_env(mark, OPENAI_API_KEY=c["openai_env"], HF_TOKEN=c["hf_env"])
    with running_pushgateway() as gw:
        argv = sp.search_argv(
            tiny_model_dir,
            out,
            "--engine-arg",
            f"api_key={c['api_key']}",
            "--engine-arg",
            f"hf_token={c['hf_token']}",
            "--storage",
            f"sqlite:///{db}?password={c['storage']}",
            "--pushgateway",
            f"http://vtune:{c['pushgateway']}@{gw.address}",
            "--metrics-port",
            str(metrics_port),
        )
        with _Scraper(f"http://127.0.0.1:{metrics_port}/metrics") as scraper:
            ran = sp.run(argv, env)
        gateway_page = http_get(gw.url + "/metrics").decode()
    assert ran.returncode == 0, ran.describe()
    sp.assert_no_process_left(mark)

    pdir = sp.profile_dir(tiny_model_dir, out)
    record = sp.assert_pair_from_one_run(pdir)
    trials = sp.assert_complete_record(record)  # objective > 0: the requests carried the key
    assert record is not None
    assert record["fixed_settings"]["api_key"] == "***"
    assert record["fixed_settings"]["hf_token"] == "***"
    assert record["study"]["storage"].endswith("?password=***")
    for trial in trials.values():
        point = trial["rate_search"]["points"][0]["summary"]
        assert point["completed"] > 0 and point["failed"] == 0
    # The pushes reached the gateway (the password no longer taken for the host) ...
    assert 'job="vtune-search"' in gateway_page and "vtune_best_objective" in gateway_page
    # ... and /metrics was served and read during the search.
    assert any("vtune_trials_total" in page for page in scraper.pages)

    deploy_dir = tmp_path / "deploy"
    printed = sp.run([str(sp.VTUNE), "deploy", str(pdir / "cpu.yaml")], env)
    written = sp.run(
        [str(sp.VTUNE), "deploy", str(pdir / "cpu.json"), "--out", str(deploy_dir)], env
    )
    assert printed.returncode == 0 and "kind: Deployment" in printed.stdout, printed.describe()
    assert written.returncode == 0, written.describe()

    haystacks: dict[str, bytes] = {
        "search stdout": ran.stdout.encode(),
        "search stderr": ran.stderr.encode(),
        "study database dump": sp.study_dump(db).encode(),
        "gateway /metrics": gateway_page.encode(),
        "vtune /metrics": "\n".join(scraper.pages).encode(),
        "deploy output": (
            printed.stdout + printed.stderr + written.stdout + written.stderr
        ).encode(),
    }
    files = [p for root in (out, db.parent, deploy_dir) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files)  # the trial logs are among them
    for path in files:
        haystacks[str(path)] = path.read_bytes()
    leaks = [
        (which, where)
        for which, value in c.items()
        for where, data in haystacks.items()
        if value.encode() in data
    ]
    assert not leaks, leaks


# --- basic auth against the real Pushgateway ----------------------------------------------------


def _bcrypt(password: str) -> str:
    """A bcrypt hash of ``password`` by the system's libcrypt (libxcrypt: ``$2b$``)."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        pytest.fail("libcrypt is not installed (Debian: libcrypt1)", pytrace=False)
    lib = ctypes.CDLL(name)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt.restype = ctypes.c_char_p
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = lib.crypt(password.encode(), salt)
    assert hashed and hashed.startswith(b"$2b$"), hashed
    return hashed.decode()


def _get(url: str, user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def test_basic_auth_against_a_real_pushgateway(tmp_path: Path, caplog) -> None:
    password = f"pw-{sp.new_mark()[:16]}"
    config = tmp_path / "web.yml"
    config.write_text(f'basic_auth_users:\n  vtune: "{_bcrypt(password)}"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(
        "pushgateway",
        [
            find_binary(PUSHGATEWAY),
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={config}",
            "--persistence.file=",  # Debian's default persists under /var/lib/prometheus
            "--log.level=warn",
        ],
        url,
        tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # ready once it answers with credentials
            try:
                _get(url + "/-/ready", "vtune", password)
                break
            except (urllib.error.URLError, OSError):
                assert proc.proc.poll() is None and time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as anonymous:  # the gateway requires auth
            http_get(url + "/metrics")
        assert anonymous.value.code == 401

        registry = CollectorRegistry()
        Gauge("vtune_canary_value", "a pushed value", registry=registry).set(42)
        good = Pushgateway(f"http://vtune:{password}@127.0.0.1:{port}", job="auth-test")
        assert good.push(registry) and good.failures == 0
        page = _get(url + "/metrics", "vtune", password)
        assert 'vtune_canary_value{instance="",job="auth-test"} 42' in page

        bad = Pushgateway(f"http://vtune:wrong-{password}@127.0.0.1:{port}", job="auth-test")
        assert not bad.push(registry) and bad.failures == 1
        assert any("refused the push (HTTP 401" in r.getMessage() for r in caplog.records)
        assert all(password not in r.getMessage() for r in caplog.records)
    finally:
        proc.stop()
