"""grain loader: determinism, per-epoch shuffle, multi-process sharding, exact resume, global
arrays on a mesh, and the batch contract."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from pbe_jax.data import batch as batch_lib
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import make_dataset, make_loader


def _cfg(n=12, **kw):
    c = data_config("demo")
    c.synthetic_num_images = n
    c.synthetic_min_side, c.synthetic_max_side = 48, 80
    c.resolution, c.reference_size = 32, 16
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in batch_lib.HOST_KEYS)


def test_data_config_variants():
    demo, sd15 = data_config("demo"), data_config("sd15")
    assert (sd15.resolution, sd15.reference_size) == (512, 224)
    assert demo.resolution < 512 and demo.source == sd15.source == "synthetic"
    for c in (demo, sd15):
        assert (c.min_box_area, c.max_box_area, c.arbitrary_mask_prob) == (0.02, 0.8, 0.5)
        assert (c.box_extend_ratio, c.crop_shrink_ratio) == (0.4, 0.6)
    assert (sd15.ref_pad, sd15.bezier_jitter, sd15.ref_rotate_limit) == (10, 5, 20.0)
    with pytest.raises(ValueError, match="pod"):
        data_config("pod")


def test_samples_are_deterministic_under_the_seed():
    cfg = _cfg()
    a, b = make_dataset(cfg, seed=3), make_dataset(cfg, seed=3)
    for i in range(6):
        assert _same(a[i], b[i])
    c = make_dataset(cfg, seed=4)
    assert not all(_same(a[i], c[i]) for i in range(6))


def test_each_epoch_is_a_new_permutation_with_new_augmentation():
    cfg = _cfg(n=10)
    ds = make_dataset(cfg, seed=0, num_epochs=2)
    assert len(ds) == 20
    samples = [ds[i] for i in range(20)]
    e0 = [int(s["record"]) for s in samples[:10]]
    e1 = [int(s["record"]) for s in samples[10:]]
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1
    # The same record is cropped / augmented differently in the next epoch.
    first = {int(s["record"]): s for s in samples[:10]}
    assert not all(_same(first[int(s["record"])], s) for s in samples[10:])


@pytest.mark.parametrize("n", [12, 13])
def test_two_process_shards_are_disjoint_and_complete(n):
    cfg = _cfg(n=n)
    seen = []
    for p in range(2):
        ds = make_dataset(cfg, seed=0, process_index=p, process_count=2, num_epochs=1)
        assert len(ds) == n // 2
        seen.append({int(ds[i]["record"]) for i in range(len(ds))})
    assert not seen[0] & seen[1]
    union = seen[0] | seen[1]
    assert len(union) == n - n % 2 and union <= set(range(n))  # an odd one out keeps hosts in step


def test_global_batches_do_not_depend_on_process_count():
    """Process p holds rows [p*b, (p+1)*b) of the same global batch a single process sees, so
    an N-process run trains on exactly the batches of a 1-process run."""
    cfg = _cfg(n=10)
    with make_loader(cfg, global_batch_size=4, seed=3, process_index=0, process_count=1) as one:
        single = _take(one, 3)
    parts = []
    for p in range(2):
        with make_loader(cfg, global_batch_size=4, seed=3, process_index=p, process_count=2) as lo:
            parts.append(_take(lo, 3))
    for s, (a, b) in enumerate(zip(*parts)):
        for k in single[s]:
            np.testing.assert_array_equal(single[s][k], np.concatenate([a[k], b[k]]))


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def test_iterator_resume_is_exact_across_epochs():
    cfg = _cfg(n=10, read_threads=2, prefetch=2)
    with make_loader(cfg, global_batch_size=4, seed=1, process_index=0, process_count=1) as a:
        _take(a, 3)
        state = json.loads(json.dumps(a.get_state()))  # as stored in the checkpoint
        expected = _take(a, 4)  # 28 samples in total: crosses two epoch boundaries
    with make_loader(cfg, global_batch_size=4, seed=1, process_index=0, process_count=1) as b:
        b.set_state(state)
        got = _take(b, 4)
    assert all(_same(x, y) for x, y in zip(expected, got))
    with make_loader(cfg, global_batch_size=4, seed=1, process_index=0, process_count=1) as c:
        assert not _same(_take(c, 1)[0], expected[0])  # resuming did not just restart


@pytest.mark.slow
def test_worker_processes_resume_exactly_and_carry_bad_data_counts(tmp_path):
    from pbe_jax.data.bench import write_coco_fixture

    ann, images = write_coco_fixture(str(tmp_path), 6, width=64, height=48)
    (tmp_path / "images" / "000000000002.jpg").write_bytes(b"broken")
    cfg = _cfg(source="coco", annotations=ann, images_dir=images, num_workers=2, prefetch=1,
               read_threads=1)
    kw = dict(global_batch_size=2, seed=0, process_index=0, process_count=1)
    with make_loader(cfg, **kw) as a:
        _take(a, 2)
        state = json.loads(json.dumps(a.get_state()))
        expected = _take(a, 4)
        counts = a.bad_data_counts()
    with make_loader(cfg, **kw) as b:
        b.set_state(state)
        got = _take(b, 4)
        assert b.bad_data_counts().get("undecodable", 0) > 0  # restored with the state
    assert all(_same(x, y) for x, y in zip(expected, got))
    # 12 samples from 6 records, one of them broken: the workers' counts reach the loader.
    assert counts.get("undecodable", 0) > 0, counts


def test_global_arrays_on_a_mesh_match_host_batches():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    cfg = _cfg(prefetch=0)
    kw = dict(global_batch_size=8, seed=0, process_index=0, process_count=1)
    with make_loader(cfg, mesh=mesh, **kw) as sharded, make_loader(cfg, **kw) as host:
        for _ in range(2):
            g, h = next(sharded), next(host)
            assert set(g) == set(batch_lib.HOST_KEYS)
            for k in batch_lib.HOST_KEYS:
                assert isinstance(g[k], jax.Array) and g[k].dtype == np.uint8
                assert g[k].sharding.spec == PartitionSpec(("data", "fsdp"))
                assert len(g[k].sharding.device_set) == 8
                np.testing.assert_array_equal(np.asarray(g[k]), h[k])
    spec = batch_lib.host_batch_spec(8, cfg.resolution, cfg.reference_size)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
        k: (h[k].shape, h[k].dtype) for k in batch_lib.HOST_KEYS}


def test_batch_size_must_divide_over_mesh_and_processes():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    cfg = _cfg()
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        make_loader(cfg, global_batch_size=6, seed=0, mesh=mesh, process_count=1,
                    process_index=0)
    with pytest.raises(ValueError, match="process_count 3"):
        make_loader(cfg, global_batch_size=8, seed=0, mesh=mesh, process_count=3,
                    process_index=0)
    only_tensor = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    with pytest.raises(ValueError, match="none of batch_axes"):
        make_loader(cfg, global_batch_size=8, seed=0, mesh=only_tensor, process_count=1,
                    process_index=0)


def test_each_process_must_own_its_batch_rows():
    from pbe_jax.data.pipeline import _check_process_rows, batch_sharding

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharding = batch_sharding(mesh, ("data", "fsdp"), 16, 1)
    _check_process_rows(sharding, 16, 16)  # one process holds all rows
    # As if this process were 1 of 2 while its devices hold every row (batch axes not split
    # across hosts): loading half the batch here would leave rows inconsistent.
    with pytest.raises(ValueError, match="must split the batch across processes"):
        _check_process_rows(sharding, 16, 8)


def test_normalize_batch_contract():
    rng = np.random.default_rng(0)
    u8 = {"image": rng.integers(0, 256, (2, 8, 8, 3), np.uint8),
          "mask": rng.choice(np.array([0, 77, 255], np.uint8), (2, 8, 8, 1)),
          "reference": rng.integers(0, 256, (2, 4, 4, 3), np.uint8)}
    out = jax.jit(batch_lib.normalize_batch)(u8)
    assert set(out) == set(batch_lib.DEVICE_KEYS)
    assert all(v.dtype == jnp.float32 for v in out.values())
    image = u8["image"].astype(np.float64) / 255 * 2 - 1  # ToTensor + Normalize(0.5, 0.5)
    mask = u8["mask"] / 255.0
    np.testing.assert_allclose(out["image"], image, atol=1e-6)
    np.testing.assert_allclose(out["mask"], mask, atol=1e-7)
    np.testing.assert_allclose(out["masked_image"], image * mask, atol=1e-6)
    hole = np.broadcast_to(u8["mask"] == 0, out["masked_image"].shape)
    assert (np.asarray(out["masked_image"])[hole] == 0).all() and hole.any()  # 0 in [-1, 1]
    # The reference stays un-normalised: the conditioner normalises it (models/exemplar.py).
    np.testing.assert_allclose(out["reference"], u8["reference"] / 255.0, atol=1e-7)
