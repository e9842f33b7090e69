"""Results: the JSON document, derived rates and ratios, the markdown table and the plot.

The document is ``{"meta": {...}, "cases": [record, ...], "train_step": [record, ...]}``.
A case record holds the case's fields, ``backend``, ``estimator``, ``status`` ("ok",
"oom", "skipped: ..." or "error: ..."), ``timings[pass] = {median_ms, q1_ms, q3_ms,
repeats}`` for the passes of ``bench.cost.PASSES``, ``peak_bytes``, and the derived
``tflops[pass]``, ``peak_fraction[pass]`` (of ``meta.peak_tflops`` at the case's precision,
measured in the same run, see bench/peak.py) and ``speedup_vs_reference[pass]`` (reference
time over this route's time, same case, estimator and run). ``precision_ratios`` pairs
each route of a case at a precision other than ieee with the same route on the same
shape, dtype and templates at ieee: ``time_ratio[pass]`` is this precision's time over
ieee's.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from bench.cost import PASSES, Workload

__all__ = ["enrich", "write_json", "markdown", "write_plot"]

_SHORT = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd"}


def _workload(record) -> Workload:
    case = record["case"]
    return Workload(case["batch"], case["channels"], case["height"] * case["width"],
                    record["num_templates"])


def _peak(meta: dict, record) -> float | None:
    """The rate a record's floor divides by: its precision's peak, or for a route of the
    ``cpu`` backend the peak of the instruction-set path it ran (``cpu_path``; the
    ``vdpbf16ps`` rate for bf16 products on the path that has them, else its float32 FMA
    rate) where the run measured that path's (``path_peak_tflops``)."""
    precision = record["case"]["precision"]
    path_peaks = meta.get("path_peak_tflops", {}).get(record.get("cpu_path"))
    if path_peaks:
        return path_peaks.get("bf16" if precision == "bf16" else "float32") \
            or path_peaks["float32"]
    return meta.get("peak_tflops", {}).get(precision)


def _case_key(record) -> tuple:
    return (record["case"]["name"], record["estimator"])


def _shape_key(record) -> tuple:
    case = record["case"]
    return (case["batch"], case["channels"], case["height"], case["width"], case["templates"],
            case["dtype"], record["backend"], record["estimator"])


def _precision_ratios(records) -> list[dict]:
    at_ieee = {_shape_key(r): r for r in records
               if r["case"]["precision"] == "ieee" and "timings" in r}
    ratios = []
    for record in records:
        ieee = at_ieee.get(_shape_key(record))
        if record["case"]["precision"] == "ieee" or "timings" not in record or ieee is None:
            continue
        ratios.append({
            "case": record["case"]["name"], "versus": ieee["case"]["name"],
            "precision": record["case"]["precision"], "backend": record["backend"],
            "estimator": record["estimator"],
            "time_ratio": {p: t["median_ms"] / ieee["timings"][p]["median_ms"]
                           for p, t in record["timings"].items() if p in ieee["timings"]}})
    return ratios


def enrich(document: dict) -> dict:
    """Add the derived rates and ratios to every measured case record and the
    ``precision_ratios`` to the document (in place)."""
    reference = {_case_key(r): r["timings"] for r in document["cases"]
                 if r["backend"] == "reference" and "timings" in r}
    for record in document["cases"]:
        timings = record.get("timings")
        if not timings:
            continue
        workload, peak = _workload(record), _peak(document["meta"], record)
        record["tflops"], record["peak_fraction"], record["speedup_vs_reference"] = {}, {}, {}
        record["over_floor"] = {}
        for pass_name, timing in timings.items():
            rate = workload.flops(record["estimator"], pass_name) / timing["median_ms"] / 1e9
            record["tflops"][pass_name] = rate
            if peak:
                record["peak_fraction"][pass_name] = rate / peak
                # The floor: the pass's GEMM flops at this run's peak (the FMA rate on a CPU).
                record["over_floor"][pass_name] = peak / rate
            baseline = reference.get(_case_key(record), {}).get(pass_name)
            if baseline:
                record["speedup_vs_reference"][pass_name] = (
                    baseline["median_ms"] / timing["median_ms"])
    document["precision_ratios"] = _precision_ratios(document["cases"])
    return document


