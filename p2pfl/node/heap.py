"""A long-running node's heap: cyclic garbage collected and freed pages handed back.

Only a node that owns its process runs this (an in-process scenario's nodes share one).
"""

from __future__ import annotations

import gc

import trio

from p2pfl.transport.budget import trim_heap

TRIM_EVERY = 60.0  # seconds between collecting cyclic garbage and trimming the heap


async def trim_forever() -> None:
    """Once a minute, free cyclic garbage and hand freed heap pages back to the OS,
    so the RSS an operator watches is memory in use (docs/reliability.md, soak).

    The collection is for closed TLS connections: a `trio.SSLStream` refers to
    itself (its handshake `_Once` holds its own bound method), so its OpenSSL
    state and buffers (60-100 KiB a connection) go only when the cyclic collector
    runs. A node in its steady state frees about as many objects as it makes, so
    Python's own collections are rare, and a connection old enough to have reached
    the oldest generation waits for a full one: under churn they piled up. It runs
    on the trio thread (finalizers of trio objects must not run in a worker),
    and takes about 40 ms.
    """
    while True:
        await trio.sleep(TRIM_EVERY)
        gc.collect()
        await trio.to_thread.run_sync(trim_heap)
