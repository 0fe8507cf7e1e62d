"""`service.resume.ResumeGuard` on the app's real Faust consumer (not started: no broker needed)."""

from __future__ import annotations

from typing import Any

from faust.types import TP

from service.app import GuardApp
from service.resume import ResumeGuard

PROMPTS, RESPONSES, CHANGELOG = "in.prompts", "in.responses", "app-recent-prompts-changelog"


def _consumer(assigned: set[TP]) -> tuple[GuardApp, Any]:
    app = GuardApp("guardstream-unit-resume", broker="kafka://127.0.0.1:1", store="memory://")
    app.resume_guard = ResumeGuard((PROMPTS, RESPONSES))
    consumer = app.consumer  # the guard is installed when the app makes its consumer
    consumer.assignment = lambda: assigned
    consumer._set_active_tps(set(assigned))
    return app, consumer


def test_input_partitions_resumed_during_a_rebalance_are_read_only_after_it() -> None:
    """Faust's recovery resumes the input partitions before it seeks them to their committed
    offsets, with the fetcher running; they must stay paused until the rebalance ends (after the
    seek), while the changelog partitions recovery reads are resumed at once."""
    inputs = {TP(PROMPTS, 0), TP(RESPONSES, 0)}
    changelog = {TP(CHANGELOG, 0)}
    app, consumer = _consumer(inputs | changelog)
    app.on_rebalance_start()
    consumer.pause_partitions(inputs | changelog)  # as Faust does when partitions are assigned

    consumer.resume_partitions(changelog)  # recovery reads the changelog
    consumer.resume_partitions(inputs | changelog)  # "Resume stream partitions", then the seek
    assert consumer._active_partitions == changelog
    assert consumer._paused_partitions == inputs
    assert app.resume_guard is not None and app.resume_guard.held_back == 1

    app.on_rebalance_end()  # after the seek
    assert consumer._active_partitions == inputs | changelog
    assert not consumer._paused_partitions


def test_outside_a_rebalance_resumption_passes_and_revoked_partitions_stay_paused() -> None:
    kept, moved = TP(PROMPTS, 0), TP(PROMPTS, 1)
    app, consumer = _consumer({kept, moved})
    app.on_rebalance_start()
    consumer.pause_partitions({kept, moved})
    consumer.resume_partitions({kept, moved})
    consumer.assignment = lambda: {kept}  # a rebalance moved partition 1 away meanwhile
    consumer._set_active_tps({kept})
    app.on_rebalance_end()
    assert consumer._active_partitions == {kept}

    consumer.pause_partitions({kept})  # Faust's flow control, between rebalances
    consumer.resume_partitions({kept})
    assert consumer._active_partitions == {kept}