def write_json(document: dict, path: Path) -> None:
    """Write atomically, so an interrupted run leaves the previous complete file."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    os.replace(partial, path)


def _milliseconds(record, pass_name):
    timing = record.get("timings", {}).get(pass_name)
    return f"{timing['median_ms']:.3g}" if timing else "-"


def _case_title(case, templates) -> str:
    return (f"{case['name']}: B={case['batch']}, C={case['channels']}, "
            f"{case['height']}x{case['width']}, N={templates}, {case['dtype']}, "
            f"precision {case['precision']}")


def _rates(rates: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} not measured (no bfloat16 "
                     "arithmetic on this CPU)" for k, v in rates.items())


def _cpu_line(meta: dict) -> list[str]:
    """The CPU beside the figures: its model, its kernel flags and the cpu backend's path."""
    cpu = meta.get("cpu")
    if not cpu:
        return []
    path = cpu.get("cpu_backend_path") or "none (no extension)"
    floors = "; ".join(f"{name} " + ", ".join(f"{operands} {rate:.3g}"
                                              for operands, rate in rates.items())
                       for name, rates in meta.get("path_peak_tflops", {}).items())
    return ["", f"CPU: {cpu['model']}; flags: {', '.join(cpu['flags']) or 'none of note'}; "
                f"cpu backend path: {path}."
                + (f" Each cpu route's floor is its path's FMA rate (TFLOP/s): {floors}."
                   if floors else "")]


def _route_name(record) -> str:
    backend = record["backend"]
    if "resolved_backend" in record:
        backend += f" ({record['resolved_backend']})"
    elif backend == "cpu" and record.get("cpu_path"):
        backend += f" ({record['cpu_path']})"
    return f"{backend}/{record['estimator']}"


def _headline(document: dict) -> list[str]:
    """One line per pair of precisions on the same problem: the fwd+bwd time ratios, then
    the same routes' speedups over the reference at ieee."""
    by_pair = defaultdict(list)
    for ratio in document.get("precision_ratios", []):
        by_pair[(ratio["case"], ratio["versus"], ratio["precision"])].append(ratio)
    ieee_records = {(r["case"]["name"], r["backend"], r["estimator"]): r
                    for r in document["cases"]}
    lines = []
    for (case, versus, precision), ratios in by_pair.items():
        both = "forward_backward"
        lines.append(f"- fwd+bwd time, {precision} over ieee ({case} / {versus}): "
                     + ", ".join(f"{r['backend']}/{r['estimator']} "
                                 f"{r['time_ratio'][both]:.2f}" for r in ratios
                                 if both in r["time_ratio"]))
        speedups = []
        for r in ratios:
            ieee = ieee_records.get((versus, r["backend"], r["estimator"]), {})
            speedup = ieee.get("speedup_vs_reference", {}).get(both)
            if speedup:
                speedups.append(f"{r['backend']}/{r['estimator']} {speedup:.2f}x")
        if speedups:
            lines.append(f"- fwd+bwd speedup over the reference at ieee ({versus}): "
                         + ", ".join(speedups))
    return ["", *lines] if lines else []


