"""The FID Inception network ("pt_inception-2015-12-05") in Flax NNX, NHWC, inference only.

This is the TensorFlow FID graph as ported by pytorch-fid (`fid_inception_v3`) and by
torch-fidelity (`FeatureExtractorInceptionV3`): torchvision's Inception3 with the TF quirks:
- the average pool inside Mixed_5*/6b-e/7b ignores padded zeros (`count_include_pad=False`);
- Mixed_7c pools with a *max* pool in its pool branch (a quirk of the TF graph);
- BatchNorm with eps 1e-3, always with its running statistics.
The output is the 2048-d "pool3" vector (global average of Mixed_7c), the FID feature.

Module paths equal the PyTorch attribute paths (`Mixed_5b.branch5x5_1.conv.weight`,
`Conv2d_1a_3x3.bn.running_var`), so `pbe_jax.convert.torch_layout` maps the weight file by
rename and transpose. The weight files of pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`)
and of torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`) hold the same keys (both
modules name their layers like torchvision's Inception3), so `InceptionV3.from_file` reads
either, and a `.safetensors` file with those keys. `fc.*` (the 1008-way classifier) and
`*.num_batches_tracked` are reported as ignored: FID uses pool3.

Inputs are preprocessed by `inception_inputs` (resize to 299 and scale to [-1, 1], exactly as
pytorch-fid or torch-fidelity do); the network itself takes `[B, 299, 299, 3]` in [-1, 1].
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import LoadReport, load_torch_state_dict
from pbe_jax.evals.resize import resize_bilinear
from pbe_jax.models import axes as ax
from pbe_jax.models.abstract import eval_shape

Dtype = Any

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Keys of the weight files that pool3 features do not use (classifier, BN step counters).
IGNORE_KEYS = ("fc.weight", "fc.bias", "*.num_batches_tracked")
PREPROCESS_STYLES = ("pytorch_fid", "torch_fidelity")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nnx.Module):
    """`torch.nn.BatchNorm2d(C, eps)` in eval mode: `(x - running_mean) / sqrt(running_var +
    eps) * weight + bias` over the channel (last) axis. The statistics are Params (not
    BatchStats) so that the strict torch-layout loader maps `running_mean`/`running_var`
    like any other weight; nothing here is ever trained."""

    def __init__(self, num_features: int, *, eps: float = BN_EPS, param_dtype: Dtype = jnp.float32):
        norm = (ax.NORM,)
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=norm)
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=norm)
        self.running_mean = nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=norm)
        self.running_var = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=norm)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Fold into one multiply-add, in fp32 whatever the compute dtype (the statistics of
        # the TF graph span several orders of magnitude).
        mul = self.scale[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        add = self.bias[...] - self.running_mean[...] * mul
        return (x.astype(jnp.float32) * mul + add).astype(x.dtype)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> frozen BN (eps 1e-3) -> ReLU; torchvision's `BasicConv2d`."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, *, stride=1, padding=0,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        (ph, pw) = _pair(padding)
        # nnx.Conv directly rather than `layers.conv`: this network has non-square kernels
        # (1x7, 7x1, 1x3, 3x1) and per-axis padding, which the square-kernel factory does not
        # take. Same logical axes as the factory.
        self.conv = nnx.Conv(
            in_ch, out_ch, kernel_size=_pair(kernel_size), strides=_pair(stride),
            padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs, kernel_metadata={"out_sharding": (None, None, ax.CONV_IN, ax.CONV_OUT)})
        self.bn = FrozenBatchNorm(out_ch, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of real (unpadded) pixels in the window.
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
    """`FIDInceptionA`: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""

    def __init__(self, in_ch: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision `InceptionB` (Mixed_6a): stride-2 reduction 35 -> 17."""

    def __init__(self, in_ch: int, **kw):
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, b3d, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
    """`FIDInceptionC`: factorised 7x7 branches, avgpool without counting padding."""

    def __init__(self, in_ch: int, channels_7x7: int, **kw):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, b7d, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision `InceptionD` (Mixed_7a): stride-2 reduction 17 -> 8."""

    def __init__(self, in_ch: int, **kw):
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """`FIDInceptionE_1` (`pool='avg'`, Mixed_7b) and `FIDInceptionE_2` (`pool='max'`, Mixed_7c:
    the TF graph's max pool where the paper has an average pool)."""

    def __init__(self, in_ch: int, *, pool: str, **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = jnp.concatenate([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], axis=-1)
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        return jnp.concatenate([b1, b3, b3d, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID InceptionV3 up to pool3: `[B, 299, 299, 3]` in [-1, 1] -> `[B, 2048]`.

    No config: the FID network has one fixed shape. `dtype` is the compute dtype (keep fp32 for
    FID numbers comparable with published ones); params are `param_dtype`.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = InceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = InceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x`: `[B, 299, 299, 3]` scaled to [-1, 1] (see `inception_inputs`) -> pool3 `[B, 2048]`
        in float32. Other sizes run (the net is convolutional) but only 299 gives FID features."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects [B, H, W, 3] images, got shape {tuple(x.shape)}")
        x = x.astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
        x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
        x = _max_pool_3x3_s2(x)  # [B, 35, 35, 192]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)  # ... -> [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool3 [B, 2048]

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
        return_report: bool = False,
    ):
        """Load the FID weights from `path`: the pytorch-fid / torch-fidelity `.pth` (read with
        `torch.load(weights_only=True)`: no arbitrary unpickling) or a `.safetensors` with the
        same keys. Strict: a missing, unknown or mis-shaped key raises `CheckpointMismatchError`
        naming it; `fc.*` and `*.num_batches_tracked` are listed in the report's `ignored`."""
        state_dict = stio.read_checkpoint(path)
        model = eval_shape(lambda: cls(rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        report = load_torch_state_dict(model, state_dict, source=path, ignore_unexpected=IGNORE_KEYS, place=place)
        return (model, report) if return_report else model

    def load_torch_state_dict(self, state_dict, **kw) -> LoadReport:
        """Copy a pytorch-fid / torch-fidelity Inception state dict (numpy arrays) in place."""
        return load_torch_state_dict(self, state_dict, ignore_unexpected=IGNORE_KEYS, **kw)


def inception_inputs(images: jax.Array, style: str = "pytorch_fid") -> jax.Array:
    """Images `[B, H, W, 3]` -> the network's input `[B, 299, 299, 3]` in [-1, 1] (float32).

    - `pytorch_fid` (the default; what `pytorch-fid` and the FID numbers of most papers use):
      uint8 images are divided by 255 (torchvision `ToTensor`), float images must be in [0, 1];
      PyTorch bilinear resize to 299 (half-pixel, no antialias); then `2 x - 1`.
    - `torch_fidelity` (torch-fidelity / the TF1 reference): uint8 images (float images in
      [0, 1] are multiplied by 255); TF1 bilinear resize to 299; then `(x - 128) / 128`.
    """
    if style not in PREPROCESS_STYLES:
        raise ValueError(f"unknown Inception preprocessing style {style!r}; use one of {PREPROCESS_STYLES}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception_inputs expects [B, H, W, 3] RGB images, got shape {tuple(images.shape)}")
    is_uint8 = images.dtype == jnp.uint8
    x = images.astype(jnp.float32)
    size = (INPUT_SIZE, INPUT_SIZE)
    if style == "pytorch_fid":
        x = x / 255.0 if is_uint8 else x
        return 2.0 * resize_bilinear(x, size, "half_pixel") - 1.0
    x = x if is_uint8 else x * 255.0
    return (resize_bilinear(x, size, "tf1") - 128.0) / 128.0
