"""Tables of the benchmark's results: text for the terminal, Markdown for the README, flat figures for tests."""

from __future__ import annotations

import math
from typing import Any

CONTENDERS = {
    "a": "aiokafka consumer, records discarded (client ceiling)",
    "b": "aiokafka consumer + msgspec decode of each value",
    "c": "Quix Streams, whole job (consume, batch per key, POST)",
    "d": "stream run, whole job",
}
METRICS = (  # key, heading, format, higher is better
    ("steady_samples_per_s", "steady samples/s", "{:,.0f}", True),
    ("startup_samples_per_s", "samples/s incl. start-up", "{:,.0f}", True),
    ("steady_cpu_s_per_million", "CPU s / M samples, steady", "{:.2f}", False),
    ("cpu_s_per_million", "CPU s / M samples incl. start-up", "{:.2f}", False),
    ("peak_rss_bytes", "peak RSS MiB", "{:,.0f}", False),
)
WORKLOADS = {
    "random": "each event from a random (user, data type): the worst case for batching",
    "sessions": "phones syncing in sessions of 30-300 samples, ~50 sessions at a time",
}
# The performance issue's targets for (d): (workloads, other contender, metric, ">=" or "<=", bound on d / other).
TARGETS = (
    (("sessions",), "a", "steady_samples_per_s", ">=", 0.5),
    (("sessions",), "a", "steady_cpu_s_per_million", "<=", 2.0),
    (("random",), "a", "steady_samples_per_s", ">=", 0.3),
    (("random",), "a", "steady_cpu_s_per_million", "<=", 4.0),
    (("random", "sessions"), "c", "steady_samples_per_s", ">=", 4.0),
    (("random", "sessions"), "c", "steady_cpu_s_per_million", "<=", 0.25),
)
_INCL_STARTUP = {"steady_samples_per_s": "startup_samples_per_s", "steady_cpu_s_per_million": "cpu_s_per_million"}
_TARGET_WORDS = {"steady_samples_per_s": "samples/s", "steady_cpu_s_per_million": "CPU s per M samples"}


