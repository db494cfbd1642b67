"""Step caching (ComfyUI's EasyCache and LazyCache): a model function wrapper that skips the
model on sampling steps whose input changed little since the last computed step, answering
with the new input plus the output change (x0 - x) cached at that computed step.

The decision follows EasyCache's estimate. At each computed step the wrapper keeps the
driving slice of the input and output, subsampled every 8th cell on both spatial axes, and
the mean |output|. From the second computed step on it knows the model's transformation
rate k = mean|out - out_prev| / mean|in - in_prev|; each later step adds
k * mean|in - in_prev| / mean|out_prev| to a running sum, and while that sum stays under
`reuse_threshold` the step is skipped (the sum restarts at 0 once a step is computed).
Only steps with start sigma >= sigma > end sigma are considered; at or below the end sigma
the model always runs and the state is left as it is.

EasyCache drives the decision from the first chunk of the first call of a step (ComfyUI's
first cond) and skips every call of a step once that one is skipped; LazyCache measures the
whole batch of every call. Both cache one output change per call of a step (by its position
in the step and its cond/uncond layout), so a cond/uncond batch or separate calls are each
answered with their own change. Differences to ComfyUI: the wrapper sees the sampler's
latent and x0 (ComfyUI's EasyCache sees the network's scaled input and raw output, LazyCache
the guided x0), and LazyCache's skip applies per call rather than to the guided result (the
same x0 for the standard linear CFG).

State belongs to one wrapper object (one per patched MODEL) and starts over with each
sampling run: a new schedule (``sample_sigmas``), a sigma above the previous call's, or a
change of the latent's shape, dtype or device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)

SUBSAMPLE = 8  # every 8th latent cell on both spatial axes, as ComfyUI measures
CallKey = tuple[int, tuple[int, ...]]  # (position of the call in its step, cond/uncond layout)


@dataclass
class _RunState:
    """What one sampling run has learnt; replaced wholesale at each new run."""

    schedule: Tensor | None = None
    last_sigma: float | None = None
    step_calls: int = 0  # calls made so far at the current sigma
    metadata: tuple[Any, ...] | None = None
    skip_step: bool = False
    in_prev: Tensor | None = None
    out_prev: Tensor | None = None
    out_prev_norm: Tensor | None = None
    rate: Tensor | None = None
    cumulative: float = 0.0
    diffs: dict[CallKey, Tensor] = field(default_factory=dict)
    skipped: int = 0
    calls: int = 0


@dataclass(eq=False)
class StepCache:
    """``model_function_wrapper`` doing EasyCache (`whole_batch` False) or LazyCache (True)."""

    name: str
    reuse_threshold: float
    start_sigma: float
    end_sigma: float
    whole_batch: bool
    verbose: bool = False
    state: _RunState = field(default_factory=_RunState)

    def __call__(self, apply_model: Callable[..., Tensor], args: dict[str, Any]) -> Tensor:
        x, sigma, c = args["input"], args["timestep"], args["c"]
        layout = tuple(int(side) for side in args["cond_or_uncond"])
        key = self._enter_call(x, float(sigma[0]), c.get("transformer_options", {}), layout)
        if float(sigma[0]) <= self.end_sigma:
            return apply_model(x, sigma, **c)
        considered = float(sigma[0]) <= self.start_sigma
        drives = considered and key[0] == 0  # this call measures and decides for its step
        input_change = self._input_change(x, layout) if drives else None
        if considered and self._should_skip(key, x, drives, input_change):
            return self._reuse(key, x)
        output = apply_model(x, sigma, **c)
        self._remember(key, x, output, layout, drives, input_change)
        return output

    @property
    def skipped_steps(self) -> int:
        """Steps answered from the cache in the current (or last) sampling run."""
        return self.state.skipped

    def _enter_call(self, x: Tensor, sigma: float, options: dict[str, Any],
                    layout: tuple[int, ...]) -> CallKey:
        """Start a new run or step where this call begins one; the call's key."""
        state = self.state
        schedule = options.get("sample_sigmas")
        metadata = (x.device, x.dtype, tuple(x.shape[1:]))
        new_schedule = schedule is not None and schedule is not state.schedule
        if (new_schedule or state.last_sigma is None or sigma > state.last_sigma
                or (state.metadata is not None and metadata != state.metadata)):
            self._reset(schedule, metadata)
        state = self.state
        if sigma != state.last_sigma:
            state.last_sigma, state.step_calls, state.skip_step = sigma, 0, False
        state.step_calls += 1
        return state.step_calls - 1, layout

    def _reset(self, schedule: Tensor | None, metadata: tuple[Any, ...]) -> None:
        if self.state.calls:
            log.info("%s - skipped %d model calls of %d", self.name, self.state.skipped,
                     self.state.calls)
        log.info("%s enabled - threshold: %s, start sigma: %s, end sigma: %s", self.name,
                 self.reuse_threshold, self.start_sigma, self.end_sigma)
        self.state = _RunState(schedule=schedule, metadata=metadata)

    def _driver(self, t: Tensor, layout: tuple[int, ...]) -> Tensor:
        """The measured part of a call's tensor, subsampled."""
        if not self.whole_batch:
            t = t[:t.shape[0] // len(layout)]
        return t[..., ::SUBSAMPLE, ::SUBSAMPLE]

    def _input_change(self, x: Tensor, layout: tuple[int, ...]) -> Tensor | None:
        if self.state.in_prev is None:
            return None
        return (self._driver(x, layout) - self.state.in_prev).abs().mean()

    def _should_skip(self, key: CallKey, x: Tensor, drives: bool,
                     input_change: Tensor | None) -> bool:
        state = self.state
        cached = key in state.diffs and state.diffs[key].shape == x.shape
        if not drives:
            return state.skip_step and cached
        if input_change is None or state.rate is None or state.out_prev_norm is None:
            return False
        state.cumulative += float(state.rate * input_change / state.out_prev_norm)
        if state.cumulative < self.reuse_threshold and cached:
            state.skip_step = True
            self._say("skipping step; cumulative change rate %s", state.cumulative)
            return True
        self._say("NOT skipping step; cumulative change rate %s", state.cumulative)
        state.cumulative = 0.0
        return False

    def _reuse(self, key: CallKey, x: Tensor) -> Tensor:
        self.state.calls += 1
        self.state.skipped += 1
        return x + self.state.diffs[key].to(x.device)

    def _remember(self, key: CallKey, x: Tensor, output: Tensor, layout: tuple[int, ...],
                  drives: bool, input_change: Tensor | None) -> None:
        state = self.state
        state.calls += 1
        state.diffs[key] = (output - x).detach()
        if not drives:
            return
        out = self._driver(output, layout).detach()
        if state.out_prev is not None and input_change is not None and input_change > 0:
            state.rate = (out - state.out_prev).abs().mean() / input_change
        state.in_prev = self._driver(x, layout).detach().clone()
        state.out_prev = out.clone()
        state.out_prev_norm = output.detach().abs().mean()

    def _say(self, message: str, *values: Any) -> None:
        if self.verbose:
            log.info("%s [verbose] - " + message, self.name, *values)
