"""``python -m bench.summary results.json``: a compact table of a run, for a terminal.

One row per case, one column per route (``u``niform, ``m``arginal): the forward+backward
median in ms, or ``oom``, ``err`` or ``skip`` where there is none; then the training-step
times and overheads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["summary"]

_SHORT_BACKEND = {"reference": "ref", "reference-compiled": "refc"}
_NO_TIME = {"oom": "oom", "skipped": "skip", "error": "err"}


def _cell(record) -> str:
    if record is None:
        return ""
    timing = record.get("timings", {}).get("forward_backward")
    if timing:
        return f"{timing['median_ms']:.3g}"
    return _NO_TIME.get(record["status"].split(":")[0], "?")


def summary(document: dict) -> str:
    routes, rows = [], {}
    for record in document["cases"]:
        backend = _SHORT_BACKEND.get(record["backend"], record["backend"])
        route = f"{backend}/{record['estimator'][0]}"
        if route not in routes:
            routes.append(route)
        rows.setdefault(record["case"]["name"], {})[route] = record
    width = max([len(r) for r in routes] + [7])
    name_width = max([len(n) for n in rows] + [4])
    meta = document["meta"]
    lines = [f"fwd+bwd median ms, {meta['device_name']}, grid {meta['grid']}, {meta['date']}",
             f"{'case':<{name_width}} " + " ".join(f"{r:>{width}}" for r in routes)]
    for name, by_route in rows.items():
        lines.append(f"{name:<{name_width}} "
                     + " ".join(f"{_cell(by_route.get(r)):>{width}}" for r in routes))
    for record in document.get("train_step", []):
        step = record.get("step_ms")
        overhead = record.get("overhead")
        lines.append(f"train step {record['arch']} B={record['batch']} {record['input_size']}px, "
                     f"ECLoss {record['backend']}: "
                     + (f"{step:.3g} ms" if step else record["status"])
                     + (f" ({100 * overhead:+.1f}%)" if overhead is not None else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.summary RESULTS.json")
    print(summary(json.loads(Path(sys.argv[1]).read_text())))
