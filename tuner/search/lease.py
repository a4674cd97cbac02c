"""Who writes a shared study's profile: a lease kept in the study's own storage.

Several workers (``vtune search`` with one ``--storage``, ``vtune worker``) share one study and
each ends with the whole of it; exactly one of them writes the profile and its record. The
lease is a marker study named ``<study>/profile-lease``, created with Optuna's
``create_new_study``: the storage's unique constraint on study names lets exactly one worker
create it (every other one gets ``DuplicatedStudyError``), on SQLite, PostgreSQL and any other
storage Optuna has, across machines, with nothing else to run or share. A file lock would do
only on one machine (workers on several write to their own ``--out``); a lease in the storage
is taken where the study already is, and survives the workers.

The lease names its holder: this host and the profile path it writes (:func:`holder_for`).
The holder takes it again on a rerun (the profile is rewritten as before, e.g. after a full disk
stopped the first write); anyone else is told ``profile written by another worker`` and ends
with exit 0 (:class:`ProfileElsewhere`). A worker that starts when the lease is already held
elsewhere ends at once: the lease is taken only once a worker has the whole study
(:mod:`tuner.search.workers`), so nothing is left to measure. The marker study holds no trials
and shows in ``optuna-dashboard`` beside the study, with ``holder`` and ``taken_at`` among its
user attributes.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

SUFFIX = "/profile-lease"


class ProfileElsewhere(Exception):
    """Another worker holds the study's profile lease: it writes the profile and the record;
    this one writes neither. Not a VtuneError: the CLI prints the message and exits 0."""

    def __init__(self, holder: str | None) -> None:
        by = f" ({holder})" if holder else ""
        super().__init__(f"profile written by another worker{by}; nothing written here")
        self.holder = holder


def lease_name(study_name: str) -> str:
    """The marker study's name."""
    return study_name + SUFFIX


def holder_for(yaml_path: Path) -> str:
    """Who takes the lease: this host and the profile it writes (``host:/abs/path.yaml``)."""
    return f"{socket.gethostname()}:{yaml_path.resolve()}"


def held_by(storage: Any, study_name: str) -> str | None:
    """The lease's holder; None when nobody took it. A lease being created this instant, its
    holder not yet written, reads as held by "another worker"."""
    try:
        study_id = storage.get_study_id_from_name(lease_name(study_name))
    except KeyError:
        return None
    return str(storage.get_study_user_attrs(study_id).get("holder") or "another worker")


def take(storage: Any, study_name: str, holder: str) -> bool:
    """Take the lease for ``holder``: True when this call created it or ``holder`` holds it
    already, False when another worker does."""
    import optuna

    try:
        study_id = storage.create_new_study(
            [optuna.study.StudyDirection.MINIMIZE], lease_name(study_name)
        )
    except optuna.exceptions.DuplicatedStudyError:
        return held_by(storage, study_name) == holder
    storage.set_study_user_attr(study_id, "holder", holder)
    storage.set_study_user_attr(
        study_id, "taken_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    return True


def ensure_free(storage: Any, study_name: str, holder: str) -> None:
    """Raise :class:`ProfileElsewhere` when another worker holds the lease."""
    other = held_by(storage, study_name)
    if other is not None and other != holder:
        raise ProfileElsewhere(other)


def ensure_taken(storage: Any, study_name: str, holder: str) -> None:
    """Take the lease, or raise :class:`ProfileElsewhere` naming the worker that holds it."""
    if not take(storage, study_name, holder):
        raise ProfileElsewhere(held_by(storage, study_name))


__all__ = [
    "ProfileElsewhere",
    "ensure_free",
    "ensure_taken",
    "held_by",
    "holder_for",
    "lease_name",
    "take",
]
