"""Write the example model's two weight files (run once; the outputs are committed).

`python -m examples.make_weights` → examples/weights-v1.npz and examples/weights-v2.npz: a 16→4
linear classifier each, from fixed seeds, with the version label stored beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUTS, CLASSES = 16, 4


def write(path: Path, version: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, size=(INPUTS, CLASSES)).astype(np.float32)
    b = rng.normal(0, 0.1, size=CLASSES).astype(np.float32)
    np.savez(path, w=w, b=b, version=np.array(version))


def main() -> None:
    here = Path(__file__).parent
    write(here / "weights-v1.npz", "v1", seed=1)
    write(here / "weights-v2.npz", "v2", seed=2)


if __name__ == "__main__":
    main()
