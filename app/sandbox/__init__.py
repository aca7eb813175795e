"""A fal.ai emulator: fal's sync and queue protocols, real images, latency and faults on demand.

It is the upstream in sandbox mode (no fal key) and in the test suite. See ``app.py`` for the
routes and ``config.py`` for the knobs; the control API is ``/_sandbox/...``.
"""

from app.sandbox.app import create_sandbox_app
from app.sandbox.config import FaultKind, FaultRule, FaultScope, SandboxConfig
from app.sandbox.control import SandboxControl
from app.sandbox.endpoints import ENDPOINTS
from app.sandbox.server import embedded_sandbox, run_sandbox, serve_app

__all__ = [
    "ENDPOINTS",
    "FaultKind",
    "FaultRule",
    "FaultScope",
    "SandboxConfig",
    "SandboxControl",
    "create_sandbox_app",
    "embedded_sandbox",
    "run_sandbox",
    "serve_app",
]
