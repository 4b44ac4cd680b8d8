"""The printed tables and the JSON file."""

import json
from collections.abc import Sequence
from pathlib import Path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def b1_text(b1: dict) -> str:
    rows = [
        (r["shape"], r["tasks"], r["ours_ms_per_task"], r["raw_ms_per_task"], r["ratio"], f"<= {r['target']}", r["met"],
         r["floor_ms_per_task"], r["floor_ratio"], r["ours_over_floor"])
        for r in b1["rows"]
    ]  # fmt: skip
    headers = ("shape", "tasks", "ours ms/task", "raw ms/task", "ratio", "target", "met?", "floor ms/task",
               "floor / raw", "ours / floor")  # fmt: skip
    return "\n".join(
        [
            f"B1 dispatch overhead on {b1['broker']} (median of {b1['repeats']} runs)",
            table(headers, rows),
            f"workers: {b1['workers']}",
            f"measured: {b1['measured']}",
        ]
    )


def b6_text(b6: dict) -> str:
    rows = [
        (r["shape"], r["tasks"], r["off_ms_per_task"], r["on_ms_per_task"], f"{r['ratio']:.3f}", f"<= {r['target']}",
         r["met"], r["exported_ms_per_task"], f"{r['exported_ratio']:.3f}")
        for r in b6["rows"]
    ]  # fmt: skip
    headers = ("shape", "tasks", "off ms/task", "on ms/task", "on / off", "target", "met?", "exported ms/task",
               "exported / off")  # fmt: skip
    return "\n".join(
        [
            f"B6 observability cost (median of {b6['repeats']} runs per mode, in alternating blocks)",
            table(headers, rows),
            "off: METRICS_ENABLED=false, console logs, OTEL_SDK_DISABLED=true; on: metrics (multiprocess files, "
            "served), JSON logs, the tracing SDK on without an exporter; exported: as on, every span recorded and "
            "exported over OTLP/HTTP to a local sink; all at log level INFO",
        ]
    )


STREAM_COLUMNS = ("clients", "events", "deliveries", "delay_p50_ms", "delay_p95_ms", "rss_idle_mb",
                  "rss_connected_mb", "rss_after_mb")  # fmt: skip
STREAM_HEADERS = ("stream clients", "events", "deliveries", "commit->arrival p50 ms", "p95 ms", "RSS idle MB",
                  "RSS connected MB", "RSS after MB")  # fmt: skip


def b7_text(b7: dict) -> str:
    page, streams = b7["page"], b7["streams"]
    sizes = sorted(page["ms"], key=int)
    return "\n".join(
        [
            "B7 console and event streams",
            table(
                ("session page", *(f"{size} tasks ms" for size in sizes), f"{sizes[-1]} / {sizes[0]}"),
                [("server render (median)", *(page["ms"][size] for size in sizes), f"{page['ratio']:.2f}")],
            ),
            table(STREAM_HEADERS, [[streams[key] for key in STREAM_COLUMNS]]),
            "one ASGI worker (gunicorn + uvicorn) serving every client the tenant's stream; the clients run in the "
            "bench process on the same 2 cores",
        ]
    )


def b2_text(b2: dict) -> str:
    rows = [
        (r["shape"], r["tasks"], r["critical_path_s"], r["makespan_s"], f"{r['ratio']:.3f}",
         r["end_to_end_s"], f"{r['end_to_end_ratio']:.3f}", f"<= {r['target']}", r["met"])
        for r in b2["rows"]
    ]  # fmt: skip
    headers = (
        "shape",
        "tasks",
        "critical path s",
        "makespan s",
        "ratio",
        "end-to-end s",
        "e2e ratio",
        "target",
        "met?",
    )
    return "\n".join(
        [
            f"B2 makespan (unit {b2['unit_s']:g} s, median of {b2['repeats']} runs)",
            table(headers, rows),
            f"workers: {b2['workers']}",
            f"makespan: {b2['makespan']}",
            f"end-to-end: {b2['end_to_end']}",
        ]
    )


