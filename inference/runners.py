"""What runs a bundle's network on a batch: the standalone LiteRT interpreter (no TensorFlow).

A served graph (written by :mod:`training.export`) has up to three outputs, in this order: the network's
outputs (N x columns), the gate embedding (N x D) and the class activation maps (N x h x w x columns, the
only 4-D one). The converter names them ``<function>:<index>``; the index gives the order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Interpreter threads per network (the worker machine has 2 cores); a worker process sets its own share
#: with :func:`set_threads` before its first network loads.
THREADS = 2


def set_threads(n: int) -> None:
    """Interpreter threads for the networks loaded from now on in this process."""
    global THREADS
    THREADS = max(1, n)


@dataclass(frozen=True)
class RunResult:
    """Outputs of a batch; ``features`` and ``cam`` are None when the graph lacks them."""

    outputs: np.ndarray
    features: np.ndarray | None = None
    cam: np.ndarray | None = None


class TfliteRunner:
    """A LiteRT interpreter over one ``.tflite`` file; calls are serialised (an interpreter is not
    re-entrant), images run one at a time (the graphs have a fixed batch of 1)."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=THREADS)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        details = sorted(self._interpreter.get_output_details(), key=_output_index)
        flat = [d for d in details if len(d["shape"]) == 2]
        maps = [d for d in details if len(d["shape"]) == 4]
        if not flat or len(flat) > 2 or len(maps) > 1:
            raise ValueError(f"{path}: unexpected outputs {[list(d['shape']) for d in details]}")
        self._outputs = flat[0]["index"]
        self._features = flat[1]["index"] if len(flat) == 2 else None
        self._cam = maps[0]["index"] if maps else None
        self._lock = threading.Lock()

    @property
    def has_cam(self) -> bool:
        return self._cam is not None

    def __call__(self, x: np.ndarray, *, with_cam: bool = False) -> RunResult:
        rows, feats, cams = [], [], []
        with self._lock:
            for xi in np.asarray(x, dtype=np.float32):
                self._interpreter.set_tensor(self._input, xi[np.newaxis])
                self._interpreter.invoke()
                rows.append(self._interpreter.get_tensor(self._outputs)[0].copy())
                if self._features is not None:
                    feats.append(self._interpreter.get_tensor(self._features)[0].copy())
                if with_cam and self._cam is not None:
                    cams.append(self._interpreter.get_tensor(self._cam)[0].copy())
        return RunResult(np.stack(rows), np.stack(feats) if feats else None, np.stack(cams) if cams else None)


def _output_index(detail: dict[str, Any]) -> int:
    """The graph output's position (``StatefulPartitionedCall:1`` -> 1); 0 for a name without one."""
    suffix = str(detail["name"]).rpartition(":")[2]
    return int(suffix) if suffix.isdigit() else 0
