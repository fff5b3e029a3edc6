"""The detached controller process that `rollout deploy --detach` starts.

`python -m executor.worker start|recover ROLLOUT_ID`, with the store's URL in
`$ROLLOUT_STORE_URL` (never on the command line, where `ps` and Ray's job list would show its
password): runs (or takes over) one rollout's workflow, then any other rollout it picked up in
recovery, and exits. Its output goes to `.rollout/logs/ID.log`.
"""

from __future__ import annotations

import os
import sys
import traceback


def main(argv: list[str]) -> int:
    from executor import cluster, store
    from executor.plan import Plan
    from executor.workflow import ControllerProcess

    mode, rollout_id = argv
    url = os.environ["ROLLOUT_STORE_URL"]
    rec = store.Store(url).get(rollout_id)
    if rec is None:
        print(f"unknown rollout id '{rollout_id}'", file=sys.stderr)
        return 2
    plan = Plan.model_validate_json(rec.plan)
    cluster.connect(plan.address)  # in the main thread, where Ray can install its handlers
    proc = ControllerProcess(url)
    try:
        print(f"controller {proc.executor_id}: {mode} {rollout_id}", flush=True)
        what = proc.start(plan) if mode == "start" else proc.take_over(rollout_id, plan)
        if what != "alive":
            try:
                print(f"{rollout_id}: {proc.outcome(rollout_id)}", flush=True)
            except Exception:  # cancelled by `rollout down`, or failed: say why in the log
                traceback.print_exc()
        proc.drain()
    finally:
        proc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
