"""Row helpers both backends share: record checks, label and weight columns, and the
shadow summary's aggregation (the SQL differs by dialect; what is done with the rows
does not)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from control_server.domain import DecisionRecord, RunLabels, ShadowSummary, frozen_map

_JSON = json.JSONEncoder(sort_keys=True)


def check_record(record: DecisionRecord) -> None:
    """Refuse a record whose report, decision and shadow disagree on (run_id, epoch)."""
    if (record.shadow is None) != (record.shadow_state is None):
        raise ValueError("a shadow decision and its shadow_state come together")
    key = (record.report.run_id, record.report.epoch)
    for what, d in (("decision", record.decision), ("shadow decision", record.shadow)):
        if d is not None and (d.run_id, d.epoch) != key:
            raise ValueError(
                f"report ({key[0]!r}, {key[1]}) and {what} ({d.run_id!r}, {d.epoch}) disagree"
            )


def labels_row(labels: RunLabels) -> tuple[str, ...]:
    """The label columns, in the schema's order."""
    return (
        labels.dataset,
        labels.configuration,
        labels.fold,
        labels.trainer,
        labels.plans,
        labels.host,
    )


def dump_weights(weights: Mapping[str, float]) -> str:
    """A weight map as the JSON text both schemas store (keys sorted)."""
    if not weights:
        return "{}"
    return _JSON.encode({k: float(v) for k, v in weights.items()})


def load_weights(text: str) -> Mapping[str, float]:
    return frozen_map(json.loads(text))


def shadow_summary_from(version: str, rows: Iterable[tuple[str, str, bool, int]]) -> ShadowSummary:
    """Aggregate (real action, shadow action, differs, count) rows into a summary."""
    evaluated = differed = 0
    by_transition: dict[str, int] = {}
    for real, shadow, differs, n in rows:
        evaluated += n
        if differs:
            differed += n
            key = f"{real}->{shadow}"
            by_transition[key] = by_transition.get(key, 0) + n
    return ShadowSummary(
        version, evaluated, differed, MappingProxyType(dict(sorted(by_transition.items())))
    )
