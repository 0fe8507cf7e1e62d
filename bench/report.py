"""The bench's output: text tables, one JSON file, PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (markdown pipes, so it pastes into a README as is)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def tables(results: dict[str, Any]) -> str:
    out: list[str] = []
    if "overhead" in results:
        o = results["overhead"]
        rows = [
            [name, s["median_rate"], s["min_rate"], s["max_rate"], s["median_cpu_us_per_msg"]]
            for name, s in o["summary"].items()
        ]
        out.append(
            f"## 1. Pipeline overhead ({o['n']:,} messages, median of {o['rounds']} alternating "
            f"runs, model: {results['meta']['overhead_model']})\n"
        )
        out.append(table(["system", "msg/s", "min", "max", "CPU us/msg"], rows))
        out.append(
            f"\nratio worker/baseline: cache off {o['ratio_cache_off']:.3f} "
            f"(per round {o['ratio_cache_off_per_round']}), cache on {o['ratio_cache_on']:.3f}; "
            f"bare Faust agent/baseline {o['ratio_faust_floor']:.3f}, worker (cache off)/bare "
            f"Faust agent {o['ratio_cache_off_to_floor']:.3f}\n"
        )
    if "latency" in results:
        lat = results["latency"]
        out.append(
            f"## 2. Latency under load (model: {results['meta']['model']}, "
            f"{_knobs(lat['settings'])})\n\ncapacity: {lat['capacity']:,.0f} msg/s sustained "
            f"at a steady rate (closed loop: {lat['closed_loop_capacity']:,.0f} msg/s); probes: "
            + ", ".join(
                f"{p['offered_rate']:,.0f} {'ok' if p['keeps_up'] else 'behind'}"
                for p in lat["probes"]
            )
            + "\n"
        )
        rows = []
        for r in lat["rows"]:
            m = r["mean_ms"]
            rows.append(
                [
                    f"{r['load']:.0%}",
                    r["offered_rate"],
                    r["samples"],
                    r["p50_ms"],
                    r["p95_ms"],
                    r["p99_ms"],
                    m["batch_wait"],
                    m["model"],
                    m["worker"],
                    m["inbound"],
                    m["outbound"],
                    r["mean_batch"],
                    r["p99_part_ms"]["overhead"],
                    r.get("budget_ms"),
                    r.get("within_budget"),
                ]
            )
        out.append(
            table(
                [
                    "load",
                    "msg/s",
                    "n",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "wait",
                    "model",
                    "worker",
                    "inbound",
                    "outbound",
                    "batch",
                    "overhead p99",
                    "budget",
                    "p99 ok",
                ],
                rows,
            )
        )
        out.append(
            "\n(wait, model, worker, inbound, outbound: mean ms of the batch wait, the generate "
            "call, the rest of the worker, Kafka into the worker, verdict out to the bench; "
            "batch: mean batch size; overhead p99: p99 of end to end minus the message's own "
            "batch wait and model time; budget: max_wait_ms + the stand-in's cost of a full batch "
            "+ 50 ms, the target for p99)\n"
        )
    if "batching" in results:
        b = results["batching"]
        out.append(
            f"## 3. Batching (latency at {b['offered_rate']:,.0f} msg/s offered; capacity: closed "
            "loop; overloaded: capacity below the offered rate, or latency grew during the run)\n"
        )
        rows = [
            [
                r["max_batch_size"],
                r["max_wait_ms"],
                r["max_in_flight"],
                r["capacity"],
                r["p50_ms"],
                r["p99_ms"],
                r.get("mean_batch"),
                r["overloaded"],
            ]
            for r in b["rows"]
        ]
        out.append(
            table(
                [
                    "max_batch_size",
                    "max_wait_ms",
                    "max_in_flight",
                    "capacity msg/s",
                    "p50 ms",
                    "p99 ms",
                    "mean batch",
                    "overloaded",
                ],
                rows,
            )
        )
        out.append("")
    if "cache" in results:
        c = results["cache"]
        out.append(
            "## 4. Cache and dedupe (saturation, repeats from a hot set of 50 texts; model: "
            f"{results['meta']['model']}, {_knobs(c['settings'])}: the model is the "
            "bottleneck)\n"
        )
        rows = [
            [
                "on" if r["cache"] else "off",
                f"{r['repeat_fraction']:.0%}",
                r["messages"],
                r["model_calls_avoided"],
                f"{r['avoided_fraction']:.1%}",
                r["cache_hits"],
                r["deduped"],
                r["rate"],
                r["throughput_gain"],
            ]
            for r in c["rows"]
        ]
        out.append(
            table(
                [
                    "cache",
                    "repeats",
                    "messages",
                    "calls avoided",
                    "avoided",
                    "cache hits",
                    "deduped",
                    "msg/s",
                    "gain",
                ],
                rows,
            )
        )
        out.append("")
    if "utilisation" in results:
        from bench import report_utilisation

        out.append(report_utilisation.text(results["utilisation"]))
    return "\n".join(out)


def _knobs(settings: dict[str, Any]) -> str:
    return (
        f"max_batch_size {settings['batch_max_size']}, "
        f"max_wait_ms {settings['batch_max_wait_ms']}, "
        f"max_in_flight {settings['batch_max_in_flight']}"
    )


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "overhead" in results:
        o = results["overhead"]
        names = list(o["summary"])
        med = [o["summary"][n]["median_rate"] for n in names]
        lo = [m - o["summary"][n]["min_rate"] for n, m in zip(names, med, strict=True)]
        hi = [o["summary"][n]["max_rate"] - m for n, m in zip(names, med, strict=True)]
        fig, ax = plt.subplots(figsize=(7, 4))
        colours = ["#888", "#b84", "#3a7", "#37a"][: len(names)]
        ax.bar(names, med, yerr=[lo, hi], capsize=6, color=colours)
        ax.set_ylabel("messages/s (end to end)")
        ax.set_title(
            f"Pipeline overhead, {o['n']:,} messages: worker/baseline = "
            f"{o['ratio_cache_off']:.2f} (cache off), {o['ratio_cache_on']:.2f} (on)"
        )
        save(fig, "overhead.png")

    if "latency" in results:
        lat = results["latency"]
        rows = lat["rows"]
        labels = [f"{r['load']:.0%}\n{r['offered_rate']:.0f}/s" for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, mark in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
            ax1.plot(labels, [r[key] for r in rows], mark, label=key[:3])
        if rows and "budget_ms" in rows[0]:
            ax1.plot(labels, [r["budget_ms"] for r in rows], "k--", label="p99 budget")
        ax1.set_ylabel("end-to-end latency, ms")
        ax1.set_xlabel("offered load")
        ax1.legend()
        ax1.set_title(f"Latency under load (capacity {lat['capacity']:.0f} msg/s)")
        bottom = [0.0] * len(rows)
        for part, color in (
            ("batch_wait", "#e9a"),
            ("model", "#37a"),
            ("worker", "#3a7"),
            ("inbound", "#aaa"),
            ("outbound", "#ccc"),
        ):
            vals = [r["mean_ms"][part] for r in rows]
            ax2.bar(labels, vals, bottom=bottom, label=part, color=color)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax2.set_ylabel("mean ms")
        ax2.set_title("Where the time goes (mean)")
        ax2.legend()
        save(fig, "latency.png")

    if "batching" in results:
        b = results["batching"]
        d = b["default"]
        keys = ("max_batch_size", "max_wait_ms", "max_in_flight")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, key in zip(axes, keys, strict=True):
            # the rows where only `key` differs from the default configuration
            rows = sorted(
                (r for r in b["rows"] if all(r[k] == d[k] for k in keys if k != key)),
                key=lambda r: r[key],
            )
            xs = [r[key] for r in rows]
            ax.plot(xs, [r["capacity"] for r in rows], "o-", color="#37a")
            ax.set_xlabel(key)
            ax.set_ylabel("capacity, msg/s", color="#37a")
            twin = ax.twinx()
            ok = [r for r in rows if not r["overloaded"]]
            twin.plot([r[key] for r in ok], [r["p99_ms"] for r in ok], "^-", color="#c44")
            twin.set_ylabel(f"p99 ms at {b['offered_rate']:.0f} msg/s", color="#c44")
            for r in rows:
                if r["overloaded"]:
                    ax.annotate("overloaded", (r[key], r["capacity"]), fontsize=8, rotation=30)
            if key != "max_wait_ms":
                ax.set_xscale("log", base=2)
            ax.set_title(f"capacity and p99 vs {key}")
        save(fig, "batching.png")

    if "cache" in results:
        rows = results["cache"]["rows"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for on, color in ((True, "#37a"), (False, "#c84")):
            sel = sorted((r for r in rows if r["cache"] == on), key=lambda r: r["repeat_fraction"])
            xs = [r["repeat_fraction"] * 100 for r in sel]
            name = "cache on" if on else "cache off (dedupe only)"
            ax1.plot(xs, [r["avoided_fraction"] * 100 for r in sel], "o-", color=color, label=name)
            ax2.plot(xs, [r["rate"] for r in sel], "o-", color=color, label=name)
        ax1.set_xlabel("messages repeating a hot text, %")
        ax1.set_ylabel("model calls avoided, %")
        ax1.legend()
        ax2.set_xlabel("messages repeating a hot text, %")
        ax2.set_ylabel("throughput at saturation, msg/s")
        ax2.legend()
        ax1.set_title("Model calls avoided")
        ax2.set_title("Throughput")
        save(fig, "cache.png")
    if "utilisation" in results:
        from bench import report_utilisation

        written.extend(report_utilisation.plot(results["utilisation"], out))
    return written
