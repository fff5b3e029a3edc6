"""Cold-start times: how long a replica takes from getting its GPU to serving (image pull,
weight load, warm-up), before the health check notices it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rollout.errors import InputError
from rollout.scenario import ColdStartSpec

Z99 = 2.3263478740408408  # standard normal 99th percentile


class ColdStart:
    """Draws cold starts for one version: deterministic, lognormal (by p50/p99) or empirical.

    Empirical samples are read as equally spaced quantiles and sampled by interpolating between
    them, so a file of percentiles and a file of raw samples both keep their shape.
    """

    def __init__(
        self, spec: ColdStartSpec, rng: np.random.Generator, samples: np.ndarray | None = None
    ) -> None:
        """`samples`: an empirical spec's file, already read (`sim.inputs`); else it is read."""
        self.spec = spec
        self.rng = rng
        self.samples: np.ndarray | None = None
        if spec.kind == "empirical":
            assert spec.path is not None  # the schema requires it
            self.samples = np.sort(read_samples(spec.path) if samples is None else samples)
        if spec.kind == "lognormal":
            assert spec.p50_s is not None and spec.p99_s is not None
            self.mu = math.log(spec.p50_s)
            self.sigma = (math.log(spec.p99_s) - self.mu) / Z99

    def sample(self, first_of_version: bool = False) -> float:
        """A cold start; the version's first replica's waits `first_of_version_s` more."""
        spec = self.spec
        if spec.kind == "deterministic":
            value = spec.seconds
        elif spec.kind == "lognormal":
            value = math.exp(self.mu + self.sigma * float(self.rng.standard_normal()))
        else:
            assert self.samples is not None
            position = float(self.rng.random()) * (len(self.samples) - 1)
            value = float(np.interp(position, np.arange(len(self.samples)), self.samples))
        return value * spec.scale + (spec.first_of_version_s if first_of_version else 0.0)


def read_samples(path: Path) -> np.ndarray:
    """Cold-start samples from a CSV: a `seconds` column, or `value` in milliseconds (the
    Alibaba telemetry's format)."""
    if not path.is_file():
        raise InputError(f"no such cold-start sample file: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        raise InputError(f"{path}: not a readable CSV file of cold-start samples") from None
    if "seconds" in frame.columns:
        raw, factor = frame["seconds"], 1.0
    elif "value" in frame.columns:
        raw, factor = frame["value"], 1e-3
    else:
        raise InputError(f"{path}: needs a `seconds` (or `value` in ms) column of cold starts")
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float) * factor
    if len(values) == 0:
        raise InputError(f"{path}: has no cold-start samples")
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if len(bad):
        i = int(bad[0])
        raise InputError(f"{path}: line {i + 2}: {raw.iloc[i]!r} is not a duration >= 0")
    return values
