"""The files a scenario names, read once where the scenario was loaded.

A simulation reads its trace, token-count files and cold-start samples only through `Inputs`.
A sweep reads them once on the machine that runs the command (where the scenario's relative
paths make sense) and ships the parsed arrays to its workers (one copy per Ray node, through
the object store), so a worker needs neither the files nor the user's working directory, and
every bad file is reported before the first simulation starts. Engine profiles are read in by
`load_scenario` itself and travel inside the scenario.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from rollout.errors import InputError
from rollout.scenario import ColdStartSpec, Scenario, TokenCounts
from rollout.traces import Trace, read_token_column, read_trace_csv
from sim.coldstart import read_samples


@dataclass(frozen=True)
class Inputs:
    """Parsed file contents by path: traces, token-count columns, cold-start samples."""

    traces: Mapping[Path, Trace] = field(default_factory=dict)
    token_columns: Mapping[tuple[Path, str], np.ndarray] = field(default_factory=dict)
    cold_starts: Mapping[Path, np.ndarray] = field(default_factory=dict)

    def trace(self, path: Path) -> Trace:
        return _get(self.traces, path, path)

    def token_column(self, path: Path, column: str) -> np.ndarray:
        return _get(self.token_columns, (path, column), path)

    def cold_start(self, spec: ColdStartSpec) -> np.ndarray | None:
        """The samples of an empirical cold start; None for the other kinds."""
        if spec.kind != "empirical":
            return None
        assert spec.path is not None  # the schema requires it
        return _get(self.cold_starts, spec.path, spec.path)

    @property
    def nbytes(self) -> int:
        arrays = [a for t in self.traces.values() for a in _arrays(t)]
        arrays += [*self.token_columns.values(), *self.cold_starts.values()]
        return sum(a.nbytes for a in arrays)


def _arrays(trace: Trace) -> Iterator[np.ndarray]:
    for a in (trace.arrival_s, trace.context_tokens, trace.generated_tokens):
        if a is not None:
            yield a


K = TypeVar("K")
V = TypeVar("V")


def _get(table: Mapping[K, V], key: K, path: Path) -> V:
    try:
        return table[key]
    except KeyError:
        raise InputError(
            f"{path} was not read with the scenario: read its inputs again after changing it"
        ) from None


def read_inputs(scenario: Scenario) -> Inputs:
    """Every file the scenario names, read and checked (the first bad one raises InputError)."""
    traces: dict[Path, Trace] = {}
    columns: dict[tuple[Path, str], np.ndarray] = {}
    samples: dict[Path, np.ndarray] = {}
    spec = scenario.trace
    if spec.path is not None:
        traces[spec.path] = read_trace_csv(spec.path)
    if spec.synthetic is not None:
        syn = spec.synthetic
        for value, default in (
            (syn.context_tokens, "ContextTokens"),
            (syn.generated_tokens, "GeneratedTokens"),
        ):
            if isinstance(value, TokenCounts) and value.kind == "empirical":
                assert value.path is not None  # the schema requires it
                key = (value.path, value.column or default)
                columns[key] = read_token_column(*key)
    for cold in _cold_starts(scenario):
        if cold.kind == "empirical" and cold.path is not None and cold.path not in samples:
            samples[cold.path] = read_samples(cold.path)
    return Inputs(traces, columns, samples)


def _cold_starts(s: Scenario) -> Iterator[ColdStartSpec]:
    yield s.cold_start
    if s.rollout is not None and s.rollout.candidate.cold_start is not None:
        yield s.rollout.candidate.cold_start
    if s.fleet.on_demand is not None:
        yield s.fleet.on_demand.provision_s
