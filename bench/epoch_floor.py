"""Seconds per epoch of the seed MLP against the matmul floor, measured in the same process.

Floor: one epoch's FLOPs, 6 * N * (784*512 + 512*10) (forward 2, backward 4 per weight), divided
by NumPy float32 GEMM throughput at the same shapes (batch x 784 @ 784 x 512, and the backward
products). Each Keras variant trains a fresh seed model; the first epoch (tracing, warm-up) is
left out, the rest are timed.

    python bench/epoch_floor.py                 # full MNIST from ../shared/data/mnist
    python bench/epoch_floor.py --dataset digits --epochs 3    # smoke run
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def gemm_flops_per_second(batch: int, d_in: int, width: int, classes: int, seconds: float) -> float:
    """Float32 GEMM throughput over one training step's matmul shapes, repeated for `seconds`."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, d_in), dtype=np.float32)
    w1 = rng.random((d_in, width), dtype=np.float32)
    h = rng.random((batch, width), dtype=np.float32)
    w2 = rng.random((width, classes), dtype=np.float32)
    g = rng.random((batch, classes), dtype=np.float32)
    products = [(x, w1), (h, w2), (g, w2.T), (h.T, g), (x.T, h)]  # forward, then backward
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in products)
    for a, b in products:  # warm up
        a @ b
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for a, b in products:
            a @ b
        steps += 1
    return steps * flops / (time.perf_counter() - started)


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
    epoch_flops = 6 * n * (d_in * width + width * classes)
    throughput = gemm_flops_per_second(batch, d_in, width, classes, seconds=3.0)
    floor = epoch_flops / throughput

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
            "epoch_gflop": epoch_flops / 1e9,
            "epochs": args.epochs,
            "command": " ".join(sys.argv),
        },
    )


if __name__ == "__main__":
    main()
