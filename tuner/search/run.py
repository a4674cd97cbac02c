"""``vtune search``'s run: build the variants, run (or resume) the study, write the profile
and its record. :func:`tuner.search.prepare.prepare` comes first.

The whole run holds the ``--out`` lock (:func:`tuner.search.profile.out_lock`): a second search
on the same directory ends at once with one line. A disk that refuses a write (full, read-only,
failing) ends the search with one line (StorageError): what was saved before stays whole and a
rerun of the same command resumes from it.

Several workers on one study: the study carries the configuration ``vtune worker`` runs from
(:mod:`tuner.search.study_config`), and one worker writes the profile and its record
(:mod:`tuner.search.lease`); the others end with one line and exit 0.
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import replace
from typing import Any

from tuner.errors import StorageError
from tuner.measure.ratesearch import RateSearchConfig
from tuner.plan.prune import feasible_concurrency, plan
from tuner.plan.space import Space
from tuner.quant.variants import materialize
from tuner.search import lease, study_config
from tuner.search import study as study_mod
from tuner.search.outcome import TuneOutcome, build_record, profile_config, profile_header
from tuner.search.prepare import Prepared, fixed_settings, storage_for, watch_for
from tuner.search.profile import out_lock, render_profile, write_outputs
from tuner.search.record_parts import ProfileInfo
from tuner.search.runner import Search, directions, make_sampler, queue_all
from tuner.search.store import TrialStore
from tuner.search.study import open_study, storage_of
from tuner.search.trial import TrialSetup, VllmTrialRunner
from tuner.specs.vllm_defaults import vllm_defaults

# What a refusing disk raises: full, over quota, read-only, failing, a file too large.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
# SQLite's words for the same (SQLAlchemy wraps the driver's error).
_DISK_WORDS = ("database or disk is full", "disk i/o error", "readonly database")


def run_search(prep: Prepared, observer: Any = None) -> TuneOutcome:
    """Run (or resume) the study, then write the profile YAML and its JSON record
    (``SearchRecord.to_json()``); observers' ``on_finish`` gets the typed record. Holds the
    ``--out`` lock throughout; StorageError (one line) when the disk refuses a write."""
    with out_lock(prep.yaml_path.parent, prep.gpu.name):
        study = None
        try:
            space = prep.space  # as planned: what a worker's prepare plans (study_config)
            _materialize_variants(prep, observer)  # may drop variants: the plan changes
            url = storage_for(prep)
            sampler = make_sampler(prep.config.settings, queue_all(prep.plan, prep.config.settings))
            study = open_study(url, prep.study_name, directions(prep.config.settings), sampler)
            study_config.remember(study, prep, space)  # what `vtune worker` runs it from
            return _run(prep, study, url, observer)
        except StorageError:
            _release_running(study)
            raise
        except Exception as exc:
            reason = _disk_failure(exc)
            if reason is None:
                raise
            _release_running(study)
            raise StorageError(
                f"cannot save the search's results in {prep.yaml_path.parent}: {reason}; "
                "finished trials are kept (rerun the same command to finish)"
            ) from None


def _run(prep: Prepared, study: Any, url: str, observer: Any) -> TuneOutcome:
    cfg = prep.config
    started = time.time()
    # One worker of a shared study writes the profile (tuner.search.lease); one that starts
    # after another took the lease has nothing left to measure.
    storage, holder = storage_of(study), lease.holder_for(prep.yaml_path)
    lease.ensure_free(storage, prep.study_name, holder)
    runner = VllmTrialRunner(trial_setup(prep), observer)
    search = Search(
        study,
        prep.plan,
        prep.space,
        prep.target,
        runner,
        cfg.settings,
        TrialStore(prep.work_dir),
        observer,
        # Taken before the finalists: they are re-measured once, by the profile's writer; the
        # others end with ProfileElsewhere (exit 0).
        before_finalists=lambda: lease.ensure_taken(storage, prep.study_name, holder),
    )
    result = search.run()
    observer_call(observer, "on_phase", "write")
    record = build_record(prep, result, url, started)
    yaml_path = profile_text = None
    if result.best is not None:
        config = profile_config(prep, result)
        record = replace(record, profile=ProfileInfo(str(prep.yaml_path), config))
        profile_text = render_profile(config, profile_header(prep, result, record))
        yaml_path = prep.yaml_path
    stale = write_outputs(prep.yaml_path, record.to_json(), profile_text)
    observer_call(observer, "on_finish", record)
    observer_call(observer, "on_phase", "done")
    return TuneOutcome(prep, result, record, yaml_path, stale)


def _disk_failure(exc: BaseException) -> str | None:
    """The reason, when ``exc`` or what caused it is a disk refusing a write: an OSError, or
    SQLite's own words (wrapped by SQLAlchemy, then by Optuna's StorageInternalError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
            return cause.strerror or str(cause)
        if type(cause).__module__.partition(".")[0] == "sqlite3":
            text = " ".join(str(cause).split())
            if any(word in text.lower() for word in _DISK_WORDS):
                return text[:200]
        cause = cause.__cause__ or cause.__context__
    return None


