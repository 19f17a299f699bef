"""Reading rendered /metrics text back into numbers, for assertions."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} for every sample in the exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: bytes | str, name: str, **labels: str) -> float:
    """The one sample called `name` with exactly these labels; KeyError names what exists."""
    table = samples(text)
    key = (name, frozenset(labels.items()))
    if key not in table:
        close = [dict(k[1]) for k in table if k[0] == name]
        raise KeyError(f"no sample {name}{labels}; samples of that name: {close}")
    return table[key]


def sample_names(text: bytes | str) -> set[str]:
    return {name for name, _ in samples(text)}


def bucket(text: bytes | str, name: str, le: float, **labels: str) -> float:
    """Cumulative count of histogram `name` (without _bucket) at upper bound `le`, matched as a
    number (the exposition writes 1e6 as "1e+06" and 0.9 as "0.9")."""
    for (sample, sample_labels), count in samples(text).items():
        found = dict(sample_labels)
        bound = found.pop("le", None)
        if sample == f"{name}_bucket" and found == labels and bound is not None and float(bound) == le:
            return count
    raise KeyError(f"no bucket le={le} for {name}{labels}")
