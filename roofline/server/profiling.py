"""POST /debug/profile?steps=N: a torch profiler trace of the next N engine steps (serve --enable-profiling).

The route registers a StepProfiler with the engine thread and waits while the steps come: it answers
once N steps ran (200), or when `timeout` seconds passed first. Steps recorded by then are written and
reported (200 with "complete": false); none at all, because the engine was idle, is a 408 that says so.
One profile at a time: a second request meanwhile gets 409. The trace is Chrome trace JSON, written to
--profile-dir; the answer gives its path.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from roofline.engine.async_engine import EngineDeadError
from roofline.engine.profiler import MAX_PROFILE_STEPS, StepProfiler
from roofline.errors import ConfigError, RooflineError
from roofline.server.context import ServingContext
from roofline.server.errors import APIError

PROFILE_PATH = "/debug/profile"
DEFAULT_STEPS = 10
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 600.0
_STOP_GRACE_S = 120.0  # past the timeout, how long a step already running (a compile) may take to end
_INTEGER = re.compile(r"-?\d+")


@dataclass
class ProfilingConfig:
    """Where POST /debug/profile writes its traces and how long it waits for steps by default."""

    profile_dir: str  # an existing, writable folder
    default_timeout_s: float = DEFAULT_TIMEOUT_S  # when the request names no timeout

    def __post_init__(self) -> None:
        if not os.path.isdir(self.profile_dir) or not os.access(self.profile_dir, os.W_OK):
            raise ConfigError(f"--profile-dir {self.profile_dir}: not a folder this process can write in")
        if not 0 < self.default_timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"profiling: default_timeout_s must be in (0, {MAX_TIMEOUT_S:g}]")


def profile_dir(path: str | None) -> str:
    """--profile-dir made ready: created if missing; None gives a fresh temporary folder."""
    if path is None:
        return tempfile.mkdtemp(prefix="roofline-profiles-")
    full = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(full, exist_ok=True)
    except OSError as exc:
        raise RooflineError(f"--profile-dir {path}: cannot create it ({exc.strerror or exc})") from None
    return full


def _steps(text: str | None) -> int:
    if text is None:
        return DEFAULT_STEPS
    if not _INTEGER.fullmatch(text.strip()):
        raise APIError(400, f"steps must be a whole number of engine steps, got {text!r}", code="invalid_value",
                       param="steps")
    digits = text.strip()
    if len(digits) > 6 or not 1 <= int(digits) <= MAX_PROFILE_STEPS:
        raise APIError(400, f"steps must be in [1, {MAX_PROFILE_STEPS}], got {digits}", code="invalid_value",
                       param="steps")
    return int(digits)


def _timeout(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:  # also nan
        raise APIError(400, f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {text!r}",
                       code="invalid_value", param="timeout")
    return value


def install_profiling(app: FastAPI, ctx: ServingContext, config: ProfilingConfig) -> None:
    """Register POST /debug/profile (keyed and drained like /v1: see middleware.GUARDED_PATHS)."""
    sequence = itertools.count(1)
    is_busy = False

    @app.post(PROFILE_PATH, responses={200: {"description": "where the trace was written"},
                                       408: {"description": "no engine step ran before the timeout"},
                                       409: {"description": "a profile is already being recorded"}})
    async def profile_engine_steps(request: Request) -> JSONResponse:
        nonlocal is_busy
        num_steps = _steps(request.query_params.get("steps"))
        timeout_s = _timeout(request.query_params.get("timeout"), config.default_timeout_s)
        if is_busy:
            raise APIError(409, "a profile is already being recorded; wait for its answer, then ask again",
                           code="profile_in_progress")
        is_busy = True
        try:
            profiler = StepProfiler(num_steps, timeout_s)
            try:
                ctx.engine.add_step_hook(profiler)
                result = await asyncio.wait_for(asyncio.wrap_future(profiler.future), timeout_s + _STOP_GRACE_S)
            except EngineDeadError as exc:
                raise APIError(503, f"{exc}; nothing to profile", code="engine_dead") from None
            except TimeoutError:
                raise APIError(503, f"the engine did not finish a step within {timeout_s + _STOP_GRACE_S:g} s",
                               code="profile_timeout") from None
            if result.prof is None:
                raise APIError(408, f"no engine step ran in {timeout_s:g} s: the engine is idle; send requests "
                                    f"while profiling, or raise timeout", code="engine_idle", param="timeout")
            path = os.path.join(config.profile_dir,
                                f"roofline-profile-{time.strftime('%Y%m%d-%H%M%S')}-{next(sequence)}.json")
            try:
                await asyncio.to_thread(result.prof.export_chrome_trace, path)  # seconds for many steps
            except OSError as exc:
                raise APIError(500, f"cannot write the trace to {path}: {exc.strerror or exc}",
                               code="profile_write_failed") from None
        finally:
            is_busy = False
        return JSONResponse({"path": path, "num_steps": result.num_steps, "steps_requested": num_steps,
                             "complete": result.num_steps == num_steps, "format": "chrome-trace"})