def b3_text(b3: dict) -> str:
    latency = b3["uncontended_us"]
    rows = [
        (
            name,
            us,
            "" if name == "ours" else b3["ratios"][name],
            f"<= {b3['target_ratio']}" if name == "redis-py Lock" else "",
        )
        for name, us in latency.items()
    ]
    contended = b3["contended"]
    return "\n".join(
        [
            "B3 lock",
            table(("lock", "acquire+release us", "ours / this", "target"), rows),
            f"met (ours / redis-py Lock): {fmt(b3['met_ratio'])}",
            f"contended: {contended['processes']} processes, {contended['acquisitions']} acquisitions, "
            f"{contended['per_second']} per second, {contended['overlaps']} overlaps",
            f"FIFO order kept: {b3['fifo_percent']:.0f}% (target {b3['target_fifo_percent']:.0f}%): "
            f"{fmt(b3['fifo_percent'] >= b3['target_fifo_percent'])}",
            f"measured: {b3['measured']}",
        ]
    )


def profile_text(profile: dict) -> str:
    rows = [
        (r["shape"], r["node"], r["tasks"], r["queries"], r["ms_per_task"], r["sql_ms_per_task"])
        for r in profile["rows"]
    ]
    lines = [
        "Where our per-task time goes: SQL per execute_task",
        table(("shape", "node", "tasks", "queries", "ms/task", "SQL ms/task"), rows),
        f"measured: {profile['measured']}",
    ]
    for r in profile["rows"]:
        if r["node"] in ("others", "member"):
            lines.append(f"statements of a typical {r['shape']} {r['node']} task:")
            lines += [f"  {b['count']:3d} x {b['ms']:6.2f} ms  {label}" for label, b in r["breakdown"].items()]
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> str:
    text = json.dumps(results, indent=2)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text + "\n")
    return text


def b4_text(b4: dict) -> str:
    levels = b4["levels"]
    growth = [f"growth {level}" for level in levels[1:]]
    headers = (
        "what",
        *(f"{level:,} sessions" for level in levels),
        *(f"growth x{level // levels[0]:,}" for level in levels[1:]),
        "target",
        "met?",
    )
    rows = [
        (r["what"], *(r[str(level)] for level in levels), *(r[g] for g in growth), f"<= {b4['target']}", r["met"])
        for r in b4["rows"]
    ]
    stored = ", ".join(
        f"{level:,}: {b4['tasks'][str(level)]:,} tasks in {b4['generated'][str(level)]:g} s" for level in levels
    )
    return "\n".join(
        [
            f"B4 cost against history (ms unless said; growth = at N sessions / at {levels[0]:,}; "
            "met? is judged at 100,000)",
            table(headers, rows),
            f"stored history: {stored}; on disk, with indexes: {b4['bytes_per_session']:,} bytes per "
            f"{b4['tasks_per_session']}-task session",
            f"measured: {b4['measured']}",
        ]
    )


def b5_text(b5: dict) -> str:
    headers = ("what", "median", "max", "target", "met?")
    rows = [
        ("calm tenant's wait / one task duration", b5["wait_in_tasks"], b5["wait_in_tasks_max"],
         f"<= {b5['target']:g}", b5["met"]),
        ("flood tasks started during that wait", b5["flood_started_meanwhile"], "-", "-", "-"),
        ("flood's start rate / the agent's best", b5["flood_utilisation"], "-", "-", "-"),
    ]  # fmt: skip
    return "\n".join([f"B5 fair share ({b5['runs']} runs): {b5['setup']}", table(headers, rows)])


def b8_text(b8: dict) -> str:
    rows = [("zero-work shell task", b8["shell_none_ms"], b8["shell_bwrap_ms"], b8["added_ms"],
             f"<= {b8['target_added_ms']:g}", b8["met"])]  # fmt: skip
    starts = b8["opencode_start_ms"]
    if starts:
        added = round(starts["bwrap"] - starts["none"], 1)
        rows.append(("opencode serve start", starts["none"], starts["bwrap"], added, "-", "-"))
    headers = ("what", "without ms", "in the sandbox ms", "added ms", "target", "met?")
    return "\n".join(
        [
            f"B8 sandbox cost (median of {b8['repeats']} tasks, {b8['opencode_repeats']} server starts; "
            f"a workspace of {b8['workspace_files']} files)",
            table(headers, rows),
        ]
        + ([] if starts else ["opencode serve: no binary (make opencode)"])
    )
