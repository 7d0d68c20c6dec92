"""The Keras 3 layer :class:`l2bn.keras.L2BatchNormalization` against the PyTorch layers.

Keras fixes its backend once per process, from ``KERAS_BACKEND`` when ``keras`` is first
imported. This module runs in-process under ``KERAS_BACKEND`` (default ``torch``, so CI needs no
TensorFlow) and re-runs itself in a subprocess under each other installed backend
(``test_other_backend``), so one ``pytest`` run exercises both the PyTorch and the JAX backend.

On the PyTorch and JAX backends Keras computes in float32 even for float64 inputs (its type
promotion maps float64 to float32; BatchNormalization's statistics follow it), so the Keras
layer runs in float32 here and is compared with the PyTorch layer in float64, the exact spec.

With ``CI=true`` a missing ``keras`` (or ``jax``) is an error, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

_INNER = os.environ.get("L2BN_KERAS_INNER_RUN") == "1"
_ROOT = Path(__file__).resolve().parents[1]


keras = pytest.importorskip("keras")

from l2bn.keras import L2BatchNormalization  # noqa: E402
from l2bn.kernels.reference import l2_normalize_samples  # noqa: E402
from l2bn.modules import l2_layer_for_dim  # noqa: E402

BACKEND = keras.backend.backend()
ops = keras.ops

# float32 Keras vs float64 PyTorch: outputs are O(1)
ATOL = RTOL = 2e-4


def _np(t) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def _data(shape, seed: int = 0) -> np.ndarray:
    """Channels-first input with very different per-sample scales (so the l2 step matters)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) + rng.normal(size=(1, shape[1]) + (1,) * (len(shape) - 2))
    scales = 10.0 ** rng.uniform(-1, 1, size=(shape[0],) + (1,) * (len(shape) - 1))
    return (x * scales).astype(np.float32)


def _pair(
    shape,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-4,
    unit_rms: bool = False,
    channels_last: bool = False,
    seed: int = 1,
):
    """A built Keras layer and the equivalent float64 PyTorch layer with equal random state."""
    c = shape[1]
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c) * 0.1
    mm, mv = rng.normal(size=c) * 0.01, rng.uniform(0.5, 2.0, c) / np.prod(shape[1:])
    k = L2BatchNormalization(
        axis=-1 if channels_last else 1, momentum=momentum, epsilon=epsilon, unit_rms=unit_rms
    )
    kshape = (shape[0],) + tuple(shape[2:]) + (c,) if channels_last else shape
    k.build(kshape)
    for var, val in (
        (k.gamma, gamma),
        (k.beta, beta),
        (k.moving_mean, mm),
        (k.moving_variance, mv),
    ):
        var.assign(val.astype(np.float32))
    cls = l2_layer_for_dim(max(1, len(shape) - 2))
    t = cls(c, eps=epsilon, momentum=1.0 - momentum, unit_rms=unit_rms).double()
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(gamma))
        t.bias.copy_(torch.from_numpy(beta))
        t.running_mean.copy_(torch.from_numpy(mm))
        t.running_var.copy_(torch.from_numpy(mv))
    return k, t


