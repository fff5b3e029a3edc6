"""A bounded HTTP load generator for trying a rollout: steady GETs against a loopback address.

`python -m examples.load --url http://127.0.0.1:8000/ --seconds 60` prints, every few seconds,
how many answers came from each version and how many failed. It stops by itself after
`--seconds` or `--max-requests`, and only ever talks to 127.0.0.0/8 or localhost.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass(frozen=True)
class Answer:
    t: float  # when the request was sent (Unix time)
    version: str | None  # the serving version, None on failure
    latency_s: float
    error: str = ""


@dataclass
class Load:
    """Threads sending GETs at a fixed pace until stopped or a bound is reached."""

    url: str
    threads: int = 3
    pause_s: float = 0.05  # between one thread's requests
    max_seconds: float = 600.0
    max_requests: int = 50_000
    timeout_s: float = 10.0
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        host = urlparse(self.url).hostname or ""
        if not (host == "localhost" or host.startswith("127.")):
            raise ValueError(f"load goes to loopback addresses only (got {host!r})")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _one(self) -> Answer:
        sent = time.time()
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as r:
                body = json.loads(r.read())
            return Answer(sent, str(body["version"]), time.time() - sent)
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            return Answer(sent, None, time.time() - sent, f"{type(e).__name__}: {e}"[:200])

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.time() < deadline:
            a = self._one()
            with self._lock:
                if len(self.answers) >= self.max_requests:
                    return
                self.answers.append(a)
            self._stop.wait(self.pause_s)

    def start(self) -> Load:
        deadline = time.time() + self.max_seconds
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, args=(deadline,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout_s + 1)
        with self._lock:
            return sorted(self.answers, key=lambda a: a.t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--max-requests", type=int, default=50_000)
    a = p.parse_args()
    load = Load(a.url, threads=a.threads, max_seconds=a.seconds, max_requests=a.max_requests)
    load.start()
    seen = 0
    try:
        while any(t.is_alive() for t in load._workers):
            time.sleep(3)
            batch = load.answers[seen:]
            seen += len(batch)
            counts = collections.Counter(x.version or "failed" for x in batch)
            print(time.strftime("%H:%M:%S"), dict(sorted(counts.items())), flush=True)
    except KeyboardInterrupt:
        pass
    answers = load.stop()
    total = collections.Counter(x.version or "failed" for x in answers)
    print("total", dict(sorted(total.items())))


if __name__ == "__main__":
    main()
