"""`python -m bench.worker`: the guardstream worker (`run_worker`, what `guardstream serve` runs)
with a bench backend. Settings come from the usual `GUARDSTREAM_*` environment; the bench adds:

    GUARDSTREAM_BENCH_BACKEND   hashreplay | standin | sim_inflight | engine (the configured
                                engine, e.g. hf)
    GUARDSTREAM_BENCH_OUTPUTS   folder of recorded outputs (*.jsonl with "predict") for the
                                hash replay, the stand-in and the simulated engine
    GUARDSTREAM_BENCH_COST_A_MS, GUARDSTREAM_BENCH_COST_B_MS   the stand-in's a + b * batch_size
    GUARDSTREAM_BENCH_SIM_PRESET    sim_inflight: the simulated in-flight engine's preset,
                                MODEL-GPU (`bench.sim_engine.PRESET_NAMES`; default 8B-H100), run
                                in real time; its counters go into the stats file as "engine"
    GUARDSTREAM_BENCH_SALT      appended to the model revision: a cold cache for this worker
    GUARDSTREAM_BENCH_STATS     file the model-call counts are written to, every 0.2 s
    GUARDSTREAM_BENCH_PROFILE   profile the worker into this file (.txt/.html: pyinstrument,
                                else cProfile)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.backends import Counting, HashReplayBackend, StandInBackend
from bench.data import recorded_outputs
from bench.sim_engine import SimulatedInflightBackend, preset_named
from engine.backends.base import Backend
from service.commands.serve_cmd import run_worker
from service.config import Settings, SettingsError
from service.factory import build_backend


def make_backend(settings: Settings, env: dict[str, str]) -> Backend:
    kind = env.get("GUARDSTREAM_BENCH_BACKEND", "hashreplay")
    if kind == "engine":
        return build_backend(settings)
    outputs = recorded_outputs(Path(env["GUARDSTREAM_BENCH_OUTPUTS"]))
    if kind == "hashreplay":
        return HashReplayBackend(outputs)
    if kind == "standin":
        return StandInBackend(
            outputs,
            a_ms=float(env.get("GUARDSTREAM_BENCH_COST_A_MS", "0")),
            b_ms=float(env.get("GUARDSTREAM_BENCH_COST_B_MS", "0")),
        )
    if kind == "sim_inflight":
        try:
            engine = preset_named(env.get("GUARDSTREAM_BENCH_SIM_PRESET", "8B-H100"))
        except ValueError as err:
            raise SystemExit(f"bench.worker: GUARDSTREAM_BENCH_SIM_PRESET: {err}") from None
        return SimulatedInflightBackend(outputs, engine)
    raise SystemExit(f"bench.worker: unknown GUARDSTREAM_BENCH_BACKEND {kind!r}")


def _profiled(path: Path, settings: Settings, backend: Backend) -> int:
    """Run the worker under a profiler: pyinstrument (sampling) for a `.txt`/`.html` path,
    else cProfile (a `.prof` file for pstats)."""
    if path.suffix in (".txt", ".html"):
        from pyinstrument import Profiler

        sampler = Profiler(interval=0.0005, async_mode="disabled")
        sampler.start()
        try:
            return run_worker(settings, backend)
        finally:
            sampler.stop()
            session = sampler.last_session
            if session is not None:  # kept for re-rendering: pyinstrument's Session.load
                session.save(str(path.with_suffix(".pyisession")))
            text = sampler.output_html() if path.suffix == ".html" else sampler.output_text()
            path.write_text(text)
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return run_worker(settings, backend)
    finally:
        profiler.disable()
        profiler.dump_stats(str(path))


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"bench.worker: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    inner = make_backend(settings, env)
    backend = Counting(inner, env.get("GUARDSTREAM_BENCH_SALT", ""))
    stats_path = os.environ.get("GUARDSTREAM_BENCH_STATS")
    if stats_path:
        path = Path(stats_path)

        def extra() -> dict[str, Any] | None:
            if isinstance(inner, SimulatedInflightBackend):
                return {"engine": {**asdict(inner.stats), "clock_s": inner.clock.time()}}
            return None

        def dump_forever() -> None:
            while True:
                backend.dump(path, extra())
                time.sleep(0.2)

        threading.Thread(target=dump_forever, daemon=True, name="bench-stats").start()
    profile = os.environ.get("GUARDSTREAM_BENCH_PROFILE")
    if profile:
        return _profiled(Path(profile), settings, backend)
    return run_worker(settings, backend)


if __name__ == "__main__":
    sys.exit(main())