def _to_keras(x: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if channels_last else x


def _from_keras(y: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(y, -1, 1) if channels_last else y


SHAPES = {
    "1d-NC": (10, 6),
    "1d-NCL": (8, 5, 7),
    "2d": (6, 4, 5, 5),
    "3d": (4, 3, 3, 4, 4),
}


# ---------------------------------------------------------------------------------------------
# arguments, defaults, serialization


def test_same_arguments_and_defaults_as_batchnormalization():
    def strip(cfg):
        return {k: v for k, v in cfg.items() if k not in ("name", "l2_epsilon", "unit_rms")}

    assert strip(L2BatchNormalization().get_config()) == strip(
        keras.layers.BatchNormalization().get_config()
    )
    kw = dict(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        scale=True,
        beta_initializer="ones",
        gamma_initializer=keras.initializers.Constant(2.0),
        moving_mean_initializer="ones",
        moving_variance_initializer="zeros",
        beta_regularizer="l2",
        gamma_regularizer=keras.regularizers.L1(0.01),
        beta_constraint="non_neg",
        gamma_constraint=keras.constraints.MaxNorm(3.0),
    )
    assert strip(L2BatchNormalization(**kw).get_config()) == strip(
        keras.layers.BatchNormalization(**kw).get_config()
    )
    cfg = L2BatchNormalization(**kw, l2_epsilon=1e-6, unit_rms=True).get_config()
    assert cfg["l2_epsilon"] == 1e-6 and cfg["unit_rms"] is True
    again = L2BatchNormalization.from_config(cfg)
    assert again.get_config() == cfg
    assert isinstance(again, keras.layers.BatchNormalization)  # drop-in, same weights/semantics
    with pytest.raises(ValueError, match="l2_epsilon"):
        L2BatchNormalization(l2_epsilon=-1.0)


def test_synchronized_follows_keras():
    """``synchronized=True`` is accepted exactly where Keras's BatchNormalization accepts it."""
    try:
        keras.layers.BatchNormalization(synchronized=True)
    except ValueError as exc:
        with pytest.raises(ValueError, match="synchronized"):
            L2BatchNormalization(synchronized=True)
        assert BACKEND != "tensorflow", exc
    else:
        assert L2BatchNormalization(synchronized=True).synchronized is True


# ---------------------------------------------------------------------------------------------
# forward, gradient, moving statistics against the PyTorch layer


# every layer shape, in both layouts and both scalings, without the full product
FORWARD_CASES = [
    ("1d-NC", False, False),
    ("1d-NC", True, True),
    ("1d-NCL", False, True),
    ("1d-NCL", True, False),
    ("2d", False, False),
    ("2d", True, False),
    ("2d", False, True),
    ("2d", True, True),
    ("3d", False, True),
    ("3d", True, False),
]
if _INNER:  # a second backend: every layout, scaling and layer rank, in fewer cases (JAX is slow
    # to compile each new shape)
    FORWARD_CASES = [FORWARD_CASES[i] for i in (1, 2, 5, 8)]


@pytest.mark.parametrize(
    "name,channels_last,unit_rms",
    FORWARD_CASES,
    ids=[
        f"{n}-{'cl' if cl else 'cf'}-{'unit_rms' if r else 'paper'}" for n, cl, r in FORWARD_CASES
    ],
)
def test_forward_matches_torch(name, channels_last, unit_rms):
    shape = SHAPES[name]
    k, t = _pair(shape, unit_rms=unit_rms, channels_last=channels_last)
    x = _data(shape)
    xk = _to_keras(x, channels_last)
    # inference first (moving statistics untouched), then a training step
    y_eval = _from_keras(_np(k(xk, training=False)), channels_last)
    t.eval()
    np.testing.assert_allclose(
        y_eval, t(torch.from_numpy(x).double()).detach().numpy(), rtol=RTOL, atol=ATOL
    )
    y_train = _from_keras(_np(k(xk, training=True)), channels_last)
    t.train()
    ref = t(torch.from_numpy(x).double()).detach().numpy()
    np.testing.assert_allclose(y_train, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_np(k.moving_mean), t.running_mean.numpy(), rtol=1e-5, atol=1e-7)


def _input_grad(layer, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d sum(w * layer(x, training=True)) / dx with the backend's own autodiff."""
    if BACKEND == "torch":
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, training=True)
        (y * torch.as_tensor(w, dtype=y.dtype, device=y.device)).sum().backward()
        return xt.grad.double().cpu().numpy()
    if BACKEND == "jax":
        import jax

        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def loss(xx):
            y, _ = layer.stateless_call(tv, ntv, xx, training=True)
            return (y * w).sum()

        return np.asarray(jax.jit(jax.grad(loss))(x), dtype=np.float64)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt, training=True) * w)
        return tape.gradient(loss, xt).numpy().astype(np.float64)
    pytest.skip(f"no input-gradient helper for the {BACKEND} backend")


GRAD_CASES = [("1d-NC", False), ("1d-NCL", True), ("2d", False), ("3d", True)]
if _INNER:
    GRAD_CASES = GRAD_CASES[2:]


