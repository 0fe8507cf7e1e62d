"""Recent prompts by id, so that a response can be paired with its prompt by `reply_to`.

The store is a Faust table (changelog-backed: a restarted worker recovers it) written through
`PromptStore`, which bounds it by age and size and lets a response wait for a prompt that has
not arrived yet. Prompts and responses are keyed by conversation id on topics with the same
partition count, so a response is read by the same worker as its prompt; each entry is written to
the changelog partition of the prompt it came from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, MutableMapping
from typing import Any

Changelog = Callable[[int, str, dict[str, Any] | None], None]


class PromptStore:
    def __init__(
        self,
        data: MutableMapping[str, Any],
        changelog: Changelog,
        *,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._data = data
        self._changelog = changelog
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def put(self, prompt_id: str, text: str, partition: int) -> None:
        value = {"text": text, "ts": self._clock(), "p": partition}
        self._data[prompt_id] = value
        self._changelog(partition, prompt_id, value)
        for fut in self._waiters.pop(prompt_id, []):
            if not fut.done():
                fut.set_result(text)
        if len(self._data) > self.max_entries:
            self.sweep()

    def get(self, prompt_id: str) -> str | None:
        value = self._data.get(prompt_id)
        if not isinstance(value, dict) or "text" not in value:
            return None
        if self._clock() - float(value.get("ts", 0)) > self.ttl_s:
            return None
        return str(value["text"])

    async def wait_for(self, prompt_id: str, timeout_s: float) -> str | None:
        """The prompt's text, waiting up to `timeout_s` for it to arrive; None if it does not."""
        text = self.get(prompt_id)
        if text is not None or timeout_s <= 0:
            return text
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(prompt_id, []).append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(prompt_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[prompt_id]

    def sweep(self) -> int:
        """Drop entries older than the TTL; then, when more than `max_entries` are left, the
        oldest, down to nine tenths of it: a full table is swept once per tenth of its size, not
        on every put (a full scan and sort of the table each time)."""
        now = self._clock()
        doomed = {
            k
            for k, v in list(self._data.items())
            if not isinstance(v, dict) or now - float(v.get("ts", 0)) > self.ttl_s
        }
        left = len(self._data) - len(doomed)
        if left > self.max_entries:
            target = self.max_entries - self.max_entries // 10
            alive = sorted(
                (float(v["ts"]), k) for k, v in list(self._data.items()) if k not in doomed
            )
            doomed.update(k for _, k in alive[: left - target])
        for key in doomed:
            value = self._data.pop(key, None)
            partition = value.get("p") if isinstance(value, dict) else None
            if isinstance(partition, int):
                self._changelog(partition, key, None)
        return len(doomed)
