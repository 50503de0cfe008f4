"""FID Inception: pool3 parity with torch-fidelity's independent PyTorch implementation (random
weights, incl. BN running stats), the weight loaders, and the two preprocessing styles."""
import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import Mesh

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.evals.features import inception_extractor
from pbe_jax.evals.inception import InceptionV3, inception_inputs
from tests.helpers import assert_close


def _import_torch_fidelity(*names):
    """torch-fidelity's module files without its package `__init__` (which imports torchvision,
    unavailable for this CPU torch build). The code that runs is torch-fidelity's own."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (test extra)")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for k in saved:
        del sys.modules[k]
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    try:
        return [importlib.import_module(f"torch_fidelity.{n}") for n in names]
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _random_torch_fidelity_inception(tfe):
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights and BN statistics (its
    constructor would download the real weights: skip that load)."""

    class Unloaded(tfe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

    tfe.load_state_dict_from_url = lambda *a, **k: None
    net = Unloaded("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("conv.weight"):  # He scale keeps activations O(1) through 90 layers
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5, generator=g)
            elif name.endswith("bn.weight"):
                p.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("bn.bias"):
                p.normal_(0, 0.1, generator=g)
            else:  # fc
                p.normal_(0, 0.01, generator=g)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
    return net.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tfe, tfresize = _import_torch_fidelity("feature_extractor_inceptionv3", "interpolate_compat_tensorflow")
    net = _random_torch_fidelity_inception(tfe)
    path = str(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")
    torch.save(net.state_dict(), path)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        pool3 = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()
    return dict(net=net, path=path, images=images, pool3=pool3, tf_resize=tfresize)


@pytest.fixture(scope="module")
def loaded(reference):
    model, report = InceptionV3.from_file(reference["path"], return_report=True)
    return model, report


def test_pool3_matches_torch_fidelity(reference, loaded):
    model, report = loaded
    ref = reference["pool3"]
    assert ref.std() > 0.1 and (ref > 0).mean() > 0.5, "random weights gave degenerate features"
    ours = inception_extractor(model, style="torch_fidelity")(reference["images"])
    assert ours.shape == (2, 2048)
    assert_close(ours, ref)
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)
    used = [k for k in reference["net"].state_dict() if not k.startswith("fc.") and "num_batches" not in k]
    assert report.loaded == len(used)


def test_batch_sharded_over_mesh_equals_unsharded(reference, loaded):
    model, _ = loaded
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    ours = inception_extractor(model, style="torch_fidelity", mesh=mesh)(reference["images"])
    assert_close(ours, reference["pool3"])


def test_safetensors_file_loads_the_same_weights(reference, loaded, tmp_path):
    sd = {k: v.numpy() for k, v in reference["net"].state_dict().items()}
    path = str(tmp_path / "inception.safetensors")
    stio.write_safetensors(path, sd)
    model = InceptionV3.from_file(path)
    ours = jax.tree.leaves(nnx.state(model, nnx.Param))
    base = jax.tree.leaves(nnx.state(loaded[0], nnx.Param))
    assert len(ours) == len(base)
    for a, b in zip(ours, base):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loader_is_strict_and_names_keys(reference, tmp_path):
    sd = {k: v.numpy() for k, v in reference["net"].state_dict().items()}
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    sd["Mixed_9z.branch1x1.conv.weight"] = np.zeros((1,), np.float32)
    sd["Mixed_5b.branch_pool.bn.running_var"] = np.ones((7,), np.float32)
    path = str(tmp_path / "bad.safetensors")
    stio.write_safetensors(path, sd)
    with pytest.raises(CheckpointMismatchError) as e:
        InceptionV3.from_file(path)
    msg = str(e.value)
    for key in ("Mixed_6b.branch7x7_2.conv.weight", "Mixed_9z.branch1x1.conv.weight",
                "Mixed_5b.branch_pool.bn.running_var"):
        assert key in msg


@pytest.mark.parametrize("size", [(64, 48), (512, 400)])
def test_pytorch_fid_preprocessing_matches_torch(size):
    """pytorch-fid: [0, 1] images -> F.interpolate(299, bilinear, align_corners=False) -> 2x - 1."""
    rng = np.random.default_rng(1)
    images = rng.random((2, *size, 3), dtype=np.float32)
    ref = 2 * F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                            align_corners=False) - 1
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(inception_inputs)(images))
    np.testing.assert_allclose(ours, ref, atol=5e-7)
    as_uint8 = (images * 255).astype(np.uint8)
    ref_u8 = F.interpolate(torch.from_numpy(as_uint8).permute(0, 3, 1, 2).float() / 255, size=(299, 299),
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy() * 2 - 1
    np.testing.assert_allclose(np.asarray(inception_inputs(as_uint8)), ref_u8, atol=5e-7)


def test_torch_fidelity_preprocessing_matches_tf1_resize(reference):
    """Downsampling too (the parity test above only upsamples): torch-fidelity's TF1 resize."""
    images = np.random.default_rng(2).integers(0, 256, (2, 512, 400, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    ref = reference["tf_resize"].interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ref = ((ref - 128) / 128).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(inception_inputs(images, style="torch_fidelity"))
    np.testing.assert_allclose(ours, ref, atol=5e-7)
