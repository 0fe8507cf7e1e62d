"""`guardstream bench` / `python -m bench`: the service measured end to end on the local Kafka and
Redis. Prints tables, writes `results.json` and PNG plots into `--out` (default bench/out/).

    guardstream bench                  # everything, ~12 minutes on 2 cores
    guardstream bench --quick          # a smoke run, under two minutes
    guardstream bench --engine hf --model DIR      # on real generation (transformers)
    guardstream bench --engine hf --model tiny     # ... with a tiny random Llama built here
    guardstream bench --scenarios utilisation --out bench/results/utilisation   # issue 17

Scenario 5, utilisation (not in the default set; ~10 minutes), runs the worker on a simulated
in-flight-batching engine (`bench.sim_engine`, preset --util-preset) and compares what the
service delivers, per admission mode, with the engine fed directly (`bench.utilisation`).

The model stand-in (scenarios 2-4 with the replay engine) sleeps a + b * batch_size per batch.
Its defaults, a = 500 ms and b = 3 ms, are a GuardReasoner-1B-sized guess for one H100 with
TensorRT-LLM (see ../shared/notes): GuardReasoner writes ~280 tokens per verdict; a 1B decode
step reads ~2.5 GB of BF16 weights, 0.74 ms at 3.35 TB/s, and the 8B online figure (11 ms per
token against a 4.8 ms roofline) says real steps take ~2.3x their roofline: ~1.7 ms, times ~280
steps = ~0.5 s a batch. The per-sequence share comes from the 8B saturation figure (16.5k output
tokens/s, 500 in / 2000 out) scaled by 6.5x fewer parameters: ~9 us per token per sequence, times
~280 tokens = ~2.6 ms, rounded to 3 ms. Batches overlap up to max_in_flight, as requests do on an
in-flight-batching server.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.data import REPO_ROOT

QUICK: dict[str, Any] = {
    "n": 2000,
    "rounds": 1,
    "warmup": 100,
    "cost_a_ms": 100.0,
    "cost_b_ms": 0.6,
    "in_flight": 4,
    "load_seconds": 3.0,
    "sweep_seconds": 3.0,
    "capacity_seconds": 2.5,
    "probe_seconds": 2.0,
    "probe_start": 0.3,
    "probe_step": 1.5,
    "settle_seconds": 1.0,
    "sweep_sizes": "4",
    "sweep_waits": "5",
    "sweep_in_flight": "",
    "repeat_fractions": "0,0.5",
    "cache_modes": "on",
    "cache_in_flight": 2,
    "util_modes": "batch:32x2,request",
    "util_loads": "0.5,1.2",
    "util_seconds": 6.0,
    "util_settle_seconds": 2.0,
    "util_drain_seconds": 40.0,
    "util_max_new_tokens": 512,
    "util_capacity_sample": 1000,
    "util_warmup_turns": 2,
}
SCENARIOS = ("overhead", "latency", "batching", "cache", "utilisation")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="a smoke run in under two minutes")
    g.add_argument(
        "--scenarios",
        default="overhead,latency,batching,cache",
        help="which to run, comma-separated, of overhead, latency, batching, cache and "
        "utilisation (default: the first four)",
    )
    g.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out", help="output folder")
    g.add_argument(
        "--shared",
        help="GuardReasoner data (default $GUARDSTREAM_SHARED_DIR, else ../shared/guardreasoner)",
    )
    g.add_argument(
        "--bootstrap",
        default=os.environ.get("GUARDSTREAM_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    )
    g.add_argument(
        "--redis-url", default=os.environ.get("GUARDSTREAM_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    g.add_argument("--partitions", type=int, default=8, help="partitions of every bench topic")
    g.add_argument("--code", type=Path, help="run the worker from another checkout (A/B)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--keep-logs", action="store_true", help="keep each run's worker log under OUT/work/"
    )
    g = p.add_argument_group("1. overhead")
    g.add_argument("--n", type=int, default=20_000, help="messages per overhead run")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    g.add_argument("--warmup", type=int, default=300, help="warm-up messages before each run")
    g = p.add_argument_group("model (scenarios 2-4)")
    g.add_argument(
        "--engine",
        choices=["replay", "hf"],
        default="replay",
        help="replay: the stand-in of fixed cost; hf: real generation",
    )
    g.add_argument("--model", help="hf: checkpoint folder, or 'tiny' to build a tiny random Llama")
    g.add_argument("--hf-device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation cap (default 4096 for replay, 32 for hf)",
    )
    g.add_argument("--cost-a-ms", type=float, default=500.0, help="stand-in: ms per batch")
    g.add_argument("--cost-b-ms", type=float, default=3.0, help="stand-in: ms per message")
    g.add_argument("--batch-size", type=int, default=32, help="max_batch_size")
    g.add_argument("--max-wait-ms", type=float, default=20.0, help="max_wait_ms")
    g.add_argument(
        "--in-flight",
        type=int,
        default=32,
        help="max_in_flight batches (at least batch cost / max_wait_ms, 500/20 = 25 here, so "
        "that every batch starts on its timer instead of waiting for a free slot; a server with "
        "in-flight batching takes that many; see the batching sweep for fewer)",
    )
    g = p.add_argument_group("2-4. load, batching, cache")
    g.add_argument(
        "--loads",
        default="0.1,0.5,0.9",
        help="offered load, fractions of the sustainable capacity (the highest steady rate the "
        "worker keeps up with)",
    )
    g.add_argument("--load-seconds", type=float, default=20.0, help="seconds per load level")
    g.add_argument(
        "--capacity-seconds",
        type=float,
        default=10.0,
        help="measurement window of a saturation run",
    )
    g.add_argument(
        "--settle-seconds",
        type=float,
        default=3.0,
        help="saturation runs: seconds before the window opens",
    )
    g.add_argument(
        "--probe-seconds",
        type=float,
        default=6.0,
        help="seconds of each steady-rate probe that finds the sustainable capacity",
    )
    g.add_argument(
        "--probe-start", type=float, default=0.2, help="first probe, x closed-loop capacity"
    )
    g.add_argument("--probe-step", type=float, default=1.3, help="each next probe, x the last")
    g.add_argument("--sweep-sizes", default="1,4,16,64", help="max_batch_size values to try")
    g.add_argument("--sweep-waits", default="0,5,50,100", help="max_wait_ms values to try")
    g.add_argument("--sweep-in-flight", default="2,8,16", help="max_in_flight values to try")
    g.add_argument(
        "--sweep-seconds",
        type=float,
        default=8.0,
        help="seconds of each batching configuration's saturation window and offered load, and "
        "of each cache run's window",
    )
    g.add_argument("--repeat-fractions", default="0,0.25,0.5,0.75")
    g.add_argument("--cache-modes", default="on,off", help="cache scenario: on, off or both")
    g.add_argument(
        "--cache-in-flight",
        type=int,
        default=4,
        help="cache scenario: max_in_flight, low enough that the model is the bottleneck (4 "
        "batches of 32 at ~0.6 s: ~210 msg/s, well under what the worker itself carries)",
    )

    g = p.add_argument_group("5. utilisation (a simulated in-flight engine, issue 17)")
    g.add_argument(
        "--util-preset",
        default="8B-H100",
        help="simulated engine preset, MODEL-GPU (1B/3B/8B, H100/H200). 8B-H100: ~50 verdicts/s "
        "for the pairs mix, which this bench drives through Kafka with CPU to spare, and decode "
        "steps of 8-16 ms, long against a busy event loop's late wake-ups",
    )
    g.add_argument("--util-mix", choices=["pairs", "prompts"], default="pairs")
    g.add_argument(
        "--util-modes",
        default="batch:32x2,batch:4x64,request",
        help="admission modes, comma-separated: batch:SIZExIN_FLIGHT, request (the preset's max "
        "sequences) or request:N",
    )
    g.add_argument(
        "--util-loads",
        default="0.25,0.5,0.75,1.0,1.2",
        help="offered loads, fractions of the engine's capacity for the mix",
    )
    g.add_argument("--util-seconds", type=float, default=24.0, help="seconds per load level")
    g.add_argument(
        "--util-settle-seconds",
        type=float,
        default=8.0,
        help="a level's delivered throughput counts the verdicts received from this many "
        "seconds into it (past the change of load) to its end",
    )
    g.add_argument(
        "--util-drain-seconds",
        type=float,
        default=45.0,
        help="after the last level: the longest wait for the last verdicts",
    )
    g.add_argument(
        "--util-max-new-tokens",
        type=int,
        default=None,
        help="generation cap (default: the service's, GUARDSTREAM_MAX_NEW_TOKENS's default)",
    )
    g.add_argument("--util-capacity-sample", type=int, default=3000)
    g.add_argument("--util-seed", type=int, default=17)
    g.add_argument("--util-warmup-turns", type=int, default=5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: the QUICK values for every option left at its default."""
    defaults = vars(build_parser().parse_args([]))
    for key, value in QUICK.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
    }


