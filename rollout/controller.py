"""The rollout controller: a pure, serialisable state machine shared by both backends.

`decide(state, observation)` reads what the cluster looks like and returns the next state, the
actions a backend must apply (in order) and the events for the history. There is no clock, no
I/O and no framework in here: time arrives inside the observation, so the same controller runs
on SimPy time in `sim/` and on wall-clock time in a durable workflow in `executor/`.

One step, by mode (I = incoming version, O = outgoing; forward I is the candidate, and a
cancelled rollout ramps back with I = current):

    surge:        boundary → scale I up → wait for health → shift traffic + scale O down → stabilize
    unavailable:  boundary → scale O down → scale I up → wait for health → shift traffic → stabilize

A first deploy is the same machine started from an empty current version: one step that starts
all N candidates, with the same deadline, failed-start limit and controls. Failures of the
backend arrive as part of the observation (`errors`, `error`, `seen`); too many in a row fail
the rollout and roll it back, as a missed deadline does.

The metric guard (`policy.guard`) judges the candidate's traffic over a sliding window, which the
backend measures and hands over in the observation (`VersionObservation.traffic`): a breach
while rolling forward cancels the rollout (or force-cancels it), paused or not; a step boundary
records the window's verdict before the next step starts (`rollout/guard.py`).

Targets are absolute replica counts (scale to N, never by a delta), so replaying a decision or
retrying an action is harmless: after a failed iteration the next decision first applies the
recorded state again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from pydantic import TypeAdapter

from rollout import history as h
from rollout.capacity import cap_desired
from rollout.guard import Outcome, Traffic, Verdict, judge
from rollout.planner import (
    candidate_share,
    headroom,
    outgoing_removal,
    proportional_resize,
    ready_floor,
    round_half_away,
    step_count,
    step_size,
)
from rollout.policy import Mode, RolloutPolicy
from rollout.sticky import next_session_weight

CURRENT = "current"
CANDIDATE = "candidate"


class Phase(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.CANCELLED, Phase.FAILED)


class Direction(StrEnum):
    FORWARD = "forward"  # towards the candidate
    BACKWARD = "backward"  # cancelled: ramping back to the current version


class Stage(StrEnum):
    BOUNDARY = "boundary"  # between steps: controls take effect here
    SCALE_DOWN = "scale_down"
    SCALE_UP = "scale_up"
    WAIT_HEALTHY = "wait_healthy"
    SHIFT = "shift"
    STABILIZE = "stabilize"
    FINISHING = "finishing"  # the outgoing version drains away
    ROLLBACK = "rollback"  # force-cancel, failure, or cancel of a first deploy: all at once
    DONE = "done"


class Control(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FORCE_CANCEL = "force_cancel"
    ROLL_FORWARD = "roll_forward"


@dataclass(frozen=True)
class VersionObservation:
    """One version's replicas as the backend sees them, and its traffic over the guard's window
    (what a backend without metrics leaves empty: the guard then never has enough requests).
    `pending_gpu` is part of `starting`."""

    ready: int = 0
    starting: int = 0
    draining: int = 0
    failed_starts: int = 0  # cumulative since the rollout began
    pending_gpu: int = 0
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def holding(self) -> int:
        return self.ready + self.starting + self.draining


@dataclass(frozen=True)
class Observation:
    time: float
    desired: int  # the pool's desired replica count (autoscaler or fleet size)
    current: VersionObservation
    candidate: VersionObservation
    # replicas' worth of GPUs the cluster can give the pool (held by it + free); None: no limit
    capacity: int | None = None
    errors: int = 0  # consecutive failed iterations (observe or apply) up to this one
    error: str = ""  # the last failure's message
    seen: bool = True  # False: observing failed, and the counts above mean nothing

    def of(self, version: str) -> VersionObservation:
        return self.current if version == CURRENT else self.candidate

    @classmethod
    def unseen(cls, time: float, errors: int, error: str) -> Observation:
        """What a failed observation tells the controller: only the time and the failure."""
        empty = VersionObservation()
        return cls(time, 0, empty, empty, errors=errors, error=error, seen=False)


@dataclass(frozen=True)
class ScaleTo:
    version: str
    replicas: int


@dataclass(frozen=True)
class SetWeight:
    """The candidate's share of requests; `session_weight` is its share of sticky sessions
    (rollout/sticky.py), the same unless given."""

    candidate_weight: float
    session_weight: float = -1.0

    def __post_init__(self) -> None:
        if self.session_weight < 0:
            object.__setattr__(self, "session_weight", self.candidate_weight)


@dataclass(frozen=True)
class Finish:
    outcome: Phase


Action = ScaleTo | SetWeight | Finish


@dataclass(frozen=True)
class RolloutState:
    """Everything the controller knows; round-trips through JSON exactly."""

    policy: RolloutPolicy
    desired: int
    current_target: int
    candidate_target: int = 0
    candidate_weight: float = 0.0
    # the candidate's share of sticky sessions: the weight's high-water mark going forward,
    # the weight itself going back (rollout/sticky.py)
    session_weight: float = 0.0
    phase: Phase = Phase.PROGRESSING
    direction: Direction = Direction.FORWARD
    stage: Stage = Stage.BOUNDARY
    step: int = 0  # steps completed, in either direction
    step_started_at: float = 0.0
    stabilize_until: float | None = None
    failed_starts_at_step: int = 0
    pause_requested: bool = False
    roll_forward_requested: bool = False
    fast_forward: bool = False
    # "", "force_cancel", "cancel" (of a first deploy) or "failed": a rollback that ignores the
    # step cycle
    forced: str = ""
    failure: str = ""  # why it failed
    waiting: str = ""  # the last thing it waited for (recorded once per reason)
    pending: tuple[Control, ...] = field(default_factory=tuple)
    first_deploy: bool = False  # nothing served before: the current version has no replica
    capped: str = ""  # why the pool is smaller than desired (rollout/capacity.py), or ""
    guard_breach: str = ""  # what tripped the metric guard (it judges nothing more)

    def target(self, version: str) -> int:
        return self.current_target if version == CURRENT else self.candidate_target

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    @property
    def planned_steps(self) -> int:
        """Steps a rollout of this size takes with no control and no resize."""
        return 1 if self.first_deploy else step_count(self.policy, self.desired)

    def to_json(self) -> str:
        return _STATE.dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        return _STATE.validate_json(text)

    def summary(self) -> dict[str, object]:
        """The fields `rollout status` prints."""
        d = asdict(self)
        d["policy"] = self.policy.model_dump()
        d["pending"] = [c.value for c in self.pending]
        return d


_STATE = TypeAdapter(RolloutState)


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    actions: tuple[Action, ...]
    events: tuple[h.Event, ...]


def start(
    policy: RolloutPolicy, desired: int, now: float, first_deploy: bool = False
) -> tuple[RolloutState, list[h.Event]]:
    """A new rollout of a pool of `desired` replicas, all on the current version; or, for a
    first deploy, of an empty pool (the current version has no replica and gets none)."""
    if desired < 1:
        raise ValueError(f"a rollout needs at least one replica (got {desired})")
    state = RolloutState(
        policy=policy,
        desired=desired,
        current_target=0 if first_deploy else desired,
        first_deploy=first_deploy,
    )
    started = h.RolloutStarted(
        t=now,
        policy=policy.model_dump(),
        desired=desired,
        steps=state.planned_steps,
        first_deploy=first_deploy,
    )
    return state, [started]


def control(state: RolloutState, ctl: Control, now: float) -> tuple[RolloutState, list[h.Event]]:
    """Record an operator control; `decide` applies it at the moment its semantics say."""
    event = h.ControlReceived(t=now, control=ctl.value)
    if state.terminal:
        return state, [event, h.ControlIgnored(t=now, control=ctl.value, reason="rollout ended")]
    return replace(state, pending=(*state.pending, ctl)), [event]


def decide(state: RolloutState, obs: Observation) -> Decision:
    """The next state, actions and events.

    An unseen observation (observing failed) only counts the failure: no control is taken and
    no action emitted without counts. After a failed iteration (some actions may be lost) a
    decision first applies the recorded state again, then decides as usual.
    """
    if state.terminal:
        return Decision(state, (), ())
    run = _Run(state, obs)
    run.backend_errors()
    if obs.seen:
        if obs.errors:
            run.reassert()
        run.resize()
        run.take_controls()
        run.guard()
        run.advance()
        run.guard_weight()
    else:
        # without counts nothing is safe to apply, not even the weight that failing the
        # rollout moves sessions back to (it may be above the share of what is ready now): the
        # state records it, and the next observed decision, which follows this failed
        # iteration, applies it again (`reassert`) within the share it then sees
        run.actions.clear()
    return Decision(run.state(), tuple(run.actions), tuple(run.events))


class _Run:
    """One decision: the state being built, the actions and events it emits (Argo's context)."""

    def __init__(self, state: RolloutState, obs: Observation) -> None:
        self.s = state
        self.obs = obs
        self.now = obs.time
        self.actions: list[Action] = []
        self.events: list[h.Event] = []
        self.scaled: set[str] = set()  # versions this decision scales: not yet observed
        # per version, replaying this decision's scale actions in order: the replicas live
        # (targets not yet met count as live: the backend starts them), those the actions put
        # to drain, and the lowest target (a replica a scale-down removed stays gone even if a
        # later action scales the version up again: the new ones are not ready)
        self.live: dict[str, int] = {}
        self.dropped = {CURRENT: 0, CANDIDATE: 0}
        self.low: dict[str, int] = {}
        self.verdict: Verdict | None = None  # the metric guard's, when it judged
        for v in (CURRENT, CANDIDATE):
            o = obs.of(v)
            self.live[v] = max(o.ready + o.starting, state.target(v))
            self.low[v] = state.target(v)

    def state(self) -> RolloutState:
        return self.s

    # ---- small helpers -------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self.s.desired

    @property
    def incoming(self) -> str:
        return CANDIDATE if self.s.direction is Direction.FORWARD else CURRENT

    @property
    def outgoing(self) -> str:
        return CURRENT if self.s.direction is Direction.FORWARD else CANDIDATE

    def _update(self, **changes: object) -> None:
        self.s = replace(self.s, **changes)

    def _proj_ready(self, version: str) -> int:
        """Ready replicas once this decision's actions are applied: a scale-down removes
        starting replicas first, and replicas added since are not ready yet."""
        return min(self.obs.of(version).ready, self.low[version])

    def _share(self) -> float | None:
        return candidate_share(self._proj_ready(CANDIDATE), self._proj_ready(CURRENT))

    def _seen_weight(self) -> float:
        """The recorded weight, never above the candidate's share of what is ready now nor
        once this decision's actions hold: replicas may have turned ready (a growing current
        version) or crashed since it was set."""
        shares = (candidate_share(self.obs.candidate.ready, self.obs.current.ready), self._share())
        return min([self.s.candidate_weight, *(x for x in shares if x is not None)])

    def _draining(self) -> int:
        """Replicas draining once this decision's actions are applied: those draining now and
        those its scale-downs remove."""
        return sum(self.obs.of(v).draining + self.dropped[v] for v in (CURRENT, CANDIDATE))

    def _holding(self) -> int:
        """Replicas holding a GPU once the targets are met: starting, ready and draining."""
        return self._draining() + self.live[CURRENT] + self.live[CANDIDATE]

    def _record_scale(self, version: str, replicas: int) -> None:
        self.actions.append(ScaleTo(version, replicas))
        self.scaled.add(version)
        self.dropped[version] += max(0, self.live[version] - replicas)
        self.live[version] = replicas
        self.low[version] = min(self.low[version], replicas)

    def _cap(self) -> int:
        return self.n + headroom(self.s.policy, self.n)

    def _step(self) -> int:
        """Replicas one step replaces; a first deploy, or a roll-forward, takes all at once
        (within the mode's bound)."""
        if self.s.fast_forward or self.s.first_deploy:
            return self.n
        return step_size(self.s.policy, self.n)

    def _transition(self, stage: Stage, reason: str = "", phase: Phase | None = None) -> None:
        self._update(stage=stage, phase=phase or self.s.phase)
        self.events.append(
            h.Transition(
                t=self.now,
                phase=self.s.phase.value,
                stage=stage.value,
                direction=self.s.direction.value,
                step=self.s.step,
                reason=reason,
            )
        )

    def _session_weight(self, w: float) -> float:
        """Sessions move only forward while the rollout does; once it is cancelled, rolled
        back or failed they follow the weight back."""
        forward = self.s.direction is Direction.FORWARD and not self.s.forced
        return next_session_weight(self.s.session_weight, w, forward=forward)

    def _set_weight(self, w: float, reason: str) -> None:
        sw = self._session_weight(w)
        if w != self.s.candidate_weight or sw != self.s.session_weight:
            if w != self.s.candidate_weight:
                self.events.append(h.WeightSet(t=self.now, candidate_weight=w, reason=reason))
            self._update(candidate_weight=w, session_weight=sw)
            self.actions.append(SetWeight(w, sw))

    def _scale(self, version: str, replicas: int, reason: str) -> None:
        """Scale one version; traffic leaves a shrinking candidate before its replicas do."""
        replicas = max(0, replicas)
        if replicas == self.s.target(version):
            return
        before = self._share()
        field_name = "current_target" if version == CURRENT else "candidate_target"
        self._update(**{field_name: replicas})
        self.low[version] = min(self.low[version], replicas)
        after = self._share()
        if after is not None and before is not None:
            # never above the share before nor after (a crash may have lowered it since)
            safe = min(before, after)
            if safe < self.s.candidate_weight:
                self._set_weight(safe, f"{version} scaling")
        self._record_scale(version, replicas)
        self.events.append(h.Scaled(t=self.now, version=version, replicas=replicas, reason=reason))
        if after is not None and self._proj_ready(CURRENT) == 0:
            self._set_weight(1.0, "no ready current replica left")

    def _wait(self, reason: str) -> None:
        if reason != self.s.waiting:
            self._update(waiting=reason)
            self.events.append(h.Waiting(t=self.now, reason=reason))

    def _replaced(self) -> bool:
        """All replicas are on the incoming version (targets): the last step is done."""
        return self.s.target(self.incoming) >= self.n and self.s.target(self.outgoing) == 0

    def _ignored(self, ctl: Control, reason: str) -> None:
        self.events.append(h.ControlIgnored(t=self.now, control=ctl.value, reason=reason))

    def _drop_requests(self, reason: str) -> None:
        """A pause or roll-forward waiting for a step boundary that will not come (or that a
        later control overrode) ends as ignored, never silently."""
        for name, ctl in (
            ("pause_requested", Control.PAUSE),
            ("roll_forward_requested", Control.ROLL_FORWARD),
        ):
            if getattr(self.s, name):
                self._update(**{name: False})
                self._ignored(ctl, reason)

    def _begin_rollback(self, forced: str, reason: str, dropped: str) -> None:
        """Leave the step cycle: all traffic back, candidates removed (see `_rollback`)."""
        self._drop_requests(dropped)
        self._update(
            forced=forced,
            failure=reason if forced == "failed" else "",
            fast_forward=False,
            step_started_at=self.now,  # the rollback's own deadline counts from here
        )
        self._set_weight(self._seen_weight(), "rollback: sessions follow the weight back")
        self._transition(Stage.ROLLBACK, reason, Phase.PROGRESSING)

    def _fail(self, reason: str) -> None:
        self._begin_rollback("failed", reason, "the rollout failed")

    # ---- guards that run before the step cycle -------------------------------------------

    def backend_errors(self) -> None:
        """Failed iterations are observations: too many in a row fail the rollout."""
        obs = self.obs
        if obs.errors == 0:
            return
        limit = self.s.policy.max_backend_errors
        failing = obs.errors > limit and not self.s.forced
        if failing:
            what = "iteration" if obs.errors == 1 else "iterations"
            self._fail(
                f"{obs.errors} {what} in a row failed (at most {limit} tolerated); "
                f"the last: {obs.error}"
            )
        if not obs.seen:
            self._wait(f"cannot observe the cluster: {obs.error}")
        elif not failing:
            self._wait(f"applying again after a failed iteration: {obs.error}")

    def reassert(self) -> None:
        """After a failed iteration some actions may be lost: first apply the recorded state
        again, then decide as usual. The weight first, never above the candidate's share of
        the replicas ready now nor once the targets hold; then the current version's target
        before the candidate's, so the share only rises until the candidate's target holds."""
        weight = self._seen_weight()
        if weight != self.s.candidate_weight:
            self._update(candidate_weight=weight)
            self.events.append(
                h.WeightSet(t=self.now, candidate_weight=weight, reason="after a failed iteration")
            )
        self._update(session_weight=self._session_weight(weight))
        self.actions.append(SetWeight(weight, self.s.session_weight))
        for v in (CURRENT, CANDIDATE):
            self._record_scale(v, self.s.target(v))

    def resize(self) -> None:
        """Desired scale changed: keep the split, resize both versions (proportional scaling).
        The desired size is first capped so that a step still fits the cluster's GPUs."""
        if self.obs.desired < 1:
            return
        new_n = self._capped(self.obs.desired)
        if new_n == self.n:
            return
        old_n = self.n
        cur, cand = self.s.current_target, self.s.candidate_target
        total = cur + cand
        self._update(desired=new_n)
        if cur == 0 or cand == 0:
            sizes = {CURRENT: new_n if cur else 0, CANDIDATE: new_n if cand else 0}
        else:
            allowed = min(round_half_away(total * new_n / old_n), self._cap())
            allowed = max(allowed, min(new_n, self._cap()))
            sizes = proportional_resize({CURRENT: cur, CANDIDATE: cand}, total, allowed)
        if self.s.forced:  # a rollback removes candidates: never add one
            sizes[CANDIDATE] = min(sizes[CANDIDATE], cand)
        self.events.append(
            h.Resized(
                t=self.now,
                desired_from=old_n,
                desired_to=new_n,
                current_replicas=sizes[CURRENT],
                candidate_replicas=sizes[CANDIDATE],
            )
        )
        # shrink first, so the pool never holds more than the new bound allows
        order = sorted(sizes, key=lambda v: sizes[v] - self.s.target(v))
        for v in order:
            self._scale(v, sizes[v], f"desired replicas {old_n} → {new_n}")

    def _capped(self, desired: int) -> int:
        """`desired` capped at the largest pool whose step fits (Kubernetes has no such cap: a
        surge that does not fit waits there); the reason is recorded when it changes."""
        cap = cap_desired(desired, self.obs.capacity, self.s.policy)
        if cap.reason != self.s.capped:
            self._update(capped=cap.reason)
            if cap.reason and cap.capacity is not None:
                self.events.append(
                    h.Capped(
                        t=self.now,
                        desired=cap.desired,
                        allowed=cap.allowed,
                        capacity=cap.capacity,
                        reason=cap.reason,
                    )
                )
        return cap.allowed

    def take_controls(self) -> None:
        for ctl in self.s.pending:
            self._update(pending=self.s.pending[1:])
            ignored = self._take(ctl)
            if ignored:
                self.events.append(h.ControlIgnored(t=self.now, control=ctl.value, reason=ignored))

    def _take(self, ctl: Control) -> str:
        """Apply or queue one control; returns why it was ignored, or ''."""
        s = self.s
        if ctl is Control.FORCE_CANCEL:
            if s.forced:
                return "a rollback is already under way"
            self._applied(ctl)
            self._begin_rollback("force_cancel", "force-cancel", "superseded by force-cancel")
            return ""
        if s.forced:
            return "a rollback is under way"
        if ctl is Control.CANCEL:
            if s.direction is Direction.BACKWARD:
                return "already cancelling"
            self._applied(ctl)
            if s.first_deploy:  # nothing to ramp back to: remove the candidates
                self._begin_rollback(
                    "cancel", "cancel: withdrawing the first deploy", "superseded by cancel"
                )
                return ""
            self._ramp_back("cancel: ramping back", "superseded by cancel")
            return ""
        if ctl is Control.PAUSE:
            if s.fast_forward or s.roll_forward_requested:
                return "rolling forward"
            if s.phase is Phase.PAUSED or s.pause_requested:
                return "already paused"
            if self._replaced():
                return "nothing left to pause: all replicas replaced"
            self._update(pause_requested=True)
            return ""  # applied at the next step boundary
        if ctl is Control.RESUME:
            if s.phase is Phase.PAUSED:
                self._applied(ctl)
                self._transition(Stage.BOUNDARY, "resumed", Phase.PROGRESSING)
                return ""
            if s.pause_requested:
                self._drop_requests("withdrawn by resume")
                self._applied(ctl)
                return ""
            return "not paused"
        if ctl is Control.ROLL_FORWARD:
            if s.fast_forward or s.roll_forward_requested:
                return "already rolling forward"
            if s.direction is Direction.FORWARD and self._replaced():
                return "nothing left to roll forward: all replicas replaced"
            self._drop_requests("superseded by roll-forward")
            self._update(roll_forward_requested=True)
            if s.phase is Phase.PAUSED or s.stage is Stage.FINISHING:
                # a paused rollout, or a cancel whose candidates are draining: the boundary
                # comes at once
                self._transition(Stage.BOUNDARY, "roll-forward", Phase.PROGRESSING)
            return ""
        raise AssertionError(ctl)

    def _applied(self, ctl: Control) -> None:
        self.events.append(h.ControlApplied(t=self.now, control=ctl.value))

    def _ramp_back(self, reason: str, dropped: str) -> None:
        """Cancel: the step cycle runs backwards from the next boundary, paused or not."""
        self._drop_requests(dropped)
        self._update(direction=Direction.BACKWARD, fast_forward=False)
        self._set_weight(self._seen_weight(), "cancel: sessions follow the weight back")
        # candidates still starting carry no traffic: stop them now
        ready = self._proj_ready(CANDIDATE)
        if self.s.candidate_target > ready:
            self._scale(CANDIDATE, ready, "cancel: stop candidates still starting")
        self._transition(Stage.BOUNDARY, reason, Phase.PROGRESSING)

    # ---- the metric guard ------------------------------------------------------------------

    def guard(self) -> None:
        """Judge the candidate's last window while rolling forward (paused too); a breach
        cancels or force-cancels at once. It judges nothing during a rollback or a ramp back,
        nor after it tripped once (an operator's roll-forward after a trip overrides it), nor
        on a first deploy, which has nothing to go back to."""
        g, s = self.s.policy.guard, self.s
        if g is None or s.terminal or s.forced or s.first_deploy or s.guard_breach:
            return
        if s.direction is Direction.BACKWARD:
            return
        v = judge(g, self.obs.candidate.traffic, self.obs.current.traffic)
        self.verdict = v
        if v.outcome is not Outcome.BREACHED:
            return
        what = v.describe(g.window_s)
        self._update(guard_breach=what)
        self.events.append(
            h.GuardBreached(
                t=self.now,
                metric=v.metric,
                value=v.value,
                threshold=v.threshold,
                window_s=g.window_s,
                requests=v.requests,
                action=g.action,
            )
        )
        if g.action == "force_cancel":
            self._begin_rollback("force_cancel", f"guard: {what}", "superseded by the guard")
        else:
            self._ramp_back(f"guard: {what}: ramping back", "superseded by the guard")

    def _check_window(self) -> None:
        """At a step boundary the candidate's last window has passed (a breach would have
        cancelled the rollout before): record that, or that too few requests came."""
        g, v = self.s.policy.guard, self.verdict
        if g is None or v is None or self.s.step == 0 or self.s.direction is Direction.BACKWARD:
            return
        self.events.append(
            h.MetricsChecked(
                t=self.now,
                step=self.s.step,
                verdict=v.outcome.value,
                requests=v.requests,
                min_requests=g.min_requests,
                window_s=g.window_s,
            )
        )

    # ---- the step cycle ------------------------------------------------------------------

    def advance(self) -> None:
        handlers = {
            Stage.BOUNDARY: self._boundary,
            Stage.SCALE_DOWN: self._scale_down,
            Stage.SCALE_UP: self._scale_up,
            Stage.WAIT_HEALTHY: self._wait_healthy,
            Stage.SHIFT: self._shift,
            Stage.STABILIZE: self._stabilize,
            Stage.FINISHING: self._finishing,
            Stage.ROLLBACK: self._rollback,
        }
        for _ in range(16):  # each handler either moves on or waits; a step has < 8 stages
            if self.s.phase is not Phase.PROGRESSING:
                return
            self._fast_forward_check()
            stage = self.s.stage
            handlers[stage]()
            if self.s.stage is stage:
                return

    def _fast_forward_check(self) -> None:
        """Rolling forward: all traffic to the candidate once enough candidates are ready."""
        if not self.s.fast_forward or self.s.stage in (Stage.FINISHING, Stage.ROLLBACK):
            return
        if self.s.current_target == 0:
            return
        floor = max(1, ready_floor(self.s.policy, self.n))
        if self._proj_ready(CANDIDATE) >= floor:
            self._scale(CURRENT, 0, "roll-forward: enough candidates ready")
            self._set_weight(1.0, "roll-forward")
            self._transition(Stage.SCALE_UP, "roll-forward: completing the candidate")

    def _boundary(self) -> None:
        """Requests waiting for a boundary first (so the last step's are not lost), then
        finish or start the next step."""
        if self.s.roll_forward_requested:
            self._update(roll_forward_requested=False)
            if self.s.direction is Direction.FORWARD and self._replaced():
                self._ignored(
                    Control.ROLL_FORWARD, "nothing left to roll forward: all replicas replaced"
                )
            else:  # also reverses a cancel, even one that has ramped all the way back
                self._update(fast_forward=True, direction=Direction.FORWARD)
                self._applied(Control.ROLL_FORWARD)
        elif self.s.pause_requested:
            self._update(pause_requested=False)
            if self._replaced():
                self._ignored(Control.PAUSE, "nothing left to pause: all replicas replaced")
            else:
                self._applied(Control.PAUSE)
                self._transition(Stage.BOUNDARY, "paused at a step boundary", Phase.PAUSED)
                return
        self._check_window()
        if self._replaced():
            self._transition(Stage.FINISHING, "all replicas replaced")
            return
        self._begin_step(f"step {self.s.step + 1}")

    def _begin_step(self, reason: str) -> None:
        """Start a step (or, rolling forward, the next part of the one last step): its
        deadline and failed-start count start here."""
        self._update(
            step_started_at=self.now,
            failed_starts_at_step=self.obs.of(self.incoming).failed_starts,
            stabilize_until=None,
        )
        first = Stage.SCALE_UP if self.s.policy.mode is Mode.SURGE else Stage.SCALE_DOWN
        self._transition(first, reason)

    def _deadline_passed(self) -> bool:
        inc = self.obs.of(self.incoming)
        failures = inc.failed_starts - self.s.failed_starts_at_step
        if failures > self.s.policy.max_start_failures:
            self._fail(f"{self.incoming} replicas failed to start {failures} times")
            return True
        waited = self.now - self.s.step_started_at
        if waited > self.s.policy.progress_deadline_seconds:
            gpu = f", {inc.pending_gpu} waiting for a GPU" if inc.pending_gpu else ""
            self._fail(
                f"step {self.s.step + 1} exceeded its progress deadline of "
                f"{self.s.policy.progress_deadline_seconds:g} s: {inc.ready} of "
                f"{self.s.target(self.incoming)} {self.incoming} replicas ready{gpu}"
            )
            return True
        return False

    def _scale_down(self) -> None:
        """Unavailable mode: remove outgoing replicas first, unready ones before ready ones
        (these only down to the ready floor), as Kubernetes does."""
        out = self.outgoing
        o = self.obs.of(out)
        floor = ready_floor(self.s.policy, self.n)
        ready = self._proj_ready(CURRENT) + self._proj_ready(CANDIDATE)
        unready = max(0, min(o.starting, self.s.target(out) - o.ready))
        remove = sum(outgoing_removal(self._step(), self.s.target(out), unready, ready, floor))
        if remove > 0:
            self._scale(out, self.s.target(out) - remove, f"step {self.s.step + 1}: make room")
        elif self.n - self._holding() <= 0 and self.s.target(self.incoming) < self.n:
            if not self._deadline_passed():
                self._wait(f"waiting for ready replicas above the floor of {floor}")
            return
        self._transition(Stage.SCALE_UP)

    def _scale_up(self) -> None:
        inc = self.incoming
        need = min(self._step(), self.n - self.s.target(inc))
        if need <= 0:
            self._transition(Stage.WAIT_HEALTHY)
            return
        room = self._cap() - self._holding()
        draining = self._draining()
        out = self.outgoing
        surplus = self.s.target(inc) + self.s.target(out) - self.n
        if room < need and surplus > 0:
            # an interrupted step (cancel, roll-forward) left surge replicas: retire them first
            self._scale(out, self.s.target(out) - surplus, "retire the interrupted step's surplus")
            return
        add = need if room >= need else (room if draining == 0 else 0)
        if add <= 0 and draining == 0 and self.s.policy.mode is Mode.UNAVAILABLE:
            # the pool shrank after this step made room (a resize): make room again
            self._transition(Stage.SCALE_DOWN, "the pool shrank: make room again")
            return
        if add <= 0:
            if not self._deadline_passed():
                self._wait(f"waiting for GPUs under the bound of {self._cap()} replicas")
            return
        self._scale(inc, self.s.target(inc) + add, f"step {self.s.step + 1}")
        self._transition(Stage.WAIT_HEALTHY)

    def _wait_healthy(self) -> None:
        inc = self.incoming
        o = self.obs.of(inc)
        target = self.s.target(inc)
        if self._proj_ready(inc) >= target:
            self._transition(Stage.SHIFT, f"{target} {inc} replicas healthy")
            return
        if self._deadline_passed():
            return
        if o.pending_gpu:
            self._wait(f"{o.pending_gpu} {inc} replicas wait for a free GPU")
        else:
            self._wait(f"waiting for {target - o.ready} {inc} replicas to become healthy")

    def _shift(self) -> None:
        out = self.outgoing
        if self.s.policy.mode is Mode.SURGE:
            keep = max(0, min(self.s.target(out), self.n - self.s.target(self.incoming)))
            self._scale(out, keep, f"step {self.s.step + 1}: replaced")
        share = self._share()
        if share is not None:
            self._set_weight(share, f"step {self.s.step + 1}: share of ready replicas")
        if self.s.fast_forward and not self._replaced():
            # rolling forward, the rest of the rollout is one step: go on without completing it
            self._begin_step("roll-forward: more candidates")
            return
        step = self.s.step + 1
        self._update(step=step)
        self.events.append(
            h.StepCompleted(
                t=self.now,
                step=step,
                direction=self.s.direction.value,
                candidate_weight=self.s.candidate_weight,
                current_replicas=self.s.current_target,
                candidate_replicas=self.s.candidate_target,
            )
        )
        last = self._replaced()
        wait = 0.0 if (last or self.s.fast_forward) else self.s.policy.stabilization_time_seconds
        self._update(stabilize_until=self.now + wait)
        self._transition(Stage.STABILIZE)

    def _stabilize(self) -> None:
        until = self.s.stabilize_until or self.now
        if self.now >= until or self.s.roll_forward_requested:
            self._transition(Stage.BOUNDARY, "stabilized")
        else:
            wait = self.s.policy.stabilization_time_seconds
            self._wait(f"stabilizing for {wait:g} s after step {self.s.step}")

    def _finishing(self) -> None:
        inc, out = self.incoming, self.outgoing
        self._scale(out, 0, "rollout complete")
        self._scale(inc, self.n, "rollout complete")
        share = self._share()
        if share is not None and self._proj_ready(inc) > 0:
            self._set_weight(share, "rollout complete")
        # a version is gone once observed gone after its last change, not in the decision that
        # scales it (a backend applying actions one by one may start and stop one meanwhile)
        if out not in self.scaled and self.obs.of(out).holding == 0 and self._proj_ready(inc):
            outcome = Phase.SUCCEEDED if inc == CANDIDATE else Phase.CANCELLED
            guarded = outcome is Phase.CANCELLED and self.s.guard_breach
            why = f"guard: {self.s.guard_breach}; " if guarded else ""
            self._finish(outcome, f"{why}all traffic on the {inc}")
        else:
            self._wait(f"waiting for the {out} replicas to drain")

    def _rollback(self) -> None:
        """Force-cancel, failure or a first deploy's cancel: traffic back at once, candidates
        removed, the current version refilled (a first deploy has none: it ends empty). Past
        its own deadline it still serves what it can and says what it waits for."""
        cur = self.obs.current
        first = self.s.first_deploy
        n_current = 0 if first else self.n
        room = self._cap() - self._holding()
        need = n_current - self.s.current_target
        if need > 0 and room > 0:
            self._scale(CURRENT, self.s.current_target + min(need, room), "rollback")
        # without a ready current replica, removing candidates would strand traffic, unless
        # the mode's bound leaves the current version no room to start (unavailable, tiny pools)
        cur_ready = self._proj_ready(CURRENT)
        no_room = cur_ready == 0 and cur.starting == 0 and room <= 0
        if first or cur_ready > 0 or no_room:
            if cur_ready > 0:
                self._set_weight(0.0, "rollback")
            self._scale(CANDIDATE, 0, "rollback")
        done = (
            self.s.candidate_target == 0
            and CANDIDATE not in self.scaled
            and self.obs.candidate.holding == 0
            and self.s.current_target == n_current
            and (first or cur_ready > 0)
        )
        if done:
            self._set_weight(0.0, "rollback")
            outcome = Phase.FAILED if self.s.forced == "failed" else Phase.CANCELLED
            why = {"force_cancel": "force-cancel", "cancel": "cancel: first deploy withdrawn"}
            guarded = f"guard: {self.s.guard_breach}" if self.s.guard_breach else ""
            self._finish(outcome, self.s.failure or guarded or why[self.s.forced])
            return
        what = self._rollback_waits_for(n_current)
        deadline = self.s.policy.progress_deadline_seconds
        if self.now - self.s.step_started_at > deadline:
            cand = self.obs.candidate
            self._wait(
                f"rollback past its deadline of {deadline:g} s, waiting for {what}; "
                f"serving on {cur.ready} current and {cand.ready} candidate replicas"
            )
        else:
            self._wait(f"rollback: waiting for {what}")

    def _rollback_waits_for(self, n_current: int) -> str:
        cur, cand = self.obs.current, self.obs.candidate
        starting = f"{cur.starting} starting" + (
            f", {cur.pending_gpu} of them waiting for a GPU" if cur.pending_gpu else ""
        )
        if self.s.candidate_target > 0:
            return f"a ready current replica before moving traffic back ({starting})"
        if cand.holding > 0:
            return f"{cand.holding} candidate replicas to drain"
        if self.s.current_target < n_current:
            more = n_current - self.s.current_target
            return f"room for {more} more current replicas under the bound of {self._cap()}"
        return f"a ready current replica ({starting})"

    def _finish(self, outcome: Phase, reason: str) -> None:
        self._drop_requests("rollout ended")
        self._update(phase=outcome, stage=Stage.DONE, waiting="")
        self.actions.append(Finish(outcome))
        self.events.append(h.Finished(t=self.now, outcome=outcome.value, reason=reason))

    # ---- the weight guard ------------------------------------------------------------------

    def guard_weight(self) -> None:
        """Traffic never exceeds the candidate's share, nor stays on a version with no ready
        replica (a replica may have crashed since the last decision)."""
        if self.s.terminal:
            return
        share = self._share()
        if share is None:
            return
        if self._proj_ready(CURRENT) == 0:
            self._set_weight(1.0, "no ready current replica")
        elif share < self.s.candidate_weight:
            self._set_weight(share, "candidate share of ready replicas fell")
