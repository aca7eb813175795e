"""What a serving process sets for itself once: the garbage collector and FastAPI's telemetry.

**The collector** (issue 15).

CPython's cyclic collector walks every tracked object of a generation when it runs. A serving
gateway holds ~150,000 objects from start-up (FastAPI's routes, pydantic's schemas, the
catalog, prometheus' registry) that live as long as the process. With the interpreter's
defaults (a young collection every 700 allocations) the objects of the requests in flight
were promoted before they died and kept triggering full collections over all of them:
measured with ``gc.callbacks`` under load at concurrency 16, about 15 % of the gateway's CPU
(six full collections of ~0.1 s each in 8 s). :func:`settled` takes what start-up built out
of the collector's view (``gc.freeze``) and lets the young generation grow before it is
collected, so that a request's objects are usually gone before a collection sees them;
:func:`unsettled` puts the interpreter's collector back when the process stops serving (a test
process builds many apps in turn).

**FastAPI's native OpenTelemetry** asks OpenTelemetry for its three global providers on every
request (each lookup reads the environment) only to find them unconfigured: ~7-10 µs per
request. falgate's telemetry is its Prometheus metrics and JSON logs, so FastAPI's is off
(:func:`fastapi_telemetry`) unless ``FASTAPI_OTEL_AUTO_CONFIGURE=true`` asks FastAPI to set
OpenTelemetry up from the environment, FastAPI's own switch for it.
"""

from __future__ import annotations

import gc
import inspect
import os
from typing import Any

from fastapi import FastAPI

#: Allocations before a young collection (the interpreter's default is 700); young collections
#: per middle one and middle ones per full one stay at the default 10.
YOUNG_THRESHOLD = 20_000


def settled() -> tuple[int, int, int]:
    """After start-up: collect once, freeze the survivors, raise the young threshold. Returns
    the thresholds to put back with :func:`unsettled`."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, before[1], before[2])
    return before


def unsettled(thresholds: tuple[int, int, int]) -> None:
    """Back to the interpreter's collector: every object visible to it, the old thresholds."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def fastapi_telemetry() -> dict[str, Any]:
    """``FastAPI(**fastapi_telemetry())``: native telemetry off, unless asked for (see above);
    nothing for a FastAPI without it."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    if os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