def _tiny_model(out: Path) -> Path:
    """A tiny random Llama of GuardReasoner's family (bench.gpu.synthetic), built once."""
    folder = out / "tiny-model"
    if not (folder / "config.json").is_file():
        from bench.gpu import synthetic

        synthetic.build_random_llama(folder, synthetic.TINY, device="cpu", dtype="float32")
    return folder


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed arguments (from `build_parser` or `add_arguments`)."""
    from bench import report, scenarios

    if args.quick:
        apply_quick(args)
    # aiokafka warns while fresh topics elect their leaders; the bench retries and waits anyway
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    from bench.data import benchmark_prompts, shared_dir
    from bench.runs import Env

    started = time.monotonic()
    shared = shared_dir(args.shared)
    out: Path = args.out.resolve()  # the workers run in folders of their own: no relative paths
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)
    prompts = benchmark_prompts(shared)
    outputs = shared / "predictions" / "1B"
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        print(f"bench: unknown scenario(s) {sorted(unknown)}", file=sys.stderr)
        return 2

    base: dict[str, Any] = {
        "kafka_bootstrap_servers": args.bootstrap,
        "redis_url": args.redis_url,
        "engine": "replay",
        "replay_path": str(outputs),
        "max_new_tokens": args.max_new_tokens or 4096,
        "cache_ttl_s": 600,  # bench keys are salted per worker: let Redis forget them soon
        "log_format": "text",
        "log_level": "INFO",
        "grace_period_s": 20,
    }
    free_model = {
        "GUARDSTREAM_BENCH_BACKEND": "hashreplay",
        "GUARDSTREAM_BENCH_OUTPUTS": str(outputs),
    }
    cost_ms = None
    if args.engine == "hf":
        if not args.model:
            print("bench: --engine hf needs --model DIR (or --model tiny)", file=sys.stderr)
            return 2
        model = _tiny_model(out) if args.model == "tiny" else Path(args.model)
        hf = {
            "engine": "hf",
            "hf_model_path": str(model.resolve()),
            "hf_device": args.hf_device,
            "max_new_tokens": args.max_new_tokens or 32,
        }
        model_env = {"GUARDSTREAM_BENCH_BACKEND": "engine"}
        model_settings: dict[str, Any] = hf
        overhead_env, overhead_settings = model_env, hf
        model_name = f"hf {model.name}, max_new_tokens {hf['max_new_tokens']}"
        overhead_model = model_name
    else:
        a, b = float(args.cost_a_ms), float(args.cost_b_ms)
        model_env = {
            "GUARDSTREAM_BENCH_BACKEND": "standin",
            "GUARDSTREAM_BENCH_OUTPUTS": str(outputs),
            "GUARDSTREAM_BENCH_COST_A_MS": str(a),
            "GUARDSTREAM_BENCH_COST_B_MS": str(b),
        }
        model_settings = {}
        overhead_env, overhead_settings = free_model, {}
        model_name = f"stand-in {a:g} ms + {b:g} ms x batch"
        overhead_model = "replay by hash (free)"

        def cost_ms(batch: float) -> float:
            return a + b * batch

    plan = scenarios.Plan(
        n=args.n,
        rounds=args.rounds,
        warmup=args.warmup,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        in_flight=args.in_flight,
        loads=_floats(args.loads),
        load_seconds=args.load_seconds,
        capacity_seconds=args.capacity_seconds,
        settle_seconds=args.settle_seconds,
        sweep_sizes=_ints(args.sweep_sizes),
        sweep_waits=_floats(args.sweep_waits),
        sweep_in_flight=_ints(args.sweep_in_flight),
        sweep_seconds=args.sweep_seconds,
        probe_seconds=args.probe_seconds,
        probe_start=args.probe_start,
        probe_step=args.probe_step,
        repeat_fractions=_floats(args.repeat_fractions),
        cache_modes=[m.strip() == "on" for m in args.cache_modes.split(",") if m.strip()],
        cache_in_flight=args.cache_in_flight,
        model_env=model_env,
        model_settings=model_settings,
        overhead_env=overhead_env,
        overhead_settings=overhead_settings,
        cost_ms=cost_ms,
    )
    env = Env(
        bootstrap=args.bootstrap,
        redis_url=args.redis_url,
        partitions=args.partitions,
        workdir=workdir,
        bench_env={},
        base_settings=base,
        quiet=args.no_progress,
        code_root=args.code,
        keep_logs=args.keep_logs,
    )
    try:
        uplan = _utilisation_plan(args, shared) if "utilisation" in wanted else None
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "quick": args.quick,
            "argv": sys.argv[1:],
            "model": model_name,
            "overhead_model": overhead_model,
            "partitions": args.partitions,
            "plan": {k: v for k, v in vars(plan).items() if k != "cost_ms"},
        }
    }
    if uplan is not None:
        results["meta"]["utilisation_plan"] = {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(uplan).items()
        }
    # results are committed and shared: no path of the machine that made them
    results["meta"] = portable(results["meta"], {shared: "<shared>", Path.cwd(): "."})

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"bench: {', '.join(wanted)}; output in {out}")
    if "overhead" in wanted:
        say("1. pipeline overhead")
        results["overhead"] = scenarios.overhead(env, plan, prompts, say)
    reference = None
    if "latency" in wanted:
        say("2. latency under load")
        results["latency"] = scenarios.latency(env, plan, prompts, say)
        reference = results["latency"]["capacity"] / 2
    if "batching" in wanted:
        say("3. batching")
        results["batching"] = scenarios.batching(env, plan, prompts, say, reference)
    if "cache" in wanted:
        say("4. cache and dedupe")
        results["cache"] = scenarios.cache(env, plan, prompts, say)
    if uplan is not None:
        from bench import utilisation

        say("5. engine utilisation")
        u = utilisation.utilisation(env, uplan, shared, say)
        results["utilisation"] = portable(u, {shared: "<shared>"})
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    text = report.tables(results)
    say("\n" + text)
    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(text + "\n")
    pngs = report.plots(results, out)
    say(f"wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in pngs))
    say(f"bench: done in {results['meta']['seconds']:.0f} s")
    return 0


def _utilisation_plan(args: argparse.Namespace, shared: Path) -> Any:
    """The utilisation scenario's plan; ValueError names a bad --util-* option."""
    from bench.sim_engine import preset_named
    from bench.utilisation import UtilisationPlan, parse_modes
    from service.config import Settings

    parse_modes(args.util_modes, preset_named(args.util_preset))
    loads = _floats(args.util_loads)
    if not loads or min(loads) <= 0:
        raise ValueError(f"--util-loads: expected fractions > 0, got {args.util_loads!r}")
    if not 0 <= args.util_settle_seconds < args.util_seconds:
        raise ValueError("--util-settle-seconds must be >= 0 and below --util-seconds")
    defaults = Settings.model_fields
    return UtilisationPlan(
        preset=args.util_preset,
        mix=args.util_mix,
        modes=args.util_modes,
        loads=loads,
        level_seconds=args.util_seconds,
        settle_seconds=args.util_settle_seconds,
        drain_seconds=args.util_drain_seconds,
        max_new_tokens=args.util_max_new_tokens or defaults["max_new_tokens"].default,
        max_text_chars=defaults["max_text_chars"].default,
        early_exit=defaults["early_exit"].default,
        capacity_sample=args.util_capacity_sample,
        seed=args.util_seed,
        warmup_turns=args.util_warmup_turns,
        outputs_root=shared / "predictions",
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def portable(value: Any, places: dict[Path, str]) -> Any:
    """`value` (JSON-like) with every string that starts with one of `places` rewritten to start
    with its name instead (`/data/shared/x` -> `<shared>/x`)."""
    if isinstance(value, dict):
        return {k: portable(v, places) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, places) for v in value]
    if isinstance(value, str):
        for place, name in places.items():
            for root in {str(place.absolute()), str(place.resolve())}:  # as given, and real
                if value == root or value.startswith(root + "/"):
                    return name + value[len(root) :]
    return value
