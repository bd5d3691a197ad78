"""`holdfast stats [--metrics URL]`: a running server's metrics as a table.

For the operator at a terminal with no Prometheus at hand: it reads the
server's /metrics once (`holdfast serve --metrics-port N`) and prints every
`holdfast_*` metric readably. Counters show one row per label set, the sum of
that label set's samples; histograms show count, mean and a p99 estimated
from their buckets (as Prometheus' histogram_quantile does: linear within the
bucket, so it is an estimate, bounded by the bucket's edges); the
deterministic ratio shows as a percentage, the number to watch.

Exit 0 with the table; 1 with a one-line reason when the URL cannot be read
or holds no holdfast metrics; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
PREFIX = "holdfast_"
RATIO = "holdfast_deterministic_ratio"
FETCH_TIMEOUT_S = 5.0
# Method labels are gRPC paths, `/package.Service/Method`; rows show the
# method alone (holdfast's services share no method name).


class StatsError(Exception):
    """Why the table cannot be printed, in one line."""


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    labels: str
    value: str


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holdfast stats", description="Print a running server's holdfast_* metrics.")
    parser.add_argument(
        "--metrics",
        default=os.environ.get("HOLDFAST_METRICS_URL", DEFAULT_URL),
        help=f"the server's /metrics URL (default $HOLDFAST_METRICS_URL or {DEFAULT_URL})",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        text = fetch(args.metrics)
        print(render(args.metrics, text))
    except StatsError as error:
        print(f"holdfast stats: {error}", file=sys.stderr)
        return 1
    return 0


def fetch(url: str, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    """The exposition text at `url`; a bare HOST:PORT means its /metrics."""
    if "://" not in url:
        url = f"http://{url}" + ("" if "/" in url else "/metrics")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        raise StatsError(f"{url} answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise StatsError(f"cannot read {url}: {reason}") from None


def render(source: str, text: str) -> str:
    """The table for one scrape of exposition `text`."""
    try:
        families = [f for f in text_string_to_metric_families(text) if f.name.startswith(PREFIX) and not _start_time(f)]
    except ValueError as error:
        raise StatsError(f"{source} is not Prometheus text: {error}") from None
    if not families:
        raise StatsError(f"{source} has no {PREFIX}* metrics (is it a holdfast server?)")
    lines = [f"holdfast metrics from {source}", ""]
    ratio = next((f for f in families if f.name == RATIO), None)
    if ratio is not None and ratio.samples:
        lines.append(f"deterministic answers: {_percent(ratio.samples[0].value)}")
        lines.append("")
    scalars = [row for f in families if f.name != RATIO and f.type != "histogram" for row in _scalar_rows(f)]
    if scalars:
        lines += _table(("metric", "labels", "value"), [(r.metric, r.labels, r.value) for r in scalars], right=(2,))
        lines.append("")
    histograms = [row for f in families if f.type == "histogram" for row in _histogram_rows(f)]
    if histograms:
        lines += _table(("histogram", "labels", "count", "mean", "p99"), histograms, right=(2, 3, 4))
    return "\n".join(lines).rstrip()


# -- rows --------------------------------------------------------------------------


def _scalar_rows(family) -> Iterable[Row]:
    """Counters and gauges: one row per label set, its samples summed."""
    sums: dict[str, float] = defaultdict(float)
    for sample in family.samples:
        if sample.name.endswith("_created"):  # the counter's start time, not a value
            continue
        sums[_labels(sample.labels)] += sample.value
    name = family.name + "_total" if family.type == "counter" else family.name
    if not sums:  # a labelled metric nothing has touched yet: it exists, at zero
        sums["-"] = 0.0
    for labels, value in sorted(sums.items()):
        yield Row(name, labels, _number(value))


def _start_time(family) -> bool:
    """The `*_created` series prometheus_client exposes next to each counter
    and histogram (as gauges in the text format): a start time, not a value."""
    return family.name.endswith("_created") and family.type in ("gauge", "unknown")


def _histogram_rows(family) -> Iterable[tuple[str, str, str, str, str]]:
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for sample in family.samples:
        labels = dict(sample.labels)
        if sample.name.endswith("_bucket"):
            bound = float(labels.pop("le"))
            buckets[_labels(labels)].append((bound, sample.value))
        elif sample.name.endswith("_count"):
            counts[_labels(labels)] = sample.value
        elif sample.name.endswith("_sum"):
            sums[_labels(labels)] = sample.value
    seconds = family.name.endswith("_seconds")
    if not counts:
        counts["-"] = 0.0
    for labels in sorted(counts):
        count = counts[labels]
        mean = sums.get(labels, 0.0) / count if count else math.nan
        p99 = quantile(0.99, buckets.get(labels, []))
        yield (family.name, labels, _number(count), _amount(mean, seconds), _amount(p99, seconds, buckets.get(labels)))


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile estimated from cumulative (upper bound, count) buckets,
    linear inside the bucket it falls in (Prometheus' histogram_quantile).
    NaN with no observations; the largest finite bound if it falls in +Inf."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


# -- formatting ----------------------------------------------------------------------


def _labels(labels: dict[str, str]) -> str:
    shown = []
    for name, value in sorted(labels.items()):
        if name == "method":
            shown.append(value.rpartition("/")[2] if value.startswith("/") else value)
        else:
            shown.append(f"{name}={value}")
    return " ".join(shown) or "-"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.6g}"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.2f}%"


def _amount(value: float, seconds: bool, buckets: list[tuple[float, float]] | None = None) -> str:
    if math.isnan(value):
        return "-"
    over = ""
    if buckets is not None:  # a p99 in the +Inf bucket is only a lower bound
        finite = [b for b, _ in buckets if not math.isinf(b)]
        if finite and value >= max(finite) and _in_overflow(buckets):
            over = ">"
    return f"{over}{value * 1000:.3g} ms" if seconds else f"{over}{value:.4g}"


def _in_overflow(buckets: list[tuple[float, float]]) -> bool:
    ordered = sorted(buckets)
    finite = [c for b, c in ordered if not math.isinf(b)]
    return bool(finite) and finite[-1] < 0.99 * ordered[-1][1]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        parts = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(row) for row in rows)]


if __name__ == "__main__":
    sys.exit(main())