def markdown(document: dict) -> str:
    """A table per case: medians in ms, fwd+bwd TFLOP/s and share of peak, speedup, memory."""
    meta = document["meta"]
    peaks = meta.get("peak_tflops", {})
    sources = meta.get("peak_source", {})
    lines = [f"# ECLoss benchmark, grid `{meta['grid']}` on {meta['device_name']}",
             "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
             f"python {meta['python']}, {meta['threads']} CPU threads, clock: "
             f"{meta['clock']}. `% peak` divides by (TFLOP/s): "
             + "; ".join(f"{p} {v:.3g} ({sources.get(p, '?')})" for p, v in peaks.items())
             + ". GEMM rates measured here: " + _rates(meta.get("matmul_peak_tflops", {}))
             + (f"; FMA rates: {_rates(meta['fma_peak_tflops'])}"
                if meta.get("fma_peak_tflops") else "")
             + ". Times are medians in ms; speedup is the reference's time over the route's "
             "(same run); TFLOP/s counts the useful flops of docs/design.md section 6; over floor is the "
             "time over those flops at the peak; memory is the "
             "peak beyond the inputs for one forward+backward."]
    lines += _cpu_line(meta)
    lines += _headline(document)
    if meta.get("interrupted"):
        lines += ["", "**The run was interrupted; cases after the last one listed are missing.**"]
    by_case = defaultdict(list)
    for record in document["cases"]:
        by_case[record["case"]["name"]].append(record)
    for records in by_case.values():
        lines += ["", "### " + _case_title(records[0]["case"], records[0]["num_templates"]), "",
                  "| route | fwd | bwd | fwd+bwd | speedup fwd+bwd | TFLOP/s | % peak | "
                  "over floor | memory MiB | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for record in records:
            both = "forward_backward"
            speedup = record.get("speedup_vs_reference", {}).get(both)
            rate = record.get("tflops", {}).get(both)
            fraction = record.get("peak_fraction", {}).get(both)
            over_floor = record.get("over_floor", {}).get(both)
            memory = record.get("peak_bytes")
            lines.append(
                f"| {_route_name(record)} | "
                + " | ".join(_milliseconds(record, p) for p in PASSES)
                + f" | {f'{speedup:.2f}x' if speedup else '-'}"
                + f" | {f'{rate:.3g}' if rate else '-'}"
                + f" | {f'{100 * fraction:.1f}' if fraction else '-'}"
                + f" | {f'{over_floor:.2f}x' if over_floor else '-'}"
                + f" | {f'{memory / 2**20:.1f}' if memory is not None else '-'}"
                + f" | {record['status'][:60]} |")
    if document.get("train_step"):
        lines += ["", "### Training step", "",
                  "| model | batch | input | ECLoss backend | step ms | overhead vs no ECLoss "
                  "| status |",
                  "|---|---:|---:|---|---:|---:|---|"]
        for record in document["train_step"]:
            step = record.get("step_ms")
            overhead = record.get("overhead")
            lines.append(
                f"| {record['arch']} | {record['batch']} | {record['input_size']} | "
                f"{record['backend']} | {f'{step:.3g}' if step else '-'} | "
                f"{f'{100 * overhead:+.1f}%' if overhead is not None else '-'} | "
                f"{record['status'][:60]} |")
    return "\n".join(lines) + "\n"


def write_plot(document: dict, path: Path) -> bool:
    """Time (forward+backward) and peak memory against the number of templates, one line per
    route, over the sweep cases. Returns False (and writes nothing) when there is no sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for record in document["cases"]:
        if record["case"]["sweep"] and "timings" in record:
            lines[(record["backend"], record["estimator"])].append(record)
    if not lines:
        return False
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"reference": "black"}  # the baseline stands out; the others take C0, C1, ...
    for (backend, estimator), records in sorted(lines.items()):
        records.sort(key=lambda r: r["num_templates"])
        color = colors.setdefault(backend, f"C{len(colors) - 1}")
        style = {"color": color, "marker": "o",
                 "linestyle": "-" if estimator == "uniform" else "--",
                 "label": f"{backend}/{estimator}"}
        templates = [r["num_templates"] for r in records]
        time_axis.plot(templates, [r["timings"]["forward_backward"]["median_ms"] for r in records],
                       **style)
        with_memory = [r for r in records if r.get("peak_bytes") is not None]
        if with_memory:
            memory_axis.plot([r["num_templates"] for r in with_memory],
                             [max(r["peak_bytes"], 1) / 2**20 for r in with_memory], **style)
    case = next(iter(lines.values()))[0]["case"]
    shape = (f"B={case['batch']}, C={case['channels']}, {case['height']}x{case['width']}, "
             f"{case['dtype']}")
    for axis, label in ((time_axis, "forward+backward, median ms"),
                        (memory_axis, "peak memory beyond inputs, MiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("number of templates N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.set_title(f"Time, {shape}")
    memory_axis.set_title(f"Memory, {shape}")
    time_axis.legend(fontsize=8)
    figure.suptitle(f"ECLoss on {document['meta']['device_name']} ({document['meta']['date']})",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
