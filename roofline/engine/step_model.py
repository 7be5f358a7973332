"""StepTimeModel: the time of an engine step predicted from its composition, fitted to measured steps.

A step's time is modelled as a non-negative combination of what it computes:

    seconds = base + per_seq * sequences + per_token * tokens + per_context * context_tokens / 1024

where `sequences` are the rows sampled (one per scheduled request), `tokens` the tokens computed
(prompt chunks and decodes), and `context_tokens` the cached tokens attention reads. These are the
planner's terms (fixed cost, per-row matmul and sampling cost, per-token FLOPs, KV bytes read),
fitted on this machine from the engine's own steps instead of a saved profile, so they follow the
kernels and threads actually in use. Coefficients are fitted by non-negative least squares over the
most recent steps, so a prediction never falls as work is added.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

NUM_TERMS = 4
MIN_SAMPLES = 16  # steps measured before the model predicts anything
REFIT_EVERY = 16  # steps between refits
BIAS_WINDOW = 64  # recent steps whose measured/predicted ratio scales predictions
MAX_BIAS = 3.0


@dataclass(frozen=True)
class StepShape:
    """What one step computes."""

    num_seqs: int  # scheduled requests (rows sampled)
    num_tokens: int  # tokens computed: prompt chunks plus one per decode
    num_context_tokens: int = 0  # cached tokens attention reads, over all scheduled requests

    def features(self) -> tuple[float, ...]:
        """The model's regressors, in coefficient order."""
        return 1.0, float(self.num_seqs), float(self.num_tokens), self.num_context_tokens / 1024


class StepTimeModel:
    """Predicts step seconds from a StepShape; `observe` measured steps, `predict` new ones."""

    def __init__(self, window: int = 512, coefficients: tuple[float, ...] | None = None) -> None:
        """`coefficients`: fixed (base, per_seq, per_token, per_1k_context) seconds, e.g. for tests; never refitted."""
        if coefficients is not None and (len(coefficients) != NUM_TERMS or min(coefficients) < 0):
            raise ValueError(f"coefficients must be {NUM_TERMS} non-negative numbers, got {coefficients}")
        self._samples: deque[tuple[tuple[float, ...], float]] = deque(maxlen=window)
        self._coef: np.ndarray | None = None if coefficients is None else np.asarray(coefficients, dtype=float)
        self._is_fixed = coefficients is not None
        self._since_fit = 0
        # measured / fitted over the most recent steps: the fit averages over the whole window and runs low when
        # steps have lately cost more than it says (mixed prompt and decode steps, a busy host); this corrects it
        self._bias = 1.0

    @property
    def is_ready(self) -> bool:
        """True once the model can predict."""
        return self._coef is not None

    @property
    def coefficients(self) -> tuple[float, ...] | None:
        """(base, per_seq, per_token, per_1k_context) in seconds, or None before the first fit."""
        return None if self._coef is None else tuple(float(c) for c in self._coef)

    def observe(self, shape: StepShape, seconds: float) -> None:
        """Record one measured step; refits every few steps."""
        if self._is_fixed or shape.num_tokens == 0 or not seconds > 0:
            return
        self._samples.append((shape.features(), seconds))
        self._since_fit += 1
        if len(self._samples) >= MIN_SAMPLES and (self._coef is None or self._since_fit >= REFIT_EVERY):
            self._fit()

    def predict(self, shape: StepShape) -> float | None:
        """Predicted seconds of a step of this shape, or None before enough steps were measured."""
        if self._coef is None:
            return None
        return float(np.dot(self._coef, shape.features())) * self.bias

    @property
    def bias(self) -> float:
        """How much longer than the fit recent steps took (mean ratio, 1 to MAX_BIAS); 1 for fixed coefficients."""
        return self._bias

    def max_tokens_within(self, seconds: float, num_seqs: int, num_fixed_tokens: int, num_context_tokens: int,
                          limit: int) -> int | None:
        """Most tokens a step with this many sequences may add to `num_fixed_tokens` and still take <= `seconds`.

        None before the model is ready; 0 when even the fixed part takes longer. Capped at `limit`.
        """
        if self._coef is None:
            return None
        fixed = self.predict(StepShape(num_seqs, num_fixed_tokens, num_context_tokens))
        room = seconds - fixed
        if room <= 0:
            return 0
        per_token = float(self._coef[2]) * self.bias
        return limit if per_token <= 0 else min(limit, int(room / per_token))

    def prefill_seconds(self, num_prompt_tokens: int, chunk_tokens: int) -> float | None:
        """Predicted time to compute a prompt alone on an idle engine, in chunks of `chunk_tokens`."""
        if self._coef is None:
            return None
        total, done = 0.0, 0
        while done < num_prompt_tokens:
            n = min(chunk_tokens, num_prompt_tokens - done)
            total += self.predict(StepShape(1, n, done))
            done += n
        return total

    def _fit(self) -> None:
        x = np.array([f for f, _ in self._samples])  # [num_samples, NUM_TERMS]
        y = np.array([s for _, s in self._samples])  # [num_samples]
        self._coef = non_negative_least_squares(x, y)
        self._since_fit = 0
        fitted = x[-BIAS_WINDOW:] @ self._coef
        recent = y[-BIAS_WINDOW:][fitted > 0] / fitted[fitted > 0]
        self._bias = min(MAX_BIAS, max(1.0, float(recent.mean()))) if recent.size else 1.0


def non_negative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y|| over c >= 0, by trying every subset of columns (few columns, so exact and cheap)."""
    num_terms = x.shape[1]
    best, best_residual = np.zeros(num_terms), float(np.sum(y * y))
    for size in range(1, num_terms + 1):
        for cols in itertools.combinations(range(num_terms), size):
            sub, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(sub < 0):
                continue
            c = np.zeros(num_terms)
            c[list(cols)] = sub
            r = y - x @ c
            residual = float(np.sum(r * r))
            if residual < best_residual:
                best, best_residual = c, residual
    return best
