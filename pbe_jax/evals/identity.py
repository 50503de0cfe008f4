"""Which object was painted? An attribute classifier for the demo's scenes, trained for evaluation.

The objects of the demo's `scenes=identity` (`pbe_jax.data.synthetic`, 'identity' and 'radial'
styles) have an identity of three attributes: a PALETTE colour, a shape of PALETTE_SHAPES and a
pattern of PATTERNS. The
identity score of an edit asks whether the object painted into the hole has *all three* of the
reference's attributes. It is read by `IdentityClassifier`: a small CNN with one head per
attribute that looks at where the masked object was in the 32 px result (its box inside the
hole, grown by CROP_MARGIN, resized to `CROP` px): the demo learns to paint the object there.

It is trained only for evaluation, on ground-truth renders: triplet-like crops (the training
pipeline's geometry, and the out-of-style geometry of `pbe_jax.evaluation.exemplar`) of synthetic
seeds that neither the demo (seed 0) nor its held-out eval (seed 1000) uses, augmented by a
blur of up to the demo VAE's (a perfect edit is not sharper than the VAE returns it). Its own
held-out accuracy (`fit_identity_classifier(...).accuracy`: identity = all three heads right,
on fresh renders of another seed) says how far the score can be trusted; at the demo's 32 px it
is ~0.97-0.99. The classifier is deterministic given its seed, and costs ~20-40 s of CPU once
per run (the triplets' rendering and ~600 Adam steps).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pbe_jax.data.synthetic import PALETTE, PALETTE_SHAPES, PATTERNS

CROP = 16  # classifier input side (px): the masked object's box with a margin, resized
CROP_MARGIN = 0.15
HEADS = (("colour", len(PALETTE)), ("shape", len(PALETTE_SHAPES)), ("pattern", len(PATTERNS)))


def object_crops(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """float32 `[N, CROP, CROP, 3]` in [0, 1]: each image's crop at the bounding box of its
    scored `region` `[N, H, W]` (bool: where the masked object was, in the hole) grown by
    CROP_MARGIN of its side on each side, resized. `images` `[N, H, W, 3]` uint8 or float in
    [0, 1]."""
    x = np.asarray(images, np.float32)
    if np.asarray(images).dtype == np.uint8:
        x = x / 255.0
    h, w = x.shape[1:3]
    out = np.empty((len(x), CROP, CROP, 3), np.float32)
    for i in range(len(x)):
        ys, xs = np.nonzero(region[i])
        if not len(ys):
            raise ValueError(f"identity crops: region {i} is empty")
        my = max(1, round(CROP_MARGIN * (ys.max() + 1 - ys.min())))
        mx = max(1, round(CROP_MARGIN * (xs.max() + 1 - xs.min())))
        crop = x[i, max(ys.min() - my, 0):min(ys.max() + 1 + my, h),
                 max(xs.min() - mx, 0):min(xs.max() + 1 + mx, w)]
        out[i] = cv2.resize(np.ascontiguousarray(crop), (CROP, CROP), interpolation=cv2.INTER_AREA)
    return out


class AttributeNet(nnx.Module):
    """`[B, CROP, CROP, 3]` -> logits per attribute (HEADS): 3 convs, 2 poolings, 1 hidden layer."""

    def __init__(self, rngs: nnx.Rngs, width: int = 24):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(2 * width * (CROP // 4) ** 2, 128, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(128, n, rngs=rngs) for _, n in HEADS])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        h = jax.nn.relu(self.conv1(x * 2.0 - 1.0))
        h = nnx.avg_pool(jax.nn.relu(self.conv2(h)), (2, 2), (2, 2))  # [B, CROP/2, CROP/2, w]
        h = nnx.avg_pool(jax.nn.relu(self.conv3(h)), (2, 2), (2, 2))  # [B, CROP/4, CROP/4, 2w]
        h = jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))
        return [head(h) for head in self.heads]


@dataclasses.dataclass
class IdentityClassifier:
    """A fitted AttributeNet. `predict(images, edit)` -> int32 `[N, 3]` (colour, shape,
    pattern); `accuracy`: its held-out accuracy on ground-truth renders {'identity', 'colour',
    'shape', 'pattern'} (identity: all three right)."""

    graphdef: nnx.GraphDef
    state: nnx.State
    accuracy: dict[str, float]

    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        logits = _forward(self.graphdef, self.state, jnp.asarray(crops))
        return np.stack([np.asarray(jnp.argmax(l, axis=-1)) for l in logits], axis=1).astype(np.int32)

    def predict(self, images: np.ndarray, region: np.ndarray) -> np.ndarray:
        return self.predict_crops(object_crops(images, region))


@jax.jit
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _blur(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each crop blurred by a Gaussian of sigma in [0, 0.8] px (0 for a quarter of them)."""
    out = crops.copy()
    for i in range(len(out)):
        s = rng.uniform(0.3, 0.8) if rng.uniform() < 0.75 else 0.0
        if s:
            out[i] = cv2.GaussianBlur(out[i], (0, 0), s)
    return out


def accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{'identity': all attributes right, and one share per attribute}."""
    right = pred == labels
    out = {"identity": float(right.all(axis=1).mean())}
    out.update({name: float(right[:, k].mean()) for k, (name, _) in enumerate(HEADS)})
    return out


def fit_identity_classifier(render: Callable[[int, int], tuple[np.ndarray, np.ndarray]], *,
                            num_train: int = 3072, num_test: int = 768, steps: int = 500,
                            batch: int = 128, seed: int = 0) -> IdentityClassifier:
    """Fit an AttributeNet on ground-truth crops.

    Args:
      render: (num, seed) -> (crops float32 `[num, CROP, CROP, 3]`, labels int32 `[num, 3]`),
        ground-truth renders of `num` objects from synthetic seed `seed`
        (`pbe_jax.evaluation.exemplar.identity_renders`).
      num_train / num_test: renders to train on (seed `seed + 1`) and to measure the held-out
        accuracy on (seed `seed + 2`).
    """
    rng = np.random.default_rng(seed)
    x, y = render(num_train, seed + 1)
    x_test, y_test = render(num_test, seed + 2)
    model = AttributeNet(nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt = tx.init(state)

    @jax.jit
    def step(state, opt, xb, yb):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(xb)
            return sum(optax.softmax_cross_entropy_with_integer_labels(l, yb[:, k]).mean()
                       for k, l in enumerate(logits))
        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    x_aug = _blur(x, rng)  # one blurred copy per render: the net sees sharp and blurred crops
    pool_x, pool_y = np.concatenate([x, x_aug]), np.concatenate([y, y])
    for _ in range(steps):
        idx = rng.integers(0, len(pool_x), batch)
        xb = pool_x[idx]
        flip = rng.uniform(size=batch) < 0.5  # the reference augmentation flips too
        xb[flip] = xb[flip, :, ::-1]
        state, opt, _ = step(state, opt, jnp.asarray(xb), jnp.asarray(pool_y[idx]))
    clf = IdentityClassifier(graphdef, state, {})
    clf.accuracy = accuracy(clf.predict_crops(x_test), y_test)
    clf.accuracy["identity_blurred"] = accuracy(clf.predict_crops(_blur(x_test, rng)),
                                                y_test)["identity"]
    return clf
