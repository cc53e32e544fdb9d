"""Seconds per epoch of the seed MLP against the matmul floor, measured in the same process.

Floor: the FLOPs one epoch needs, divided by the float32 GEMM rate at the same shapes. Per sample:
forward 2*784*512 + 2*512*10; backward, the weight gradients of both layers (2*784*512 +
2*512*10) and the input gradient of the second (2*512*10) only: nothing needs the gradient with
respect to the pixels. So 4*N*784*512 + 6*N*512*10 (98 GFLOP for MNIST's 60,000). The GEMM rate
is NumPy's at those shapes (batch x 784 @ 784 x 512 and the four other products), the best of
several repetitions, with the BLAS library, its threads and the machine's load recorded: a rate
taken on a busy machine, or with a slowed BLAS (OPENBLAS_CORETYPE), makes the floor too high.
Each Keras variant trains a fresh seed model; the first epoch (tracing, warm-up) is left out,
the rest are timed.

    python bench/epoch_floor.py                 # full MNIST from ../shared/data/mnist
    python bench/epoch_floor.py --dataset digits --epochs 3    # smoke run
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def epoch_flops(n: int, d_in: int, width: int, classes: int) -> int:
    """The matmul FLOPs of one epoch of the one-hidden-layer MLP (see the module docstring)."""
    return 4 * n * d_in * width + 6 * n * width * classes


def gemm_flops_per_second(
    batch: int, d_in: int, width: int, classes: int, seconds: float, repeats: int = 5
) -> float:
    """Float32 GEMM throughput over the matmuls one training step needs, the best of `repeats`
    runs of `seconds` each (the best: interference only ever slows a run down)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, d_in), dtype=np.float32)
    w1 = rng.random((d_in, width), dtype=np.float32)
    h = rng.random((batch, width), dtype=np.float32)
    w2 = rng.random((width, classes), dtype=np.float32)
    g = rng.random((batch, classes), dtype=np.float32)
    # forward; then the input gradient of layer 2 and the weight gradients of both layers
    products = [(x, w1), (h, w2), (g, w2.T), (h.T, g), (x.T, h)]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in products)
    assert flops == epoch_flops(batch, d_in, width, classes)
    for a, b in products:  # warm up
        a @ b
    best = 0.0
    for _ in range(repeats):
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for a, b in products:
                a @ b
            steps += 1
        best = max(best, steps * flops / (time.perf_counter() - started))
    return best


def blas() -> dict[str, object]:
    """NumPy's BLAS (threadpoolctl), and the settings known to slow it."""
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return {
        "blas": [f"{i['internal_api']} {i['version']} ({i.get('architecture')})" for i in found],
        "blas_threads": [i["num_threads"] for i in found],
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
    }


def epoch_timer_class(keras):
    class EpochTimer(keras.callbacks.Callback):
        """Wall time of each epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.started)

    return EpochTimer


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--epochs", type=int, default=4, help="epochs per variant (first is dropped)")
    p.add_argument("--variants", default="default,spe,jit,jit+spe")
    args = p.parse_args()
    work = common.workdir(args)
    sys.path.insert(0, str(work))

    from pipeline.core.data import load_split
    from pipeline.core.models import build_model
    from pipeline.core.training import keras, new_session
    from pipeline.infra.config import ModelConfig

    EpochTimer = epoch_timer_class(keras)
    data = load_split(work / "data" / "prepared" / "train.npz")
    n, d_in = data.x.shape
    width, classes, batch = 512, 10, 128
    load_before = os.getloadavg()
    needed = epoch_flops(n, d_in, width, classes)
    throughput = gemm_flops_per_second(batch, d_in, width, classes, seconds=1.0)
    floor = needed / throughput

    options = {
        "default": {},
        "spe": {"steps_per_execution": 32},
        "jit": {"jit_compile": True},
        "jit+spe": {"jit_compile": True, "steps_per_execution": 32},
    }
    rows = []
    for name in args.variants.split(","):
        new_session(0, False)
        network = build_model(
            **asdict(ModelConfig()), width=width, input_dim=d_in, image_shape=data.image_shape
        )
        network.compile(
            optimizer=keras.optimizers.RMSprop(),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            **options[name],
        )
        timer = EpochTimer()
        network.fit(
            data.x, data.y, epochs=args.epochs, batch_size=batch, verbose=0, callbacks=[timer]
        )
        times = timer.times
        steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
        rows.append(
            {
                "variant": name,
                "first_epoch_s": times[0],
                "epoch_s": steady,
                "floor_s": floor,
                "ratio_to_floor": steady / floor,
            }
        )
    common.report(
        f"epoch_floor_{args.dataset}",
        rows,
        {
            "n": n,
            "gemm_gflops": throughput / 1e9,
            "epoch_gflop": needed / 1e9,
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            **blas(),
            "epochs": args.epochs,
            "command": " ".join(sys.argv),
        },
    )


if __name__ == "__main__":
    main()
