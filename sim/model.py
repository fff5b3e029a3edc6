"""The simulation: SimPy runs the control plane, the router runs the requests in between.

The rollout controller is the shared one from `rollout/`, driven through the same `Driver` as
the Ray Serve executor; this module is only its backend (observe the replica counts, apply
scale and weight actions). The controller ticks when something it waits for happens (a replica
turns ready or stops, a control arrives), when a stabilization window ends, and every health
check period as a heartbeat for its deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import simpy

from rollout import controller as c
from rollout import history as h
from rollout.autoscaler import Autoscaler
from rollout.driver import Driver
from rollout.errors import InputError
from rollout.scenario import Scenario
from rollout.traces import load_trace
from sim.cluster import Cluster, Faults
from sim.coldstart import ColdStart
from sim.gpus import GpuSupply
from sim.inputs import Inputs, read_inputs
from sim.replica import CANDIDATE, CURRENT, VERSION_NAMES, Replica, State
from sim.result import (
    TIMELINE_COLUMNS,
    Billing,
    RolloutOutcome,
    SimResult,
    guard_summary,
    split_summary,
    summarize,
)
from sim.router import DROPPED, FAILED, Router
from sim.service import service_times

Progress = Callable[[int, int], None]
_VERSION = {c.CURRENT: CURRENT, c.CANDIDATE: CANDIDATE}
# a run stops at the latest this long after its last arrival, control or rollout start
# (a rollout paused for good would otherwise never end)
HORIZON_S = 7 * 24 * 3600.0


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int | None = None,
        progress: Progress | None = None,
        inputs: Inputs | None = None,
    ) -> None:
        """`inputs`: the scenario's files, read beforehand (a sweep reads them once and ships
        them to its workers); None reads them here."""
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.progress = progress
        s, seed = scenario, self.seed
        if seed < 0:
            raise InputError(f"the seed must be a whole number >= 0 (got {seed})")
        self._check(s)
        inputs = read_inputs(s) if inputs is None else inputs
        self.trace = load_trace(s.trace, seed=seed, files=inputs)
        cand = s.rollout.candidate if s.rollout else None
        cand_service = cand.service if cand and cand.service else s.service
        cand_cold = cand.cold_start if cand and cand.cold_start else s.cold_start
        cand_faults = cand.faults if cand and cand.faults else s.faults
        self.overhead_s = (s.service.overhead_s, cand_service.overhead_s)
        svc_current = service_times(s.service, self.trace, seed)
        svc_candidate = (
            svc_current
            if cand_service == s.service
            else service_times(cand_service, self.trace, seed)
        )
        fails = None
        if cand is not None and cand.error_rate > 0:
            draw = np.random.default_rng([seed, 0xBAD]).random(len(self.trace.arrival_s))
            fails = draw < cand.error_rate
        sessions = self.trace.session_point if s.routing.sticky else None
        if s.routing.sticky and sessions is None:
            raise InputError(
                "routing.sticky needs sessions: a session_id column in the trace, or "
                "trace.synthetic.process: sessions"
            )
        self.env = simpy.Environment()
        self.router = Router(
            self.trace.arrival_s,
            (svc_current, svc_candidate),
            max_ongoing=s.fleet.max_ongoing_requests,
            timeout_s=s.fleet.request_timeout_s,
            seed=seed,
            on_drained=self._drained,
            fails=fails,
            sessions=sessions,
        )
        on_demand = s.fleet.on_demand
        self.gpus = GpuSupply(
            self.env,
            s.fleet,
            None
            if on_demand is None
            else ColdStart(
                on_demand.provision_s,
                np.random.default_rng([seed, 0x40DE]),
                inputs.cold_start(on_demand.provision_s),
            ),
            on_grant=lambda _: None,  # the cluster takes this over
            on_change=self._changed,
        )
        self.cluster = Cluster(
            self.env,
            gpus=self.gpus,
            health_period_s=s.health_check.period_s,
            drain_timeout_s=s.fleet.graceful_shutdown_timeout_s,
            drain_loop_s=s.fleet.graceful_shutdown_wait_loop_s,
            cold_starts=(
                ColdStart(
                    s.cold_start,
                    np.random.default_rng([seed, 0xC01D, 0]),
                    inputs.cold_start(s.cold_start),
                ),
                ColdStart(
                    cand_cold,
                    np.random.default_rng([seed, 0xC01D, 1]),
                    inputs.cold_start(cand_cold),
                ),
            ),
            faults=(
                Faults(s.faults, np.random.default_rng([seed, 0xFA17, 0])),
                Faults(cand_faults, np.random.default_rng([seed, 0xFA17, 1])),
            ),
            router=self.router,
            on_change=self._changed,
        )
        self.autoscaler: Autoscaler | None = None
        self.desired = s.fleet.replicas
        if s.autoscaling is not None:
            a = s.autoscaling
            self.desired = min(max(self.desired, a.min_replicas), a.max_replicas)
            self.autoscaler = Autoscaler.start(a, self.desired)
            self.desired = self.autoscaler.desired
        self.serving = CURRENT  # the version the autoscaler sizes outside a rollout
        self.driver: Driver | None = None
        self.rollout_start: float | None = None
        self.rollout_end: float | None = None
        self.rows: list[tuple[float, ...]] = []
        self._last_row: tuple[float, ...] | None = None
        self._tick_due = False
        self._wakeups: set[float] = set()
        self._controls_left = len(s.rollout.controls) if s.rollout else 0

    @staticmethod
    def _check(s: Scenario) -> None:
        if s.rollout is None:
            return
        for i, ctl in enumerate(s.rollout.controls):
            if ctl.at_s < s.rollout.at_s:
                raise InputError(
                    f"rollout.controls.{i}.at_s ({ctl.at_s:g}) is before the rollout starts "
                    f"(rollout.at_s {s.rollout.at_s:g})"
                )

    # ---- the backend protocol (rollout.driver.Backend) -----------------------------------

    def clock(self) -> float:
        return self.env.now

    def observe(self) -> c.Observation:
        current = self.cluster.observe(CURRENT)
        candidate = self.cluster.observe(CANDIDATE)
        guard = self.driver.state.policy.guard if self.driver else None
        if guard is not None:  # the metric guard's window, measured only when it has one
            cur, cand = self.router.traffic(self.env.now, guard.window_s)
            current = replace(current, traffic=cur)
            candidate = replace(candidate, traffic=cand)
        return c.Observation(
            time=self.env.now,
            desired=self.desired,
            current=current,
            candidate=candidate,
            capacity=self.gpus.max_replicas,
        )

    def apply(self, actions: Sequence[c.Action]) -> None:
        for action in actions:
            if isinstance(action, c.ScaleTo):
                self.cluster.scale_to(_VERSION[action.version], action.replicas)
            elif isinstance(action, c.SetWeight):
                self.router.set_weight(action.candidate_weight, action.session_weight)
                self._record()
            elif isinstance(action, c.Finish):
                self._finished(action.outcome)

    # ---- control plane -------------------------------------------------------------------

    def _changed(self) -> None:
        self._record()
        self._poke()

    def _record(self) -> None:
        cur = self.cluster.counts[CURRENT]
        cand = self.cluster.counts[CANDIDATE]
        row = (
            cur[State.READY],
            cur[State.PENDING_GPU] + cur[State.STARTING],
            cur[State.DRAINING],
            cand[State.READY],
            cand[State.PENDING_GPU] + cand[State.STARTING],
            cand[State.DRAINING],
            cur[State.PENDING_GPU] + cand[State.PENDING_GPU],
            self.gpus.in_use,
            self.gpus.on_demand_in_use,
            self.gpus.on_demand_nodes,
            self.router.weight,
            self.desired,
            self.driver.state.step if self.driver else 0,
        )
        if row != self._last_row:
            self._last_row = row
            self.rows.append((self.env.now, *row))

    def _drained(self, rep: Replica, t: float) -> None:
        self.cluster.drained(rep, t)

    def _poke(self) -> None:
        """Tick the controller once more at this instant, after the changes in progress."""
        if self._tick_due or self.driver is None or self.driver.done:
            return
        self._tick_due = True
        self.env.timeout(0).callbacks.append(self._poked)

    def _poked(self, _: simpy.Event) -> None:
        self._tick_due = False
        self._tick()

    def _tick(self) -> None:
        driver = self.driver
        if driver is None or driver.done:
            return
        before = driver.state.step
        driver.tick(self)
        if driver.state.step != before:
            self._record()
        until = driver.state.stabilize_until
        if until is not None and until > self.env.now and until not in self._wakeups:
            self._wakeups.add(until)
            self.env.timeout(until - self.env.now).callbacks.append(lambda _: self._tick())

    def _finished(self, outcome: c.Phase) -> None:
        self.rollout_end = self.env.now
        self.serving = CANDIDATE if outcome is c.Phase.SUCCEEDED else CURRENT

    def _autoscale(self) -> Generator[simpy.Event, object, None]:
        scaler = self.autoscaler
        assert scaler is not None
        tick = self.env.now
        while True:
            # chained from the exact previous tick: adding the interval in floating point
            # drifts, and the simulator would decide a tick late
            tick = scaler.next_tick(tick)
            yield self.env.timeout(max(0.0, tick - self.env.now))
            now = self.env.now
            counts = self.cluster.counts
            running = counts[CURRENT][State.READY] + counts[CANDIDATE][State.READY]
            desired = scaler.observe(now, self.router.ongoing(now), running)
            if desired == self.desired:
                continue
            self.desired = desired
            if self._rolling:
                self._record()
                self._poke()
            else:
                self.cluster.scale_to(self.serving, desired)
                self._record()

    @property
    def _rolling(self) -> bool:
        return self.driver is not None and not self.driver.done

    def _rollout(self) -> Generator[simpy.Event, object, None]:
        spec = self.scenario.rollout
        assert spec is not None
        yield self.env.timeout(spec.at_s)
        self.rollout_start = self.env.now
        self.driver = Driver.begin(spec.policy, self.desired, self.env.now)
        self._tick()
        period = self.scenario.health_check.period_s
        while not self.driver.done:
            yield self.env.timeout(period)
            self._tick()

    def _control(self, at_s: float, action: c.Control) -> Generator[simpy.Event, object, None]:
        yield self.env.timeout(at_s)
        assert self.driver is not None  # controls are never before the rollout starts
        self.driver.control(action, self.env.now)
        self._controls_left -= 1
        self._tick()

    # ---- running -------------------------------------------------------------------------

    def _quiet(self) -> bool:
        """Nothing more will happen to the rollout: none, finished, or paused for good."""
        if self.scenario.rollout is None:
            return True
        if self.driver is None:
            return False
        if self.driver.done:
            return True
        return self.driver.state.phase is c.Phase.PAUSED and self._controls_left == 0

    def run(self) -> SimResult:
        env, router, s = self.env, self.router, self.scenario
        self.cluster.boot(CURRENT, self.desired)
        if self.autoscaler is not None:
            env.process(self._autoscale())
        horizon = self.trace.duration_s
        if s.rollout is not None:
            env.process(self._rollout())
            for ctl in sorted(s.rollout.controls, key=lambda x: x.at_s):
                env.process(self._control(ctl.at_s, ctl.action))
            last = max([s.rollout.at_s, *(x.at_s for x in s.rollout.controls)])
            horizon = max(horizon, last)
        horizon += HORIZON_S
        n = router.n
        report_every = max(1, n // 100)
        next_report = report_every
        while True:
            t = env.peek()
            router.advance(min(t, horizon))
            if env.peek() < t:
                continue  # a replica drained: the control plane acts before anything later
            if self.progress is not None and router.next_i >= next_report:
                self.progress(router.next_i, n)
                next_report = router.next_i + report_every
            if (router.idle and self._quiet()) or t > horizon:
                break
            if t == math.inf:
                if router.idle:
                    break
                continue
            env.step()
        router.finish()
        if self.progress is not None:
            self.progress(n, n)
        return self._result()

    def _result(self) -> SimResult:
        s, router = self.scenario, self.router
        arrival = router.arrival_s
        start, end, first = router.start_s, router.end_s, router.first_s
        status = router.status_of
        served = status == 0
        # the serving stack's own time per request, outside the replica (`service.overhead_s`)
        over = np.take(np.asarray(self.overhead_s), router.version_of)
        requests = pd.DataFrame(
            {
                "arrival_s": arrival,
                "start_s": start,
                "end_s": end,
                "wait_s": start - arrival,
                "latency_s": np.where(served, end - arrival + over, np.nan),
                "ttft_s": np.where(served, first - arrival + over, np.nan),
                "version": pd.Categorical.from_codes(
                    router.version_of, categories=list(VERSION_NAMES)
                ),
                "replica_id": router.replica_id,
                "dropped": status == DROPPED,
                "failed": status == FAILED,
            },
            copy=False,
        )
        timeline = pd.DataFrame(self.rows, columns=list(TIMELINE_COLUMNS))
        timeline["t_s"] = timeline["t_s"].astype(float)
        timeline["candidate_weight"] = timeline["candidate_weight"].astype(float)
        for col in TIMELINE_COLUMNS[1:]:
            if col != "candidate_weight":
                timeline[col] = timeline[col].astype(np.int32)
        last_end = float(np.nanmax(end)) if len(end) and not np.all(np.isnan(end)) else 0.0
        end_s = max(self.env.now, last_end, self.trace.duration_s)
        if self.rollout_end is not None:
            end_s = max(end_s, self.rollout_end)
        outcome = self._outcome()
        summary = summarize(
            requests,
            timeline,
            outcome,
            end_s=end_s,
            billing=Billing.of(s.fleet),
            seed=self.seed,
            scenario=s.name,
        )
        events = list(self.driver.history) if self.driver else []
        bad = s.rollout is not None and s.rollout.candidate.bad
        summary |= guard_summary(requests, timeline, events, bad=bad)
        summary |= split_summary(requests, timeline, outcome, end_s)
        return SimResult(summary, requests, timeline, events, self._replicas())

    def _replicas(self) -> pd.DataFrame:
        reps = self.cluster.replicas

        def times(name: str) -> np.ndarray:
            values = [getattr(r, name) for r in reps]
            return np.array([np.nan if v is None else v for v in values], dtype=float)

        return pd.DataFrame(
            {
                "replica_id": np.array([r.id for r in reps], dtype=np.int32),
                "version": pd.Categorical.from_codes(
                    [r.version for r in reps], categories=list(VERSION_NAMES)
                ),
                "created_s": times("created_at"),
                "gpu_s": times("gpu_at"),
                "ready_s": times("ready_at"),
                "stopped_s": times("stopped_at"),
                "stop_reason": pd.Categorical(
                    [r.stop_reason for r in reps],
                    categories=["", "removed", "start_failed", "crashed", "drain_timeout"],
                ),
            }
        )

    def _outcome(self) -> RolloutOutcome:
        if self.scenario.rollout is None:
            return RolloutOutcome(None, None, "none", 0, None)
        policy = self.scenario.rollout.policy.label()
        if self.driver is None:  # the run ended before the rollout was due
            return RolloutOutcome(None, None, "none", 0, policy)
        state = self.driver.state
        end = self.rollout_end if state.terminal else None
        capped = [e.allowed for e in self.driver.history if isinstance(e, h.Capped)
                  and e.allowed < e.desired]  # fmt: skip
        return RolloutOutcome(
            self.rollout_start,
            end,
            state.phase.value,
            state.step,
            policy,
            capped_at=min(capped) if capped else None,
        )
