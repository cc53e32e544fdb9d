"""The baseline: the seed experiment as a bare Keras script on the same prepared arrays.

python bench/bare_keras.py data/prepared 5
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np

prepared, epochs = sys.argv[1], int(sys.argv[2])
train, test = np.load(f"{prepared}/train.npz"), np.load(f"{prepared}/test.npz")
keras.utils.set_random_seed(42)
model = keras.Sequential(
    [
        keras.Input((train["x"].shape[1],)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(train["x"], train["y"], epochs=epochs, batch_size=128, verbose=0)
loss, accuracy = model.evaluate(test["x"], test["y"], verbose=0)
model.save("/tmp/bare_keras_model.keras")
print(f"test accuracy {accuracy:.4f}")