def _fmt(key: str, value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key.endswith("_bytes"):
        value = value / 2**20
    return pattern.format(value)


def ratios(contenders: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """(d) divided by each other contender, metric by metric (only where both have figures)."""
    d = contenders.get("d", {})
    out: dict[str, dict[str, float]] = {}
    if "error" in d or not d:
        return out
    for other in ("a", "b", "c"):
        o = contenders.get(other)
        if not o or "error" in o:
            continue
        out[f"d_over_{other}"] = {key: d[key] / o[key] for key, *_ in METRICS if o.get(key)}
    return out


def targets(workload: str, contenders: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for this workload, each with (d)'s measured ratio (steady and incl. start-up) and
    whether it holds (judged on the steady ratio; None when a contender is missing or failed)."""
    out = []
    d = contenders.get("d") or {}
    for workloads, other, metric, op, bound in TARGETS:
        if workload not in workloads:
            continue
        o = contenders.get(other) or {}
        measured = startup = holds = None
        if "error" not in d and "error" not in o and d.get(metric) and o.get(metric):
            measured = d[metric] / o[metric]
            incl = _INCL_STARTUP[metric]
            startup = d[incl] / o[incl] if d.get(incl) and o.get(incl) else None
            holds = measured >= bound if op == ">=" else measured <= bound
        sign = "≥" if op == ">=" else "≤"
        out.append({"target": f"(d) {sign} {bound:g} x ({other}), {_TARGET_WORDS[metric]}", "against": other,
                    "metric": metric, "op": op, "bound": bound, "measured": measured,
                    "measured_incl_startup": startup, "holds": holds})
    return out


def workloads(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each workload's throughput results; results from before the workloads hold the random one only."""
    if "workloads" in results:
        return results["workloads"]
    if "contenders" in results:
        return {"random": {k: results[k] for k in ("produce", "contenders", "ratios") if k in results}}
    return {}


def ceiling(results: dict[str, Any]) -> dict[str, Any]:
    """The contenders of the run to compare other runs with (the random workload's, else the first one's)."""
    runs = workloads(results)
    for name in ("random", *runs):
        if name in runs:
            return runs[name].get("contenders", {})
    return {}


def batch_size(result: dict[str, Any]) -> float | None:
    """Mean samples per request of (c)/(d): the service's own histogram when it has one, else the sandbox's."""
    mean = (result.get("service_metrics") or {}).get("batch_size_mean") or result.get("samples_per_request")
    requests = (result.get("sandbox") or {}).get("requests")
    if not mean and requests and result.get("samples"):  # results from before samples_per_request was kept
        mean = result["delivered_fraction"] * result["samples"] / requests
    return mean


def figures(results: dict[str, Any]) -> dict[str, float]:
    """Every headline figure as one flat name -> number map (each must be a positive, finite number).

    The random workload's figures are named as before the workloads (a.steady_samples_per_s,
    ratio.d_over_a.steady_samples_per_s); another workload's carry its name first (sessions.a.…,
    sessions.ratio.d_over_a.…)."""
    out: dict[str, float] = {}
    for workload, run in workloads(results).items():
        prefix = "" if workload == "random" else f"{workload}."
        for name, result in run.get("contenders", {}).items():
            if "error" in result:
                continue
            for key, *_ in METRICS:
                out[f"{prefix}{name}.{key}"] = result[key]
            if name in ("c", "d") and batch_size(result):
                out[f"{prefix}{name}.samples_per_request"] = batch_size(result)
        for pair, values in run.get("ratios", {}).items():
            for key, value in values.items():
                out[f"{prefix}ratio.{pair}.{key}"] = value
    latency = results.get("latency", {})
    if latency and "error" not in latency:
        for key in ("p50_seconds", "p99_seconds", "window_seconds", "measured_fraction"):
            out[f"latency.{key}"] = latency[key]
    dead = results.get("dead_letters", {})
    if dead and "error" not in dead:
        for key in ("dead_letters_per_s", "cpu_s_per_million", "peak_rss_bytes", "log_lines"):
            out[f"dead_letters.{key}"] = dead[key]
        for key, value in dead_letters_vs_a(dead, ceiling(results)).items():
            out[f"ratio.dead_letters_over_a.{key}"] = value
    keys = results.get("keys", {})
    if keys and "error" not in keys:
        for key in ("bytes_per_buffered_sample", "bytes_per_key", "buffered_samples", "buffers"):
            out[f"keys.{key}"] = keys[key]
    for row in results.get("batcher_micro", []):
        out[f"batcher.{row['keys']}.us_per_record"] = row["us_per_record"]
    for key, value in results.get("decode_micro", {}).items():
        out[f"decode.{key}"] = value
    ledger = results.get("ledger_restore", {})
    if ledger and "error" not in ledger:
        for key in ("read_seconds", "restore_seconds", "ns_per_sample"):
            out[f"ledger.{key}"] = ledger[key]
    return out


def contender_line(name: str, r: dict[str, Any]) -> str:
    t100 = f"{r['t100_s']:.1f}s" if r.get("t100_s") is not None else f"{r['delivered_fraction']:.2%} at end"
    return (f"({name}) steady {r['steady_samples_per_s']:,.0f}/s, incl. start-up {r['startup_samples_per_s']:,.0f}/s, "
            f"CPU {r['cpu_s_per_million']:.2f} s/M, peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, "
            f"first {r['first_s']:.1f}s, 99% {r['t99_s']:.1f}s, 100% {t100}")


def latency_line(r: dict[str, Any]) -> str:
    produced = r["producer"]
    return (f"p50 {r['p50_seconds'] * 1000:,.0f} ms, p99 {r['p99_seconds'] * 1000:,.0f} ms, max "
            f"{r['max_seconds'] * 1000:,.0f} ms (window {r['window_seconds']:g} s, {r['users']:,} users; "
            f"{r['measured_samples']:,} samples = {r['measured_fraction']:.1%} of {produced['produced']:,} "
            f"produced at {produced['rate']:,.0f}/s)")


def dead_letters_vs_a(r: dict[str, Any], contenders: dict[str, Any] | None) -> dict[str, float]:
    """The dead-letter run against (a) reading records (when (a) ran): dead letters/s over (a)'s steady
    records/s, and CPU per dead letter over (a)'s steady CPU per record."""
    a = (contenders or {}).get("a")
    if not a or "error" in a or not a.get("steady_samples_per_s") or not a.get("steady_cpu_s_per_million"):
        return {}
    return {"per_s": r["dead_letters_per_s"] / a["steady_samples_per_s"],
            "cpu_s_per_million": r["cpu_s_per_million"] / a["steady_cpu_s_per_million"]}


def dead_letters_line(r: dict[str, Any], contenders: dict[str, Any] | None = None) -> str:
    vs_a = dead_letters_vs_a(r, contenders)
    against = (f"; vs (a) reading records: {vs_a['per_s']:.2f} x the rate, {vs_a['cpu_s_per_million']:.1f} x the CPU"
               if vs_a else "")
    events = ", ".join(f"{k} {v}" if v > 1 else k for k, v in r.get("log_events_incl_stop", {}).items())
    return (f"{r['written']:,.0f} dead letters ({r['dlq_records']:,} in the DLQ) in {r['seconds']:.1f} s from the "
            f"first record consumed: {r['dead_letters_per_s']:,.0f}/s ({r['dead_letters_per_s_incl_startup']:,.0f}/s "
            f"incl. start-up), CPU {r['cpu_s_per_million']:.2f} s/M ({r['cpu_s_per_million_incl_startup']:.2f} "
            f"incl. start-up), peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, {r['log_lines']} log lines until "
            f"written ({r['log_lines_incl_stop']} incl. stop: {events}){against}")


def keys_line(r: dict[str, Any]) -> str:
    grown = r["rss_growth_bytes"] / 2**20
    return (f"{r['buffered_samples']:,.0f} samples in {r['buffers']:,.0f} buffers: RSS +{grown:,.0f} MiB = "
            f"{r['bytes_per_buffered_sample']:,.0f} B/sample, {r['bytes_per_key']:,.0f} B/key")


def _rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """One workload's contenders table and ratio table."""
    head = ["contender", *(h for _, h, _, _ in METRICS), "samples / request", "99 % at s"]
    rows = []
    for name, label in CONTENDERS.items():
        r = results.get("contenders", {}).get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append([f"({name}) {label}", f"FAILED: {r['error'][:80]}", *[""] * (len(METRICS) + 1)])
            continue
        label += " (profiled)" if r.get("profiled") else ""
        label += "".join(f", {k}={v}" for k, v in r["settings"].items()) if isinstance(r.get("settings"), dict) else ""
        per_request = _fmt("", batch_size(r), "{:,.1f}") if name in ("c", "d") else "-"
        rows.append([f"({name}) {label}", *(_fmt(k, r.get(k), f) for k, _, f, _ in METRICS), per_request,
                     f"{r['t99_s']:.1f}"])
    ratio_head = ["ratio", *(h for _, h, _, _ in METRICS)]
    ratio_rows = []
    for pair, values in results.get("ratios", {}).items():
        other = pair.rsplit("_", 1)[1]
        ratio_rows.append([f"(d) / ({other})", *(f"{values[k]:.2f}" if k in values else "-" for k, *_ in METRICS)])
    return head, rows, ratio_head, ratio_rows


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    rule = "|" + "|".join("---" if i in left else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(results: dict[str, Any]) -> str:
    m, p, code = results["machine"], results.get("packages", {}), results.get("code", {})
    load = ", ".join(f"{x:.1f}" for x in m.get("load_average", []))
    version = f"stream at {code.get('commit', '?')}" + (" + uncommitted changes" if code.get("uncommitted") else "")
    if code.get("changed_during_run"):
        version += " (CHANGED DURING THE RUN: mixed figures)"
    return (f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['kafka']}, aiokafka {p.get('aiokafka')}, "
            f"msgspec {p.get('msgspec')}, quixstreams {p.get('quixstreams')} (librdkafka {p.get('librdkafka', '-')}); "
            f"load average at start {load}; {version}")


def _workload_title(name: str, run: dict[str, Any], params: dict[str, Any]) -> str:
    produce = run.get("produce") or {}
    title = f"{name} workload: {run.get('description') or WORKLOADS.get(name, '')}"
    if produce:
        users, population = produce.get("users"), params.get("users", 0)
        who = f"{population:,} users" if not users or users == population else f"{users:,} of {population:,} users"
        title += (f"; topic of {produce['records']:,} single-sample events of {who}, "
                  f"{params.get('partitions')} partitions (produced in {produce['produce_seconds']:.1f} s)")
    return title


def _workload_lines(run: dict[str, Any]) -> list[str]:
    """What the contenders tables do not show: how (d) batched."""
    d = run.get("contenders", {}).get("d") or {}
    metrics, sandbox = d.get("service_metrics") or {}, d.get("sandbox") or {}
    if "error" in d or not (metrics.get("batch_size_mean") or sandbox.get("requests")):
        return []
    parts = []
    if metrics.get("batch_size_mean"):
        median = metrics.get("batch_size_p50_le")
        parts.append(f"{metrics['batch_size_mean']:,.1f} samples a request on average (stream_batch_size_samples: "
                     f"{metrics['batch_size_requests']:,.0f} requests" + (f", median ≤ {median:g}" if median else "")
                     + ")")
    if sandbox.get("requests"):
        parts.append(f"the API saw {sandbox['requests']:,} requests of {sandbox.get('min_batch')}-"
                     f"{sandbox.get('max_batch')} samples")
    return ["(d) batches: " + "; ".join(parts)]


def _targets_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "target (performance issue)", "measured, steady", "measured incl. start-up", "holds?"]
    rows = []
    for name, run in workloads(results).items():
        for t in run.get("targets") or targets(name, run.get("contenders", {})):
            holds = {True: "yes", False: "no", None: f"not measured (({t['against']}) or (d) missing)"}[t["holds"]]
            rows.append([name, t["target"], _fmt("", t["measured"], "{:.2f} x"),
                         _fmt("", t["measured_incl_startup"], "{:.2f} x"), holds])
    return head, rows


def _extra_lines(results: dict[str, Any]) -> list[str]:
    out = []
    latency = results.get("latency")
    if latency:
        out.append("latency (`stream run`, Kafka timestamp -> API acceptance): "
                   + (latency_line(latency) if "error" not in latency else "FAILED: " + latency["error"]))
    dead = results.get("dead_letters")
    if dead:
        out.append(f"dead letters ({dead.get('dead_letters', 0):,} invalid events of "
                   f"{dead.get('users', 0):,} users, one `invalid_value` dead letter each, `stream run`): "
                   + (dead_letters_line(dead, ceiling(results)) if "error" not in dead
                      else "FAILED: " + dead["error"]))
    keys = results.get("keys")
    if keys:
        out.append(f"many keys ({keys.get('keys', 0):,} users of 1-2 samples, nothing sendable): "
                   + (keys_line(keys) if "error" not in keys else "FAILED: " + keys["error"]))
    for name, run in workloads(results).items():
        top = run.get("contenders", {}).get("d", {}).get("profile_top")
        if top:
            out.append(f"where `stream run` spends its own time on the {name} workload (cProfile, share of all "
                       "profiled time): " + ", ".join(f"{row['function']} {row['share']:.0%}" for row in top[:15]))
    micro = results.get("batcher_micro")
    if micro:
        out.append("Batcher.add_samples + poll per record: " + ", ".join(
            f"{row['keys']:,} keys {row['us_per_record']:.2f} us (gc off {row['us_per_record_gc_off']:.2f})"
            for row in micro))
    decode = results.get("decode_micro")
    if decode:
        out.append(decode_line(decode))
    ledger = results.get("ledger_restore")
    if ledger:
        out.append(ledger_line(ledger) if "error" not in ledger else "ledger restore: FAILED: " + ledger["error"])
    return out


def ledger_line(ledger: dict[str, float]) -> str:
    return ("ledger restore ({samples:,} remembered samples, {mb:.1f} MB in Kafka): read {read_seconds:.2f} s, read "
            "and loaded {restore_seconds:.2f} s = {ns_per_sample:.0f} ns a sample, {resident_mb:.0f} MB resident"
            ).format(mb=ledger["bytes"] / 1e6, **ledger)


def decode_line(decode: dict[str, float]) -> str:
    return ("decode_record per sample: single event {single_us_per_sample:.2f} us, in a bundle of 100 "
            "{bundle_100_us_per_sample:.2f} us, single event with an escape (detailed path) "
            "{single_escaped_us_per_sample:.2f} us").format(**decode)


def _run_line(results: dict[str, Any]) -> str | None:
    phases = results.get("phase_seconds")
    if not phases:
        return None
    total = f"{results['seconds']:,.0f} s" if results.get("seconds") else "?"
    return f"run time {total} (the broker's start-up aside): " + ", ".join(f"{k} {v:,.0f} s" for k, v in phases.items())


def table(results: dict[str, Any]) -> str:
    parts = ["machine: " + _machine_line(results), ""]
    for name, run in workloads(results).items():
        head, rows, ratio_head, ratio_rows = _rows(run)
        parts += [_workload_title(name, run, results.get("params", {})), ""]
        if rows:
            parts += [_text_table(head, rows), ""]
        if ratio_rows:
            parts += [_text_table(ratio_head, ratio_rows), ""]
        parts += [*_workload_lines(run), ""] if _workload_lines(run) else []
    target_head, target_rows = _targets_rows(results)
    if target_rows:
        parts += [_text_table(target_head, target_rows), ""]
    parts += _extra_lines(results)
    parts += [line for line in [_run_line(results)] if line]
    return "\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"Benchmark of {results.get('started', '')}: `{results.get('command', 'python -m bench')}`", "",
             "Machine: " + _machine_line(results), ""]
    for name, run in workloads(results).items():
        head, rows, ratio_head, ratio_rows = _rows(run)
        parts += [f"**{_workload_title(name, run, results.get('params', {}))}**", ""]
        if rows:
            parts += [_md_table(head, rows), ""]
        if ratio_rows:
            parts += [_md_table(ratio_head, ratio_rows), ""]
        parts += [*(f"- {line}" for line in _workload_lines(run)), ""] if _workload_lines(run) else []
    target_head, target_rows = _targets_rows(results)
    if target_rows:
        parts += ["**Targets** (the performance issue; ratios of (d) to the contender named, judged on the steady "
                  "figures)", "", _md_table(target_head, target_rows, left=(0, 1, 4)), ""]
    parts += [f"- {line}" for line in _extra_lines(results)]
    parts += [f"- {line}" for line in [_run_line(results)] if line]
    return "\n".join(parts) + "\n"
