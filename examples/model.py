"""A GPU-backed example model for trying `rollout deploy` on a laptop.

The "model" is a small linear classifier whose weights live in an `.npz` file loaded at start
(on CUDA through torch when torch is importable and sees a GPU, else with numpy on the CPU). A
configurable load delay stands in for the minutes a large model spends loading its weights.

It answers HTTP requests (Serve's proxy or the rollout router hands it a starlette Request):

- `GET /` → `{"version", "device", "replica", "loaded_s"}`
- `POST /` with `{"inputs": [[x0, ..., x15], ...]}` → the same plus `"outputs"` (class
  probabilities per row) and `"labels"` (argmax per row).

`work_s` makes every answer that much slower and `error_rate` answers that share of requests
with a 500 at once: together a bad release for the metric guard (`examples/deploy-bad.yaml`).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

_ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str) -> Path:
    """Weights paths are relative to the working directory, else to the repository root (Ray
    workers do not always start in the directory the deploy file was in)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return _ROOT / p


class Weights:
    """The loaded weights and the device they run on."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            self.version = str(data["version"])
            w, b = data["w"].astype(np.float32), data["b"].astype(np.float32)
        self.inputs = w.shape[0]
        self.device = "cpu"
        self._torch: Any = None
        try:
            import torch

            if torch.cuda.is_available():
                self._torch = torch
                self.device = "cuda"
                self.w = torch.from_numpy(w).to("cuda")
                self.b = torch.from_numpy(b).to("cuda")
        except ImportError:
            pass
        if self._torch is None:
            self.w, self.b = w, b

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Softmax(x·W + b), row by row."""
        if self._torch is not None:
            t = self._torch.from_numpy(x.astype(np.float32)).to("cuda")
            return self._torch.softmax(t @ self.w + self.b, dim=1).cpu().numpy()
        z = x.astype(np.float32) @ self.w + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, health_check_period_s=2)
class Model:
    def __init__(
        self, weights: str, load_delay_s: float = 0.0, work_s: float = 0.0, error_rate: float = 0.0
    ) -> None:
        started = time.monotonic()
        time.sleep(load_delay_s)  # stands in for pulling and loading a large model
        self.weights = Weights(resolve(weights))
        self.weights.forward(np.zeros((1, self.weights.inputs)))  # warm-up
        self.work_s = work_s
        self.error_rate = error_rate
        self.loaded_s = round(time.monotonic() - started, 3)
        self.replica = f"{os.getpid()}"

    def check_health(self) -> None:
        """Serve calls this periodically; a replica that cannot run its model is unhealthy."""
        out = self.weights.forward(np.zeros((1, self.weights.inputs)))
        if not np.isfinite(out).all():
            raise RuntimeError("the model produced non-finite outputs")

    def _info(self) -> dict[str, Any]:
        return {
            "version": self.weights.version,
            "device": self.weights.device,
            "replica": self.replica,
            "loaded_s": self.loaded_s,
        }

    async def __call__(self, request: Request) -> dict[str, Any] | JSONResponse:
        if self.error_rate and random.random() < self.error_rate:
            return JSONResponse({"error": "injected failure"} | self._info(), status_code=500)
        method = request.method
        try:
            body = await request.json() if method == "POST" else None
        except ValueError:
            body = None
        if self.work_s:
            await asyncio.sleep(self.work_s)
        info = self._info()
        if method != "POST":
            return info
        try:
            x = np.asarray((body or {})["inputs"], dtype=np.float32).reshape(
                -1, self.weights.inputs
            )
        except (KeyError, TypeError, ValueError):
            return info | {
                "error": f"POST a JSON body {{'inputs': [[{self.weights.inputs} floats]]}}"
            }
        probs = self.weights.forward(x)
        rounded = probs.astype(np.float64).round(6).tolist()
        return info | {"outputs": rounded, "labels": probs.argmax(1).tolist()}


def app(args: dict[str, Any]) -> serve.Application:
    """The application builder that deploy files name as `examples.model:app`."""
    return Model.bind(**args)
