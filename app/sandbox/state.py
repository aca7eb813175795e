"""The sandbox's memory: requests and their life cycle, fal's queue, faults, and the ledger."""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from app.sandbox.config import FaultRule, FaultScope, SandboxConfig
from app.sandbox.endpoints import OutputFile

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
Outcome = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True)
class FalResponse:
    """An answer in fal's shape: status, JSON body, extra headers."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


_DEFAULT_BODIES: dict[int, dict[str, Any]] = {
    401: {"detail": "No user found for Key ID and Secret"},
    403: {
        "detail": "User is locked. Reason: Exhausted balance. "
        "Top up your balance at fal.ai/dashboard/billing."
    },
    422: {
        "detail": [
            {
                "loc": ["body"],
                "msg": "Injected validation error (sandbox fault)",
                "type": "value_error",
            }
        ]
    },
    429: {"detail": "Too many requests. Please retry later."},
    500: {"detail": "Internal Server Error"},
    502: {"detail": "Bad Gateway"},
    503: {"detail": "Runner scheduling failure", "error_type": "runner_scheduling_failure"},
    504: {"detail": "Request timed out", "error_type": "request_timeout"},
}


def fal_error(status_code: int, rule: FaultRule | None = None) -> FalResponse:
    """fal's error answer for ``status_code``, customised by a fault rule."""
    default = _DEFAULT_BODIES.get(
        status_code, {"detail": "Bad Request" if status_code < 500 else "Internal Server Error"}
    )
    body = dict(default)
    headers: dict[str, str] = {}
    if rule is not None:
        if rule.detail is not None:
            body["detail"] = rule.detail
        if rule.error_type is not None:
            body["error_type"] = rule.error_type
        if rule.retry_after_s is not None:
            headers["Retry-After"] = str(rule.retry_after_s)
        if rule.user_timeout and status_code == 504:
            headers["X-Fal-Request-Timeout-Type"] = "user"
    if "error_type" in body:
        headers["X-Fal-Error-Type"] = str(body["error_type"])
    return FalResponse(status_code, body, headers)


def fault_response(rule: FaultRule) -> FalResponse:
    """The answer an ``error``/``rate_limit``/``timeout``/``bad_key``/``locked`` rule gives."""
    status = {"rate_limit": 429, "timeout": 504, "bad_key": 401, "locked": 403}.get(
        rule.kind, rule.status_code
    )
    return fal_error(status, rule)


def app_path(endpoint: str) -> str:
    """``fal-ai/flux/dev`` -> ``fal-ai/flux``: status/result/cancel URLs drop the sub-path."""
    parts = endpoint.split("/")
    keep = 3 if parts[0] in ("workflows", "comfy") else 2
    return "/".join(parts[:keep])


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass(eq=False)
class Job:
    """One request the sandbox accepted, through either protocol."""

    request_id: str
    endpoint: str
    protocol: Literal["sync", "queue"]
    arguments: Any
    base_url: str
    fault: FaultRule | None = None
    start_timeout_s: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    state: QueueState = "IN_QUEUE"
    outcome: Outcome | None = None
    response: FalResponse | None = None
    files: list[OutputFile] = field(default_factory=list)
    seed: int | None = None
    inference_s: float | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    task: asyncio.Task[None] | None = None
    queue_seq: int = -1
    watchers: list[asyncio.Future[None]] = field(default_factory=list)

    def changed(self) -> None:
        """Wake whoever waits for this job's status to move (the status streams)."""
        watchers, self.watchers = self.watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    async def wait_change(self, timeout_s: float) -> bool:
        """Until the status moves (True) or ``timeout_s`` passes (False)."""
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.watchers.append(watcher)
        try:
            await asyncio.wait_for(watcher, timeout_s)
        except TimeoutError:
            return False
        finally:
            if watcher in self.watchers:
                self.watchers.remove(watcher)
        return True

    @property
    def request_url(self) -> str:
        return f"{self.base_url}/queue/{app_path(self.endpoint)}/requests/{self.request_id}"

    def log(self, message: str, level: str = "INFO") -> None:
        self.logs.append(
            {
                "message": message,
                "level": level,
                "source": "USER",
                "timestamp": _iso(time.time()),
            }
        )

    def ledger_entry(self) -> dict[str, Any]:
        status: str = self.outcome or self.state.lower()
        error = None
        if self.outcome in ("failed", "cancelled") and self.response is not None:
            error = {
                "status_code": self.response.status_code,
                "detail": self.response.body.get("detail"),
                "error_type": self.response.body.get("error_type"),
            }
        images = [
            {
                "url": f.url if not f.url.startswith("data:") else None,
                "file_name": f.file_name,
                "width": f.width,
                "height": f.height,
                "content_type": f.content_type,
                "file_size": f.file_size,
            }
            for f in self.files
        ]
        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "status": status,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "seed": self.seed,
            "images": images,
            "pixels": sum(f.width * f.height for f in self.files),
            "error": error,
        }


