"""The summary table of a ``run_all`` result (Markdown), for docs/bench/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.servers import SERVER_TEXT

START, END = "<!-- results:start -->", "<!-- results:end -->"


def table(result: dict[str, Any]) -> str:
    """Timesteps/s and p99 per (sessions, chunk) row and (server, transport) column."""
    setup = result["setup"]
    columns = [(s, t) for s in setup["servers"] for t in setup["transports"]]
    cells = {(p["server"], p["transport"], p["sessions"], p["chunk"]): p for p in result["points"]}
    raw = {(r["sessions"], r["chunk"]): r for r in result["raw_ort"]}
    head = ["sessions", "steps/request", *(f"{SERVER_TEXT[s]}, {t}" for s, t in columns), "raw ORT (B×T)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sessions in setup["sessions"]:
        for chunk in setup["chunks"]:
            row = [str(sessions), str(chunk)]
            for server, transport in columns:
                p = cells.get((server, transport, sessions, chunk))
                if p is None or "skipped" in p:
                    row.append("—")
                else:
                    errors = f", {p['errors']} errors" if p["errors"] else ""
                    row.append(f"{p['steps_per_s']:,.0f} (p99 {p['p99_ms']:.1f} ms{errors})")
            r = raw.get((sessions, chunk))
            row.append(f"{r['steps_per_s']:,.0f} ({r['batch']}×{r['steps']})" if r else "—")
            lines.append("| " + " | ".join(row) + " |")
    m = result["machine"]
    return (
        f"Timesteps/s (p99 latency), closed loop, {setup['duration_s']} s per point; {setup['model']}; "
        f"{m['cpus']} × {m['cpu']}, ONNX Runtime {m['onnxruntime']}, Redis {m['redis_server']}; "
        "the load generator runs on the same machine.\n\n" + "\n".join(lines) + "\n"
    )


def write_summary(result: dict[str, Any], docs: Path) -> None:
    """``summary.md``, and the same table between the result markers of ``README.md`` if any."""
    text = table(result)
    (docs / "summary.md").write_text(text)
    readme = docs / "README.md"
    if readme.exists():
        page = readme.read_text()
        if START in page and END in page:
            before, rest = page.split(START, 1)
            after = rest.split(END, 1)[1]
            readme.write_text(f"{before}{START}\n{text}{END}{after}")
