"""Bad deploy files and unknown rollout ids: one clear line and a non-zero exit; plus the
executor's pure pieces (config merging, history reading) without a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from executor import status, store
from executor.deploy_file import load_deploy_file
from executor.serve_config import declarative_apps, live_versions
from rollout import history as h
from rollout.errors import InputError

REPO = Path(__file__).resolve().parent.parent
GOOD = yaml.safe_load((REPO / "examples" / "deploy-v2.yaml").read_text())


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"ROLLOUT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "rollout.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def write(tmp_path: Path, spec: Any) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def with_(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = spec
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return spec


def test_the_bundled_deploy_files_are_valid() -> None:
    v1 = load_deploy_file(REPO / "examples" / "deploy-v1.yaml")
    v2 = load_deploy_file(REPO / "examples" / "deploy-v2.yaml")
    assert (v1.name, v1.version, v2.version) == ("chat", "v1", "v2")
    assert v2.rollout_policy().progress_deadline_seconds == 300
    assert v2.model.num_gpus == 1


BAD = [
    (with_(colour="blue"), "unknown field 'colour'"),
    (with_(model__gpu=1), "unknown field 'model.gpu'"),
    (with_(replicas=...), "missing field 'replicas'"),
    (with_(replicas=0), "replicas"),
    (with_(policy={"max_surge_percent": 25, "max_unavailable_percent": 25}), "exactly one"),
    (with_(policy={"max_surge_percent": 0}), "exactly one"),
    (with_(policy={"max_surge_percent": 80}), "max_surge_percent"),
    (with_(name="Chat_Bot"), "name"),
    (with_(version="v_2"), "version"),
    (with_(model__import_path="examples/model.py"), "package.module:builder"),
    (with_(model__ray_actor_options={"num_gpus": -1}), "num_gpus"),
    (with_(cluster={"num_gpus": 2}), "cluster.num_gpus (2) is below"),
    (with_(store="mysql://db/rollout"), "store"),
    (with_(http={"port": 70000}), "http.port"),
    (with_(autoscaling={"min_replicas": 1, "max_replicas": 2}), "within autoscaling"),
    (with_(routing={"sticky": {"header": "X Session"}}), "HTTP header name in lowercase"),
    (with_(routing={"sticky": {"header": None}}), "needs a header or a cookie"),
    (with_(routing={"sticky": {"cookie": "a;b"}}), "must be a cookie name"),
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- list\n", "must be a YAML mapping"),
]


@pytest.mark.parametrize("spec,words", BAD, ids=[w for _, w in BAD])
def test_bad_deploy_file_is_one_line_in_process(tmp_path: Path, spec: Any, words: str) -> None:
    with pytest.raises(InputError) as e:
        load_deploy_file(write(tmp_path, spec))
    assert words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,words", BAD[:3] + BAD[-2:], ids=[w for _, w in BAD[:3] + BAD[-2:]])
def test_bad_deploy_file_from_the_cli(tmp_path: Path, spec: Any, words: str) -> None:
    out = run_cli(tmp_path, "deploy", str(write(tmp_path, spec)))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("rollout: error:")
    assert out.stdout == ""


def test_missing_deploy_file(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "deploy", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"rollout: error: no such deploy file: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize(
    "args",
    [
        ["status", "chat-v9-nope"],
        ["status", "chat-v9-nope", "--json"],
        ["history", "chat-v9-nope", "--json"],
        ["pause", "chat-v9-nope"],
        ["force-cancel", "chat-v9-nope"],
    ],
)
def test_unknown_rollout_id(tmp_path: Path, args: list[str]) -> None:
    # an existing store without that id, and a missing store, both say the same
    for prepare in (False, True):
        if prepare:
            (tmp_path / "home").mkdir(exist_ok=True)
            store.Store(f"sqlite:///{tmp_path / 'home' / 'rollout.sqlite'}").dispose()
        out = run_cli(tmp_path, *args)
        assert out.returncode == 2
        assert out.stderr.strip() == "rollout: error: unknown rollout id 'chat-v9-nope'"
        assert out.stdout == ""


# ---- reading Serve's details -----------------------------------------------------------------


def test_declarative_apps_keeps_only_config_deployed_live_apps() -> None:
    details = {
        "applications": {
            "m": {"source": "declarative", "status": "RUNNING", "deployed_app_config": {"a": 1}},
            "m_v1": {"source": "declarative", "status": "DELETING", "deployed_app_config": {}},
            "other": {"source": "imperative", "status": "RUNNING", "deployed_app_config": None},
            "m_v2": {
                "source": "declarative",
                "status": "DEPLOYING",
                "deployed_app_config": {"b": 2},
            },
        }
    }
    assert declarative_apps(details) == {"m": {"a": 1}, "m_v2": {"b": 2}}
    assert set(live_versions("m", details)) == {"v2"}
    assert live_versions("mm", details) == {}


# ---- reading the history back ----------------------------------------------------------------


class FakeSteps:
    """What DBOS's client returns for a workflow's steps (completed ones and one in flight)."""

    def __init__(self, steps: list[dict[str, Any]]) -> None:
        self.steps = steps

    def list_workflow_steps(self, workflow_id: str, offset: int = 0) -> list[dict[str, Any]]:
        return self.steps[offset:]


def step(name: str, events: list[h.Event] | None, done: bool = True) -> dict[str, Any]:
    out = json.dumps({"events": [e.model_dump(mode="json") for e in events]}) if events else None
    return {
        "function_name": name,
        "output": out,
        "error": None,
        "completed_at_epoch_ms": 1 if done else None,
    }


def test_history_is_the_concatenation_of_recorded_steps() -> None:
    e1 = h.RolloutStarted(t=1.0, policy={"max_surge_percent": 25}, desired=4, steps=4)
    e2 = h.Scaled(t=2.0, version="candidate", replicas=1, reason="step 1")
    e3 = h.ActionApplied(t=2.1, action="scale candidate to 1", seconds=0.1)
    fake = FakeSteps(
        [
            step("begin_step", [e1]),
            step("DBOS.recv", None),
            step("iterate_step", [e2, e3]),
            step("DBOS.setEvent", None),
            step("iterate_step", None, done=False),
        ]
    )
    events, offset = status.read_history(fake, "id")  # type: ignore[arg-type]
    assert events == [e1, e2, e3]
    assert offset == 4  # the step in flight is read next time, not skipped
    fake.steps[4] = step("iterate_step", [h.Waiting(t=3.0, reason="x")])
    more, offset = status.read_history(fake, "id", offset)  # type: ignore[arg-type]
    assert [e.kind for e in more] == ["waiting"] and offset == 5
    line = status.format_event(e2)
    assert "scaled" in line and "replicas=1" in line


# ---- the pooled autoscaler's state survives from step to step ---------------------------------


def test_autoscaler_state_is_carried_in_the_step_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import executor.serve_backend as sb
    from executor.deploy_file import DeploySpec
    from executor.plan import Memory, Plan

    spec = DeploySpec.model_validate(
        with_(replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 6,
              "target_ongoing_requests": 2, "upscale_delay_s": 3, "look_back_period_s": 5})
    )  # fmt: skip
    plan = Plan(
        id="x", name="chat", from_version="v1", to_version="v2", spec=spec, current_app=None,
        candidate_app={}, desired_start=2, address="", store_url="",
    )  # fmt: skip
    ongoing = {"v1": 5, "v2": 3}  # 8 in flight → 4 replicas wanted, after the upscale delay
    monkeypatch.setattr(sb.router_link, "ongoing", lambda plan: sum(ongoing.values()))
    memory = Memory()
    desired = []
    for now in (100.0, 101.0, 102.0, 103.5, 104.0):
        backend = sb.ServeBackend(plan, memory)
        mem = backend.mem.model_copy(deep=True)
        desired.append(backend._desired(mem, now))
        memory = Memory.model_validate_json(mem.model_dump_json())  # as recorded
    assert desired == [2, 2, 2, 4, 4]


# ---- `rollout down` stops only what it started -----------------------------------------------


def test_down_leaves_a_reused_pid_and_remote_rollouts_alone(tmp_path: Path) -> None:
    """cluster.json names a pid that is now another program (a reboot reused it), and the store
    holds a rollout on a remote cluster: `down` kills nothing and withdraws nothing."""
    home = tmp_path / "home"
    home.mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        info = {"address": "127.0.0.1:1", "pid": other.pid, "temp_dir": "/tmp/rollout-ray-x",
                "num_gpus": 1, "num_cpus": 1}  # fmt: skip
        (home / "cluster.json").write_text(json.dumps(info))
        st = store.Store(f"sqlite:///{home / 'rollout.sqlite'}")
        st.add(
            store.Record(
                id="far-v2-1", app="far", from_version="v1", to_version="v2", created_at=1.0,
                plan=json.dumps({"address": "10.0.0.1:6379"}), outcome=None, finished_at=None,
            )
        )  # fmt: skip
        out = run_cli(tmp_path, "down")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "no local Ray cluster started by rollout is running"
        assert other.poll() is None  # still running
        rec = st.get("far-v2-1")
        assert rec is not None and rec.outcome is None
    finally:
        other.kill()
        other.wait()


# ---- secrets and unreachable stores ------------------------------------------------------------

SECRET = "pa55-Wörd-xyz"


def test_an_unreachable_store_is_named_with_its_password_masked(tmp_path: Path) -> None:
    url = f"postgresql://rollout:{SECRET}@127.0.0.1:1/rollout"
    out = run_cli(tmp_path, "deploy", str(write(tmp_path, with_(store=url))))
    assert out.returncode == 2 and out.stdout == ""
    line = out.stderr.strip()
    assert "\n" not in line and SECRET not in line
    assert line.startswith("rollout: error: cannot reach the store at ")
    assert "postgresql://rollout:***@127.0.0.1:1/rollout" in line
    # `status` with that store says so too, rather than "unknown rollout id"
    env = {"ROLLOUT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "ROLLOUT_STORE": url}
    got = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "status", "chat-v2-x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 2 and SECRET not in got.stderr
    assert got.stderr.startswith("rollout: error: cannot reach the store at postgresql://")
    assert "may be recorded there" in got.stderr
    # nothing under .rollout/ holds the password
    for f in (tmp_path / "home").rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes()


def test_a_bad_store_url_is_reported_without_its_password(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "deploy", str(write(tmp_path, with_(store=f"mysql://u:{SECRET}@db/x"))))
    assert out.returncode == 2
    assert SECRET not in out.stderr and "mysql://u:***@db/x" in out.stderr


def test_an_unreachable_cluster_address_is_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0" * 64)
    token.chmod(0o600)
    spec = with_(cluster={"address": "127.0.0.1:1", "token_file": str(token)})
    out = run_cli(tmp_path, "deploy", str(write(tmp_path, spec)))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("rollout: error: cannot reach the Ray cluster at 127.0.0.1:1: ")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("problem", ["missing", "readable", "unset"])
def test_a_remote_cluster_token_that_is_missing_or_readable_is_refused(
    tmp_path: Path, problem: str
) -> None:
    token = tmp_path / "token"
    if problem == "readable":
        token.write_text("0" * 64)
        token.chmod(0o644)
    cluster: dict[str, Any] = {"address": "127.0.0.1:1"}
    if problem != "unset":
        cluster["token_file"] = str(token)
    out = run_cli(tmp_path, "deploy", str(write(tmp_path, with_(cluster=cluster))))
    assert out.returncode == 2 and out.stdout == ""
    want = {
        "missing": f"the Ray token file {token} does not exist",
        "readable": f"the Ray token file {token} is readable by other users (mode 0644)",
        "unset": "cluster.address 127.0.0.1:1 needs the cluster's Ray token",
    }[problem]
    assert out.stderr.startswith(f"rollout: error: {want}") and out.stderr.count("\n") == 1
    assert not (tmp_path / "home" / "rollout.sqlite").exists()  # nothing started


def test_an_http_port_in_use_stops_the_deploy_before_anything_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli(tmp_path, "deploy", str(write(tmp_path, with_(http={"port": port}))))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        f"rollout: error: http.port {port} on 127.0.0.1 is already in use by another program "
        "(Address already in use); free it or choose another port\n"
    )
    assert not (tmp_path / "home" / "cluster.json").exists()  # no cluster was started


def test_status_shows_the_session_weight_and_the_realised_split() -> None:
    s = {"id": "r1", "state": "progressing", "app": "chat", "from_version": "v1",
         "to_version": "v2", "step": 1, "candidate_weight": 0.25, "session_weight": 0.5,
         "split": {"v1": {"requests": 0.6, "sessions": 0.55}, "v2": {"requests": 0.4}}}  # fmt: skip
    lines = status.format_status(s).splitlines()
    assert "  sticky sessions: 0.50 of them on v2" in lines
    assert "  v1: 60% of the window's requests, 55% of the active sessions" in lines
    assert "  v2: 40% of the window's requests" in lines
