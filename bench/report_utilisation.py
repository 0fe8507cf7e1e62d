"""The utilisation scenario's output (`bench.utilisation`): its table, a CSV and a plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from bench.report import table

MIX_WORDS = {
    "pairs": "prompt + response pairs (half the requests prompt-only, cut short by early exit; "
    "half prompt and response, generated in full)",
    "prompts": "prompt-only requests (cut short by early exit)",
}
COLUMNS = [
    "mode",
    "load",
    "offered/s",
    "delivered/s",
    "delivered/capacity",
    "engine done/s",
    "p50 ms",
    "p99 ms",
    "p99 guard ms",
    "engine p99 ms",
    "p99 ratio",
    "engine running",
    "outstanding",
]


def _row(mode: str, r: dict[str, Any]) -> list[Any]:
    return [
        mode,
        f"{r['load']:.0%}",
        r["offered_rate"],
        r["delivered_rate"],
        f"{r['ratio_capacity']:.2f}",
        r.get("engine_done_rate"),
        r["p50_ms"],
        r["p99_ms"],
        r.get("p99_guard_ms"),
        r["engine_p99_ms"],
        f"{r['p99_ratio']:.2f}",
        r["engine_mean_running"],
        r["outstanding_at_end"],
    ]


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "missed")


def goal_lines(u: dict[str, Any]) -> list[str]:
    top = max(u["loads"])
    lines = []
    for mode, g in u["goals"].items():
        parts = []
        if g["saturation_ratio"] is not None:
            parts.append(
                f"at {top:.0%} load it delivers {g['saturation_ratio']:.2f} of the engine's "
                f"capacity (goal >= 0.9: {_verdict(g['saturation_met'])})"
            )
        if g["p99_ratio_at_50"] is not None:
            parts.append(
                f"at 50% load its p99 is {g['p99_ratio_at_50']:.2f}x the engine's own (goal <= "
                f"1.5x: {_verdict(g['p99_met'])})"
            )
        if parts:
            lines.append(f"- {mode}: " + "; ".join(parts))
    return lines


def text(u: dict[str, Any]) -> str:
    cap = u["capacity_run"]
    out = [
        f"## 5. Engine utilisation (simulated engine {u['engine']}, preset {u['preset']}, "
        f"{u['max_sequences']} sequences at most; mix: {MIX_WORDS[u['mix']]}; max_new_tokens "
        f"{u['max_new_tokens']})\n",
        f"engine capacity for this mix, fed directly: {u['capacity']:,.1f} verdicts/s "
        f"({cap['sample']} requests queued at once, {cap['mean_decode_steps']} decode steps per "
        "request on average); levels of "
        f"{u['level_seconds']:g} s back to back, Poisson arrivals (seed {u['seed']}), delivered: "
        f"verdicts received from {u['settle_seconds']:g} s into a level to its end, per second; "
        "latency: produce -> verdict received (service), arrival -> last decode step "
        "(engine alone, same requests, same times)\n",
    ]
    rows = [
        [
            "engine alone",
            f"{r['load']:.0%}",
            r["offered_rate"],
            r["delivered_rate"],
            f"{r['delivered_rate'] / u['capacity']:.2f}",
            r["delivered_rate"],
            r["p50_ms"],
            r["p99_ms"],
            None,
            r["p99_ms"],
            "1.00",
            None,
            r["outstanding_at_end"],
        ]
        for r in u["engine_alone"]
    ]
    for m in u["modes"]:
        rows.extend(_row(m["mode"], r) for r in m["rows"])
    out.append(table(COLUMNS, rows))
    out.append(
        "\n(engine done: sequences the engine finished per second over the level, its own "
        "counter; p99 guard: p99 of the verdict's batch wait + model call (its headers), the "
        "rest of p99 is Kafka, pairing and the wait for the earlier verdicts of its input "
        "partition, which leave in offset order; engine running: mean sequences in the engine "
        "per decode step, of "
        f"{u['max_sequences']}; outstanding: events sent by the level's end and not answered "
        "then, running or queued: about rate x latency while the service keeps up, growing when "
        "it does not)\n"
    )
    out.extend(goal_lines(u))
    noise = [r for m in u["modes"] for r in m["rows"]]
    if noise:
        out.append(
            "\nnoise: load average (1 min) "
            f"{min(r['loadavg_1m'] for r in noise):.2f}-{max(r['loadavg_1m'] for r in noise):.2f}"
            f"; worker CPU {max(r['worker_cpu'] for r in noise):.0%} of a core at most; engine "
            f"steps delivered late by {max(r['engine_lag_mean_ms'] for r in noise):.2f} ms on "
            f"average at most, {max(r['engine_lag_max_ms'] for r in noise):.0f} ms at worst "
            "(the simulated engine keeps its own pace; lateness delays a step's results only)"
        )
    for m in u["modes"]:
        if not m["complete"]:
            out.append(
                f"\n{m['mode']}: {m['sent'] - m['delivered']} of {m['sent']} verdicts still "
                "queued when the bench stopped waiting (overloaded; not lost)"
            )
    out.append("")
    return "\n".join(out)


def write_csv(u: dict[str, Any], path: Path) -> Path:
    keys = [
        "load",
        "offered_rate",
        "delivered_rate",
        "ratio_capacity",
        "engine_done_rate",
        "p50_ms",
        "p99_ms",
        "p99_guard_ms",
        "engine_p99_ms",
        "p99_ratio",
        "engine_mean_running",
        "undelivered",
        "outstanding_at_end",
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", *keys])
        for r in u["engine_alone"]:
            alone = {
                **r,
                "ratio_capacity": round(r["delivered_rate"] / u["capacity"], 3),
                "engine_p99_ms": r["p99_ms"],
                "p99_guard_ms": "",
                "engine_done_rate": r["delivered_rate"],
                "p99_ratio": 1.0,
                "engine_mean_running": "",
            }
            w.writerow(["engine alone", *(alone[k] for k in keys)])
        for m in u["modes"]:
            for r in m["rows"]:
                w.writerow([m["mode"], *(r.get(k, "") for k in keys)])
    return path


def plot(u: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    loads = [r["load"] * 100 for r in u["engine_alone"]]
    ax1.plot(loads, [r["delivered_rate"] for r in u["engine_alone"]], "k--", label="engine alone")
    ax2.plot(loads, [r["p99_ms"] / 1000 for r in u["engine_alone"]], "k--", label="engine alone")
    ax1.axhline(u["capacity"], color="#888", lw=0.8)
    ax1.annotate(
        f"engine capacity {u['capacity']:.1f}/s",
        (loads[-1], u["capacity"]),
        xytext=(0, -12),
        textcoords="offset points",
        ha="right",
        fontsize=8,
    )
    for m, mark in zip(u["modes"], "os^vD<>", strict=False):
        xs = [r["load"] * 100 for r in m["rows"]]
        (line,) = ax1.plot(
            xs, [r["delivered_rate"] for r in m["rows"]], mark + "-", label=m["mode"]
        )
        ax2.plot(xs, [r["p99_ms"] / 1000 for r in m["rows"]], mark + "-", label=m["mode"])
        colour = line.get_color()
        if all("engine_done_rate" in r for r in m["rows"]):
            done = [r["engine_done_rate"] for r in m["rows"]]
            ax1.plot(xs, done, ":", color=colour, label=f"{m['mode']}: engine done")
        if any(r.get("p99_guard_ms") is not None for r in m["rows"]):
            own = [(r.get("p99_guard_ms") or math.nan) / 1000 for r in m["rows"]]
            ax2.plot(xs, own, ":", color=colour, label=f"{m['mode']}: guard's share")
    ax1.set_xlabel("offered load, % of the engine's capacity")
    ax1.set_ylabel("delivered verdicts/s")
    ax1.set_title(f"Throughput on {u['engine']}")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("offered load, % of the engine's capacity")
    ax2.set_ylabel("p99 latency, s")
    ax2.set_yscale("log")
    ax2.set_title("p99 latency (service: produce -> verdict received)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "utilisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path, write_csv(u, out / "utilisation.csv")]