def _release_running(study: Any) -> None:
    """Fail this worker's trials still RUNNING (the one being saved when the disk refused), so
    they are measured again by the next run rather than waiting to go stale; best effort,
    since the study may sit on the same full disk."""
    if study is None:
        return
    import optuna

    running = optuna.trial.TrialState.RUNNING
    with contextlib.suppress(Exception):
        for trial in study.get_trials(deepcopy=False, states=(running,)):
            if trial.user_attrs.get("worker_id") == study_mod.WORKER_ID:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def trial_setup(prep: Prepared) -> TrialSetup:
    """How every trial of this search launches vLLM and measures it."""
    cfg = prep.config
    launch = replace(
        cfg.launch, log_dir=prep.work_dir / "logs", device="cpu" if prep.gpu.is_cpu else "cuda"
    )
    return TrialSetup(
        tokenizer=cfg.model,
        workload=cfg.workload,
        launch=launch,
        log_dir=prep.work_dir / "logs",
        slo=prep.slo,
        objective=cfg.settings.objective,
        latency_rate=cfg.latency_rate,
        fixed=fixed_settings(prep),
        rate=RateSearchConfig(
            concurrency=_baseline_seqs(prep, prep.plan.baseline.max_concurrency),
            seconds_per_point=cfg.seconds_per_point,
            iterations=cfg.iterations,
        ),
        endpoint=cfg.endpoint,
        watch=watch_for(prep),
        early_stop_margin=cfg.settings.early_stop_margin if cfg.settings.early_stop else None,
        in_trial_repeats=cfg.settings.in_trial_repeats,
    )


def _materialize_variants(prep: Prepared, observer: Any) -> None:
    """Build the variants to be built and apply the quality guard, before any trial; a
    variant the guard drops leaves the space (and the plan) with the reason recorded."""
    variants = prep.target.variants
    if (
        not any(v.source == "built" for v in variants.values())
        and prep.config.max_quality_loss is None
    ):
        return
    observer_call(observer, "on_phase", "plan", "building variants / quality guard")
    kept, figures = materialize(
        variants, prep.gpu, calib=prep.config.calib, max_quality_loss=prep.config.max_quality_loss
    )
    prep.quality = figures
    prep.target = replace(prep.target, variants=kept)
    dropped = [name for name in variants if name not in kept]
    if dropped:
        values = dict(prep.space.values)
        values["quantization"] = tuple(v for v in values.get("quantization", ()) if v in kept)
        prep.space = Space({k: v for k, v in values.items() if v})
    prep.plan = plan(prep.space, prep.target)


def _baseline_seqs(prep: Prepared, fits: float) -> int:
    """The baseline's load: vLLM's default max_num_seqs, capped to what the KV cache holds."""
    _, seqs = vllm_defaults().batch_limits(prep.gpu)
    return feasible_concurrency(seqs, fits)


def observer_call(observer: Any, hook: str, *args: Any) -> None:
    fn = getattr(observer, hook, None) if observer is not None else None
    if fn is not None:
        fn(*args)