@pytest.mark.parametrize(
    "name,unit_rms", GRAD_CASES, ids=[f"{n}-{'unit_rms' if r else 'paper'}" for n, r in GRAD_CASES]
)
def test_input_gradient_matches_torch(name, unit_rms):
    shape = SHAPES[name]
    k, t = _pair(shape, unit_rms=unit_rms)
    x = _data(shape, seed=3)
    x[1] = 0.0  # an all-zero sample: finite gradients, as F.normalize's clamp gives
    w = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    gk = _input_grad(k, x, w)
    xt = torch.from_numpy(x).double().requires_grad_(True)
    (t.train()(xt) * torch.from_numpy(w).double()).sum().backward()
    gt = xt.grad.numpy()
    assert np.isfinite(gk).all()
    scale = np.abs(gt).reshape(shape[0], -1).max(1).reshape((-1,) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(gk / scale, gt / scale, rtol=0, atol=5e-4)


def test_moving_statistics_use_the_biased_variance():
    """Keras's moving_variance averages the biased batch variance (as keras BatchNormalization
    does); PyTorch's running_var the unbiased one. moving_mean is identical."""
    shape = (6, 4, 5, 5)
    momentum = 0.7
    k, t = _pair(shape, momentum=momentum)
    mm = t.running_mean.clone()
    mv_biased = t.running_var.clone()
    mv_unbiased = t.running_var.clone()
    for step, n in enumerate([6, 9, 4, 7]):
        x = _data((n,) + shape[1:], seed=10 + step)
        k(x, training=True)
        t.train()(torch.from_numpy(x).double())
        u = l2_normalize_samples(torch.from_numpy(x).double())
        dims = (0, 2, 3)
        f = (1 - momentum) / (1 - momentum ** (step + 1))  # bias-corrected (l2bn.running)
        mm = (1 - f) * mm + f * u.mean(dims)
        mv_biased = (1 - f) * mv_biased + f * u.var(dims, unbiased=False)
        mv_unbiased = (1 - f) * mv_unbiased + f * u.var(dims, unbiased=True)
    np.testing.assert_allclose(_np(k.moving_mean), mm.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_np(k.moving_variance), mv_biased.numpy(), rtol=1e-4)
    np.testing.assert_allclose(t.running_mean.numpy(), mm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(t.running_var.numpy(), mv_unbiased.numpy(), rtol=1e-12)
    # the documented difference: PyTorch's running_var is larger by the n/(n-1) of each update
    assert (t.running_var.numpy() > _np(k.moving_variance)).all()


def test_training_steps_match_torch():
    """``train_on_batch`` with SGD updates gamma/beta and the moving statistics as the PyTorch
    layer trained with torch.optim.SGD on the same MSE loss."""
    shape = (8, 4, 3, 3)
    momentum, lr = 0.9, 0.5
    k, t = _pair(shape, momentum=momentum)
    model = keras.Sequential([keras.Input(shape[1:]), k])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    opt = torch.optim.SGD(t.parameters(), lr=lr)
    rng = np.random.default_rng(7)
    t.train()
    for step in range(4):
        x = _data(shape, seed=20 + step)
        target = rng.normal(size=shape).astype(np.float32)
        model.train_on_batch(x, target)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(
            t(torch.from_numpy(x).double()), torch.from_numpy(target).double()
        )
        loss.backward()
        opt.step()
    np.testing.assert_allclose(_np(k.gamma), t.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(k.beta), t.bias.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(k.moving_mean), t.running_mean.numpy(), rtol=1e-5, atol=1e-7)
    # moving_variance is biased, running_var unbiased (test above); with Keras's variance in the
    # PyTorch layer the inference outputs agree
    with torch.no_grad():
        t.running_var.copy_(torch.from_numpy(_np(k.moving_variance)))
    x = _data(shape, seed=99)
    y_eval = _np(model.predict(x, verbose=0))
    ref = t.eval()(torch.from_numpy(x).double()).detach().numpy()
    np.testing.assert_allclose(y_eval, ref, rtol=RTOL, atol=ATOL)


def test_mask_excludes_positions_from_norm_and_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = np.ones((4, 6), dtype=bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    x_pad = x.copy()
    x_pad[~mask] = 1e3  # padding values must not matter for the unmasked outputs
    for unit_rms in (False, True):
        layer = L2BatchNormalization(unit_rms=unit_rms, epsilon=1e-5)
        y = _np(layer(x_pad, training=True, mask=mask))
        m = mask[..., None]
        u = x * m / np.sqrt((x * x * m).sum((1, 2), keepdims=True))
        if unit_rms:
            u = u * np.sqrt(m.sum((1, 2), keepdims=True) * x.shape[-1])
        bn = keras.layers.BatchNormalization(epsilon=1e-5)
        ref = _np(bn(u.astype(np.float32), training=True, mask=mask))
        np.testing.assert_allclose(y[mask], ref[mask], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mask"):
        L2BatchNormalization()(x, training=True, mask=mask[..., None])


def test_a_forward_method_does_not_make_l2bn():
    """The pitfall of the authors' released Keras layer: a BatchNormalization subclass that only
    defines a PyTorch-style ``forward``. Keras computes a layer in ``call``; on the TensorFlow
    and JAX backends ``forward`` is never called and the subclass is plain BN, bit for bit. (On
    Keras 3's PyTorch backend a Keras layer is also a ``torch.nn.Module`` whose ``forward``
    dispatches to ``call``, so overriding it breaks the layer instead.) This layer differs."""

    class ForwardOnly(keras.layers.BatchNormalization):
        def forward(self, x):
            raise AssertionError("forward() called")

    x = _data((6, 5, 5, 4))
    for training in (True, False):
        bn = _np(keras.layers.BatchNormalization()(x, training=training))
        if BACKEND == "torch":
            with pytest.raises((TypeError, AssertionError)):
                ForwardOnly()(x, training=training)
        else:
            np.testing.assert_array_equal(_np(ForwardOnly()(x, training=training)), bn)
        assert not np.allclose(_np(L2BatchNormalization()(x, training=training)), bn, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# a small model: fit, save, load


def test_model_fits_and_roundtrips_through_a_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 64
    labels = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
    x[labels == 1, :3, :, 0] += 2.0  # class 1: a bright top half in channel 0
    x *= 10.0 ** rng.uniform(-1, 1, size=(n, 1, 1, 1)).astype(np.float32)  # scale is no cue
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
            L2BatchNormalization(unit_rms=True),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    hist = model.fit(x, labels, batch_size=16, epochs=4, verbose=0, shuffle=False)
    losses = hist.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    layer = model.layers[1]
    assert not np.allclose(_np(layer.moving_mean), 0.0)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    lay2 = loaded.layers[1]
    assert type(lay2) is L2BatchNormalization
    assert lay2.get_config() == layer.get_config()
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(_np(a), _np(b))
    np.testing.assert_array_equal(
        _np(model.predict(x, verbose=0)), _np(loaded.predict(x, verbose=0))
    )


# ---------------------------------------------------------------------------------------------
# imports


_IMPORT_PROBE = """
import importlib, importlib.util, json, os, sys
out = {}
import l2bn
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "keras")
out["keras_modules_after_import_l2bn"] = loaded

def message():
    mod = importlib.import_module("l2bn.keras")
    try:
        mod.L2BatchNormalization
    except ImportError as e:
        return str(e)
    return None

def forget():
    for m in [m for m in sys.modules if m == "l2bn.keras" or m.split(".")[0] == "keras"]:
        del sys.modules[m]

if importlib.util.find_spec("tensorflow") is None:  # Keras's default backend, not installed
    os.environ["KERAS_BACKEND"] = "tensorflow"
    out["backend_missing"] = message()
    forget()
sys.modules["keras"] = None  # as if keras were not installed
out["keras_missing"] = message()
print(json.dumps(out))
"""


def test_imports():
    """``import l2bn`` does not import keras; without keras, or without Keras's configured
    backend, ``l2bn.keras`` still imports and the layer raises an ImportError saying what to do."""
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"},
        cwd=_ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["keras_modules_after_import_l2bn"] == []
    assert "pip install 'l2bn[keras]'" in out["keras_missing"], out
    if "backend_missing" in out:
        assert "KERAS_BACKEND=torch" in out["backend_missing"], out


# ---------------------------------------------------------------------------------------------
# the other backends, each in its own process


# Each other backend gets a subprocess (parametrized, not skipped: under CI=true a skip fails).
_OTHER_BACKENDS = [] if _INNER else [b for b in ("torch", "jax") if b != BACKEND]


@pytest.mark.parametrize("backend", _OTHER_BACKENDS)
def test_other_backend(backend):
    """Re-run this module under ``KERAS_BACKEND=<backend>`` in a subprocess (without the
    backend-independent ``test_imports`` and without recursing)."""
    if backend != "torch":  # torch is a dependency of l2bn
        pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "L2BN_KERAS_INNER_RUN": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not test_imports and not test_other_backend",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=_ROOT,
        timeout=600,
    )
    assert r.returncode == 0, f"KERAS_BACKEND={backend}:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 12, r.stdout[-2000:]


def test_first_step_sets_the_moving_statistics_and_older_files_load():
    """The first training step copies the batch statistics (no prior of variance 1, about D times
    too large after the l2 step); a file saved before ``moving_count`` existed loads as a trained
    layer and keeps Keras's plain update."""
    shape = (6, 4, 5, 5)
    x = _data(shape)
    u = l2_normalize_samples(torch.from_numpy(x).double())
    biased = u.var((0, 2, 3), unbiased=False).numpy()
    k = L2BatchNormalization(axis=1)
    k(x, training=True)
    np.testing.assert_allclose(_np(k.moving_variance), biased, rtol=1e-4)
    np.testing.assert_allclose(_np(k.moving_mean), u.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-7)
    assert float(_np(k.moving_count)) == 1.0
    store = {
        str(i): _np(v) for i, v in enumerate([k.gamma, k.beta, k.moving_mean, k.moving_variance])
    }
    old = L2BatchNormalization(axis=1)
    old.build(shape)
    old.load_own_variables(store)
    np.testing.assert_allclose(_np(old.moving_variance), store["3"])
    old(x, training=True)
    np.testing.assert_allclose(
        _np(old.moving_variance), 0.99 * store["3"] + 0.01 * biased, rtol=1e-4
    )
