"""``vtune report``: an HTML page and PNG plots of a finished search, from its JSON record.

:func:`~tuner.search.record.load_record` reads the record (schema /1 or /2) into a typed
:class:`~tuner.search.record.SearchRecord`; :func:`trial_views` flattens its trials into
:class:`TrialView` rows (pure; the plots and the table read those); :func:`write_report` draws
the plots (:mod:`tuner.outputs.plots`) and writes one self-contained HTML page beside them with
relative image links. Every optional field of the record may be missing or None: failed and
pruned trials, no SLO, closed-loop points without a rate, a record from an older search.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ParameterError
from tuner.files import atomic_write_text
from tuner.outputs.views import TrialView, trial_views
from tuner.search.cost import cost_line
from tuner.search.profile import render_profile
from tuner.search.record import SearchRecord, finite, load_record
from tuner.search.record_parts import PlanInfo


def profile_text(record: SearchRecord, record_path: Path | None) -> str | None:
    """The chosen profile's YAML: the file beside the record if it is there, else rendered
    from the record's ``profile.config``; None when the search wrote no profile."""
    candidates = []
    if record_path is not None:
        candidates.append(Path(record_path).with_suffix(".yaml"))
    prof = record.profile
    if prof is not None and prof.path:
        candidates.append(Path(prof.path))
    for path in candidates:
        if path.is_file():
            return path.read_text()
    if prof is not None and prof.config:
        return render_profile(prof.config, ["rendered from the search record"])
    return None


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.best{background:#e9f7e9}tr.baseline{background:#eef3fb}tr.failed,tr.pruned{color:#888}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.verdict{font-weight:bold}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:bold}dd{margin:0}
"""


def _fmt(value: Any, digits: int | None = None) -> str:
    """Numbers for people: 1,186 / 44.2 / 4.63 / 0.0123; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if digits is not None:
            return f"{value:,.{digits}f}"
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if size >= 10 else f"{value:.3g}"
    return str(value)


def _e(value: Any) -> str:
    return html.escape(_fmt(value) if not isinstance(value, str) else value)


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    classes: Sequence[str] = (),
    left: int = 0,
) -> str:
    """An HTML table; the first ``left`` columns are left-aligned; cells are escaped."""
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>'
        for i, h in enumerate(headers)
    )
    body = []
    for n, row in enumerate(rows):
        cls = classes[n] if n < len(classes) else ""
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _knobs_text(knobs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "vLLM defaults"


def render_html(
    record: SearchRecord,
    views: Sequence[TrialView],
    images: Mapping[str, str],
    profile: str | None,
) -> str:
    """The report page (pure): ``images`` maps a plot title to its relative file name."""
    model = record.model.name or "?"
    gpu = record.gpu.name or "?"
    study = record.study
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>vtune report: "
        f"{html.escape(str(model))} on {html.escape(str(gpu))}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>vtune search: {html.escape(str(model))} on {html.escape(str(gpu))}</h1>",
    ]
    facts = [
        ("Objective", record.objective),
        ("SLO", record.slo or "none"),
        ("vLLM", record.vllm_version),
        ("vtune", record.vtune_version),
        ("Workload", _knobs_text(record.workload)),
        (
            "Study",
            f"{study.name or '?'} ({study.sampler or '?'}, budget "
            f"{'none' if study.budget is None else study.budget}, storage {study.storage or '?'})",
        ),
        (
            "Elapsed",
            f"{_fmt(finite(study.elapsed_s), 0)} s, engine "
            f"{_fmt(finite(study.engine_time_s), 0)} s",
        ),
        ("Created", record.created_at),
    ]
    parts.append(
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"
    )

    parts.append("<h2>Outcome</h2>")
    gain = record.gain
    ratio = finite(gain.ratio) if gain else None
    parts.append(
        f"<p>Best: <b>{_e(record.best or 'none')}</b>; baseline "
        f"<b>{_e(record.baseline or 'none')}</b>. "
        f"{_e((gain.objective if gain else None) or 'objective')}"
        f": {_e(finite(gain.baseline) if gain else None)} → "
        f"{_e(finite(gain.best) if gain else None)}"
        + (f" (<b>×{ratio:.2f}</b> over the baseline)" if ratio is not None else "")
        + ".</p>"
    )
    if record.cost is not None:  # tokens/s per GPU and, with a price, $ per 1M output tokens
        parts.append(f"<p class='cost'>{_e(cost_line(record.cost))}.</p>")
    parts.append(_noise_html(record))

    parts.append("<h2>Plots</h2>")
    for title, src in images.items():
        parts.append(
            f"<h3>{html.escape(title)}</h3><img src='{html.escape(src)}' "
            f"alt='{html.escape(title)}'>"
        )

    parts.append("<h2>Trials</h2>")
    stats = _latency_columns(views)
    headers = [
        "#",
        "name",
        "state",
        "objective",
        "rate req/s",
        "output tok/s",
        "req/s",
        "goodput req/s",
        *[f"{s} {m} ms" for s, m in stats],
        "peak KV %",
        "preempt.",
        "regime",
        "predicted tok/s",
        "failure",
    ]
    rows, classes = [], []
    for v in views:
        failure = f"{v.failure_class}: {v.failure_message}" if v.failure_class else None
        rows.append(
            [
                v.number,
                v.name + (" (best)" if v.is_best else "") + (" (baseline)" if v.baseline else ""),
                v.state,
                v.objective,
                v.rate,
                v.output_throughput,
                v.request_throughput,
                v.goodput,
                *[v.latency_ms.get(f"{s}_{m}") for s, m in stats],
                None if v.peak_kv is None else 100 * v.peak_kv,
                v.preemptions,
                v.regime,
                v.predicted_tps,
                failure,
            ]
        )
        classes.append("best" if v.is_best else "baseline" if v.baseline else v.state)
    parts.append(_table(headers, rows, classes, left=3))
    parts.append(
        "<p>Regime: where the chosen load point sits on the roofline (its achieved bandwidth "
        "and FLOP/s as fractions of the device's peaks): <i>memory-bound</i> or "
        "<i>compute-bound</i> when that resource runs at half its peak or more, "
        "<i>overhead-bound</i> when neither does (the step goes to scheduling, sampling, "
        "Python). Peaks: " + html.escape(_peaks_words(record)) + ".</p>"
    )
    parts.append(
        "<p>Knobs per trial:</p>"
        + _table(
            ["#", "name", "knobs"],
            [[v.number, v.name, _knobs_text(v.knobs)] for v in views],
            left=3,
        )
    )

    parts.append(_plan_html(record.plan))
    parts.append("<h2>Chosen profile</h2>")
    path = record.profile.path if record.profile is not None else None
    if profile is not None:
        parts.append(f"<p>{_e(path or '')}</p><pre>{html.escape(profile)}</pre>")
    else:
        parts.append("<p>No profile was written.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _peaks_words(record: SearchRecord) -> str:
    peaks = record.gpu.peaks or {}
    bw, flops = finite(peaks.get("memory_bandwidth")), finite(peaks.get("flops"))
    if bw is None or flops is None:
        return "not recorded"
    figures = f"{bw / 1e9:,.1f} GB/s, {flops / 1e12:,.3g} TFLOP/s"
    if peaks.get("source") == "probe":
        return f"probed on {peaks.get('device') or '?'} at {peaks.get('measured_at')} ({figures})"
    return f"the datasheet's ({figures})"


def _latency_columns(views: Sequence[TrialView]) -> list[tuple[str, str]]:
    wanted = [("p95", "ttft"), ("p95", "tpot"), ("p99", "ttft"), ("p99", "tpot"), ("p95", "e2el")]
    return [(s, m) for s, m in wanted if any(v.latency_ms.get(f"{s}_{m}") for v in views)]


def _noise_html(record: SearchRecord) -> str:
    finalists = record.finalists
    within = record.within_noise
    if within is None:
        verdict = "No noise verdict in the record."
    elif within:
        verdict = (
            "Within noise: the best finalist's 95 % interval overlaps another's; the "
            "choice between them is not certain."
        )
    else:
        verdict = "Clear winner: the best finalist's 95 % interval overlaps no other finalist's."
    out = f"<p class='verdict'>{html.escape(verdict)}</p>"
    if finalists:
        rows = [
            [
                f.name,
                finite(f.mean),
                finite(f.ci_low),
                finite(f.ci_high),
                len(f.samples),
                ", ".join(f"{s:.3g}" for s in f.samples),
            ]
            for f in finalists
        ]
        out += _table(
            ["finalist", "mean", "95 % CI low", "95 % CI high", "runs", "samples"], rows, left=1
        )
    return out


def _plan_html(plan: PlanInfo) -> str:
    out = ["<h2>Plan and pruning</h2>"]
    out.append(
        f"<p>Space: {_e(plan.space_size)} combinations; candidates kept after "
        f"pruning: {_e(plan.kept)}; pruned: {len(plan.pruned)}; capped: "
        f"{len(plan.capped)}.</p>"
    )
    if plan.counts_by_rule:
        out.append(_table(["rule", "candidates"], sorted(plan.counts_by_rule.items()), left=1))
    pruned = plan.pruned
    if pruned:
        shown = pruned[:50]
        out.append(f"<p>Pruned candidates{' (first 50)' if len(pruned) > 50 else ''}:</p>")
        out.append(
            _table(
                ["name", "rule", "reason"],
                [[p.name, p.rule, p.reason] for p in shown],
                left=3,
            )
        )
    if plan.capped:
        out.append(
            "<p>Capped candidates:</p>"
            + _table(
                ["from", "to", "reason"],
                [[c.original, c.capped, c.reason] for c in plan.capped],
                left=3,
            )
        )
    return "\n".join(out)


# --- the whole report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    html: Path
    images: tuple[Path, ...]


def write_report(record_path: Path, out_dir: Path) -> Report:
    """Read the record at ``record_path``, write ``out_dir/index.html`` and the PNG plots."""
    from tuner.outputs import plots

    record = load_record(record_path)
    views = trial_views(record)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    images = plots.render_all(record, views, out_dir)
    page = render_html(
        record, views, {t: p.name for t, p in images.items()}, profile_text(record, record_path)
    )
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return Report(index, tuple(images.values()))
