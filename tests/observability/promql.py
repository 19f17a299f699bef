"""Metric names referenced by a PromQL expression (enough of PromQL for dashboard queries)."""
from __future__ import annotations

import re

# Words that can stand where a metric name could, but are not one.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_GRAFANA_VAR = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)?(?:\{[^}]*\})?\s*,?\s*\w*\s*\)")


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects; functions, keywords, labels, strings excluded."""
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub("", expr)
    expr = _RANGE.sub("", expr)
    expr = _GROUPING.sub("", expr)
    expr = _GRAFANA_VAR.sub("", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS or re.fullmatch(r"\d+(e\d+)?", word):
            continue
        names.add(word)
    return names


def template_metric_names(query: str) -> set[str]:
    """Metric named by a Grafana `label_values(metric, label)` variable query (if any)."""
    match = _LABEL_VALUES.search(query)
    return {match.group(1)} if match and match.group(1) else metric_names(query)
