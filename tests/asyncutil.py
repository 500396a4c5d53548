"""Checks that async wrappers leave the event loop free while the engine works in a thread."""

from __future__ import annotations

import asyncio
import time


def run_with_ticker(make_awaitable, interval: float = 0.005):
    """Run `make_awaitable()` in a fresh event loop beside a ticker that counts how often the loop
    was free; return (result, ticks, elapsed seconds). A blocked loop ticks about once per call."""

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(interval)

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        try:
            result = await make_awaitable()
        finally:
            done.set()
            await task
        return result, ticks, time.perf_counter() - start

    return asyncio.run(main())