class SandboxState:
    """Everything one sandbox app remembers; lives on its event loop, so no locks.

    Every per-request operation is O(1) (amortised) whatever the number of remembered jobs:
    finished jobs are forgotten oldest-finished first from a FIFO of their ids, and a queue
    position is arithmetic on enqueue sequence numbers. Jobs enter fal's queue in sequence
    order and nearly always leave it in that order; the few that leave out of turn (a
    cancel or a start timeout while queued) are kept as sorted "holes" until the head of the
    queue passes them.
    """

    def __init__(self, config: SandboxConfig) -> None:
        self.initial = config.model_copy(deep=True)
        self.config = config.model_copy(deep=True)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running = 0
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._finished: deque[str] = deque()
        self._waiting: deque[Job] = deque()
        self._holes: list[int] = []
        self._next_seq = 0

    def clear(self) -> None:
        """Forget every job (a reset)."""
        self.jobs.clear()
        self._finished.clear()
        self._waiting.clear()
        self._holes.clear()

    # --- faults ------------------------------------------------------------
    def take_fault(self, scope: FaultScope, endpoint: str | None) -> FaultRule | None:
        """The first active rule for this call, counted as hit."""
        for rule in self.config.faults:
            if not rule.active or not rule.covers(scope):
                continue
            if rule.endpoint is not None and rule.endpoint != endpoint:
                continue
            rule.hits += 1
            return rule
        return None

    # --- requests ----------------------------------------------------------
    def new_job(
        self,
        *,
        endpoint: str,
        protocol: Literal["sync", "queue"],
        arguments: Any,
        base_url: str,
        start_timeout_s: float | None,
    ) -> Job:
        job = Job(
            request_id=str(uuid.uuid4()),
            endpoint=endpoint,
            protocol=protocol,
            arguments=arguments,
            base_url=base_url,
            fault=self.take_fault("job", endpoint),
            start_timeout_s=start_timeout_s,
            queue_seq=self._next_seq,
        )
        self._next_seq += 1
        self.jobs[job.request_id] = job
        self._waiting.append(job)
        self._forget_old()
        return job

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs while more than ``max_requests`` are remembered."""
        while len(self.jobs) > self.config.max_requests and self._finished:
            self.jobs.pop(self._finished.popleft(), None)

    def queue_position(self, job: Job) -> int:
        """How many requests wait in fal's queue before ``job`` (0 when it is not waiting)."""
        if job.state != "IN_QUEUE" or job.outcome is not None or not self._waiting:
            return 0
        ahead = job.queue_seq - self._waiting[0].queue_seq
        return ahead - bisect.bisect_left(self._holes, job.queue_seq)

    def _leave_queue(self, job: Job) -> None:
        waiting = self._waiting
        if not waiting or job.queue_seq < waiting[0].queue_seq:
            return
        if waiting[0] is not job:
            bisect.insort(self._holes, job.queue_seq)
            return
        waiting.popleft()
        while self._holes and waiting and waiting[0].queue_seq == self._holes[0]:
            waiting.popleft()
            del self._holes[0]

    def start(self, job: Job) -> None:
        """``job`` got a slot: it leaves fal's queue and runs."""
        if job.state == "IN_QUEUE" and job.outcome is None:
            self._leave_queue(job)
        job.state = "IN_PROGRESS"
        job.started_at = time.time()
        job.changed()

    def finish(self, job: Job, outcome: Outcome, response: FalResponse) -> None:
        if job.outcome is not None:
            return
        if job.state == "IN_QUEUE":
            self._leave_queue(job)
        job.outcome = outcome
        job.state = "COMPLETED"
        job.response = response
        job.finished_at = time.time()
        job.log(f"Request {outcome}.", "INFO" if outcome == "completed" else "ERROR")
        if job.request_id in self.jobs:
            self._finished.append(job.request_id)
        job.changed()

    # --- fal's account concurrency ----------------------------------------
    async def acquire_slot(self) -> None:
        loop = asyncio.get_running_loop()
        while self.config.max_concurrent is not None and self.running >= self.config.max_concurrent:
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
        self.running += 1

    def release_slot(self) -> None:
        self.running -= 1
        self.wake_slot_waiters()

    def wake_slot_waiters(self) -> None:
        """Let queued requests re-check for a free slot (after a release or a config change)."""
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
