"""grain pipeline: one global sample stream -> per-process rows of each global batch ->
worker processes -> global `jax.Array` batches.

  MapDataset.range(N)                  all records, on every process
  .shuffle(seed).repeat(num_epochs)    a new permutation each epoch (grain folds the epoch in)
  .random_map(PbeSample)               decode + transforms; rng seeded by (seed, position),
                                        so a sample depends only on its stream position
  .batch(B / P)[p::P]                  process p of P takes rows [p*B/P, (p+1)*B/P) of every
                                        global batch of B; samples are made lazily, so a
                                        process only decodes its own rows
  .mp_prefetch(num_workers)            worker processes (output depends on num_workers)

Nothing depends on the process count, so the global batches of a run are the same on 1 or N
processes (a 2-process run reproduces a 1-process run, and a job can be resumed on another
number of hosts with the same batches).

Bad records never stop a run: a record that cannot be used (missing, undecodable, truncated,
too small, too large, no valid box) is replaced by another random record of the shard, drawn
from the sample's own rng, so the stream stays deterministic and independent of worker timing.
Every sample carries `bad_counts` (`[len(BAD_REASONS)]` int32: what was fixed or skipped while
making it), so the counts survive worker processes; the Loader sums them and strips the key.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import cv2
import grain
import jax
import numpy as np
from absl import flags as absl_flags

from pbe_jax import sharding as shd
from pbe_jax.data import decode as dec
from pbe_jax.data import transforms as tr
from pbe_jax.data.batch import HOST_KEYS
from pbe_jax.data.config import check_source
from pbe_jax.data.sources import make_source

log = logging.getLogger(__name__)


def stream_seeds(seed: int) -> tuple[int, int]:
    """(shuffle seed, sample seed) of the global stream, well apart: grain uses seed + epoch for
    the shuffle, so neighbouring seeds would repeat an order one epoch later."""
    s = np.random.SeedSequence([int(seed), 0]).generate_state(2)
    return int(s[0]), int(s[1])


class PbeSample(grain.transforms.RandomMap):
    """Record index -> one training sample: uint8 `image`, `mask`, `reference` as in batch.py,
    plus `bad_counts` `[len(BAD_REASONS)]` int32 and `record` (the index of the record used,
    after replacements). Unusable records are replaced (see the module docstring)."""

    def __init__(self, source, cfg):
        self.source = source
        self.cfg = cfg
        self._threads_set = False
        self.stage_seconds = None  # a dict to accumulate per-stage wall time into (bench.py)
        self._last = 0.0

    def __getstate__(self):  # each worker process sets its own cv2 thread count
        state = dict(self.__dict__)
        state["_threads_set"] = False
        state["stage_seconds"] = None
        return state

    def _mark(self, stage: str | None) -> None:
        if self.stage_seconds is not None:
            now = time.perf_counter()
            if stage is not None:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - self._last
            self._last = now

    def random_map(self, index, rng: np.random.Generator) -> dict:
        if not self._threads_set:  # once per process (main or grain worker)
            cv2.setNumThreads(int(self.cfg.cv2_threads))
            self._threads_set = True
        counts = np.zeros(len(dec.BAD_REASONS), np.int32)
        n = len(self.source)
        for _ in range(int(self.cfg.max_retries) + 1):
            try:
                sample = self.make(int(index), rng, counts)
                sample["bad_counts"] = counts
                sample["record"] = np.int64(index)  # the record actually used, for debugging
                return sample
            except dec.BadImage as e:
                counts[dec.REASON_INDEX[e.reason]] += 1
                log.debug("skipped record %d: %s", index, e)
            index = int(rng.integers(n))
        bad = {r: int(c) for r, c in zip(dec.BAD_REASONS, counts) if c}
        raise RuntimeError(f"{int(self.cfg.max_retries) + 1} records in a row were unusable "
                           f"({bad}); check config.data.source / images_dir")

    def make(self, index: int, rng: np.random.Generator, counts: np.ndarray) -> dict:
        """Sample from record `index`; adds to `counts`; raises BadImage."""
        cfg = self.cfg
        self._mark(None)
        rec = self.source[index]
        header = None
        if rec.pixels is not None:
            h, w = rec.pixels.shape[:2]
            size = (w, h)
        else:
            data = rec.data if rec.data is not None else _read(rec.path)
            self._mark("read")
            header = dec.probe(data)
            size = header.size
        if size[0] * size[1] > cfg.max_image_pixels:  # before a single pixel is decoded
            raise dec.BadImage("too_large", f"{rec.key} {size[0]}x{size[1]} is over "
                               f"config.data.max_image_pixels={cfg.max_image_pixels}")
        if min(size) < cfg.min_image_side:
            raise dec.BadImage("image_too_small", f"{rec.key} {size}")
        boxes, hole = rec.boxes, None
        if rec.mask_path is not None:  # a `folder` source: the box is the object mask's
            hole = dec.decode_mask(_read(rec.mask_path), header, rec.key)
            boxes = tr.mask_box(hole)
        elif header is not None and dec.boxes_in_raw_frame(header, rec.annotated_size):
            boxes = dec.orient_boxes(boxes, header.orientation)
            counts[dec.REASON_INDEX["exif_boxes_rotated"]] += 1
        boxes, box_counts, rows = tr.pixel_boxes(boxes, size, cfg, return_index=True)
        for reason, c in box_counts.items():
            counts[dec.REASON_INDEX[reason]] += c
        if not len(boxes):
            raise dec.BadImage("no_valid_box", rec.key)
        geom = tr.draw_geometry(size, boxes, rng, cfg)
        if hole is not None and cfg.use_given_masks:
            geom = dataclasses.replace(geom, polygon=None, hole=hole)
        self._mark("probe+geometry")
        if header is None:
            image = rec.pixels
        else:
            try:
                image = dec.decode(data, header, tr.pick_reduce(geom, cfg))
            except cv2.error as e:
                raise dec.BadImage("undecodable", f"{rec.key}: {e}") from e
            for reason in dec.fix_reasons(header):
                counts[dec.REASON_INDEX[reason]] += 1
            self._mark("decode")
        crop = geom.crop
        if min(crop[2] - crop[0], crop[3] - crop[1]) < cfg.resolution:
            counts[dec.REASON_INDEX["upsampled"]] += 1
        out_image, mask = tr.render_source(image, geom, cfg.resolution)
        self._mark("source crop+mask+resize")
        ref_crop = None
        backdrop = cfg.get("ref_backdrop_prob", 0.0)
        if backdrop > 0 and rng.uniform() < backdrop:
            # the object alone on a plain backdrop, where its mask is known (make_source refuses
            # the option for sources without masks)
            obj = hole if rec.owner is None else rec.owner == rows[geom.box_index]
            if obj is not None:
                ref_crop = tr.backdrop_reference(image, obj, geom, rng, cfg)
        if ref_crop is None:
            ref_crop = tr.reference_crop(image, geom)
        reference = tr.augment_reference(ref_crop, rng, cfg)
        self._mark("reference augment")
        return {"image": out_image, "mask": mask, "reference": reference}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise dec.BadImage("missing_file", path) from e
    except OSError as e:
        raise dec.BadImage("undecodable", f"{path}: {e}") from e


def make_dataset(data_cfg, *, seed: int, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> grain.MapDataset:
    """grain MapDataset of single samples (dicts as `PbeSample`) for this process's share of
    the global stream (every `process_count`-th sample), shuffled per epoch, repeated
    `num_epochs` times (None: forever)."""
    ds = _global_stream(make_source(data_cfg), data_cfg, seed, num_epochs)
    # equal lengths on every process (an odd sample out keeps hosts in step)
    return ds[process_index::process_count][:len(ds) // process_count]


def _global_stream(source, data_cfg, seed, num_epochs) -> grain.MapDataset:
    """The one sample stream all processes share: shuffle seeds and per-sample rngs depend on
    the global position only, never on the process count, so a run's global batches are the
    same on 1 or N processes (and a 2-process run reproduces a 1-process run)."""
    if len(source) == 0:
        raise ValueError("the data source has no records")
    shuffle_seed, sample_seed = stream_seeds(seed)
    n = len(source)
    ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).repeat(num_epochs)
    return ds.random_map(PbeSample(source, data_cfg), seed=sample_seed)


def _process_batches(source, data_cfg, seed, process_index, process_count, local_batch,
                     num_epochs) -> grain.MapDataset:
    """Global batch s = stream positions [s*B, (s+1)*B); process p holds rows
    [p*b, (p+1)*b) of it (b = B / P), the rows `make_array_from_process_local_data` expects
    from process p. Samples are made lazily: a process only decodes its own rows."""
    ds = _global_stream(source, data_cfg, seed, num_epochs)
    return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes, global_batch_size: int,
                   process_count: int) -> jax.sharding.NamedSharding:
    """The loader's batch sharding over `batch_axes` of `mesh`, after the divisibility check."""
    shd.check_batch_size(global_batch_size, mesh, process_count, batch_axes)
    return shd.batch_sharding(mesh, 1, batch_axes)


def _check_process_rows(sharding, global_batch_size: int, local_batch: int) -> None:
    """Each process must own `local_batch` rows of the global batch that no other process
    holds: a mesh that replicates batch rows across hosts would need those hosts to load the
    same samples, which a disjoint shard per process does not give."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*idx[0].indices(global_batch_size)))
    if len(rows) != local_batch:
        raise ValueError(
            f"this process's devices hold {len(rows)} rows of the global batch of "
            f"{global_batch_size}, not global_batch_size / process_count = {local_batch}: the "
            "mesh's batch axes must split the batch across processes (put 'data'/'fsdp' "
            "outermost in the device order)")


# What a count means when it is not a data fault: the box filter at work, e.g. the synthetic
# scenes' small objects under data.min_box_area.
EXPECTED = {"no_valid_box": "samples whose boxes the box filter (data.min_box_area / max_box_area) dropped"}


def describe_counts(counts: dict[str, int]) -> str:
    """`{'no_valid_box': 7, 'undecodable': 1}` -> '7 samples whose boxes the box filter ...
    dropped (no_valid_box), undecodable: 1', or 'none'."""
    if not counts:
        return "none"
    return ", ".join(f"{n} {EXPECTED[k]} ({k})" if k in EXPECTED else f"{k}: {n}" for k, n in counts.items())


class Loader:
    """Iterator of batches: dicts `image`, `mask`, `reference` (batch.py), global `jax.Array`s
    sharded over the mesh's batch axes, or numpy host batches when there is no mesh.

    `get_state()` / `set_state()` give a JSON-serialisable position (grain iterator state plus
    the bad-data counts): after `set_state`, the batches are those an uninterrupted run would
    have produced next (same config, seed, process count and num_workers).
    """

    def __init__(self, iter_ds: grain.IterDataset, *, global_batch_size: int,
                 sharding: jax.sharding.NamedSharding | None, index_counts: dict,
                 log_every: int = 100):
        self._iter_ds = iter_ds
        self._it = iter(iter_ds)
        self._global_batch_size = global_batch_size
        self._sharding = sharding
        self._index_counts = dict(index_counts)
        self._counts = np.zeros(len(dec.BAD_REASONS), np.int64)
        self._logged = self._counts.copy()
        self._log_every = log_every
        self._batches = 0
        if self._index_counts:
            log.info("bad data dropped when indexing: %s", self._index_counts)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            raise RuntimeError("the loader is closed")
        raw = next(self._it)
        # Plain copies: worker batches arrive in shared memory, which is unlinked when they are
        # dropped here, not whenever the caller lets go of them.
        batch = {k: np.array(raw[k]) for k in HOST_KEYS}
        self._counts += np.asarray(raw["bad_counts"]).sum(axis=0)
        del raw
        self._batches += 1
        if self._batches % self._log_every == 0 and (self._counts != self._logged).any():
            self._logged = self._counts.copy()
            log.info("records skipped or fixed after %d batches: %s", self._batches,
                     describe_counts(self.bad_data_counts()))
        if self._sharding is None:
            return batch
        return {k: jax.make_array_from_process_local_data(
                    self._sharding, batch[k], (self._global_batch_size,) + batch[k].shape[1:])
                for k in HOST_KEYS}

    def bad_data_counts(self) -> dict[str, int]:
        """Records fixed or skipped, by reason: the index-time counts plus the samples this
        process has produced so far (workers included)."""
        out = {k: int(v) for k, v in self._index_counts.items()}
        for reason, c in zip(dec.BAD_REASONS, self._counts):
            if c:
                out[reason] = out.get(reason, 0) + int(c)
        return out

    def get_state(self) -> dict:
        return {"iterator": _jsonable(self._it.get_state()),
                "bad_counts": {r: int(c) for r, c in zip(dec.BAD_REASONS, self._counts)}}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["iterator"])
        saved = state.get("bad_counts", {})
        self._counts = np.array([saved.get(r, 0) for r in dec.BAD_REASONS], np.int64)
        self._logged = self._counts.copy()

    def close(self) -> None:
        """Stop worker processes and threads (also done when the Loader is garbage collected,
        but interpreter shutdown is too late for grain to clean up quietly)."""
        if self._it is None:
            return
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None
        log.info("records skipped or fixed, at close: %s", describe_counts(self.bad_data_counts()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _jsonable(x):
    """grain states are dicts of ints / strings / lists; make numpy scalars plain."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode()
    return x


def make_loader(data_cfg, *, global_batch_size: int, seed: int,
                mesh: jax.sharding.Mesh | None = None, batch_axes=("data", "fsdp"),
                process_index: int | None = None, process_count: int | None = None,
                num_epochs: int | None = None) -> Loader:
    """The training loader for this process (see the module docstring).

    Each process loads `global_batch_size // process_count` samples per batch from its own
    shard; with `mesh`, the batches are assembled into global arrays with
    `jax.make_array_from_process_local_data`.
    """
    check_source(data_cfg)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    sharding = None
    if mesh is not None:
        sharding = batch_sharding(mesh, batch_axes, global_batch_size, process_count)
    else:
        shd.check_batch_size(global_batch_size, None, process_count)
    local_batch = global_batch_size // process_count
    if sharding is not None and process_count == jax.process_count() > 1:
        _check_process_rows(sharding, global_batch_size, local_batch)
    source = make_source(data_cfg)
    ds = _process_batches(source, data_cfg, seed, process_index, process_count, local_batch,
                          num_epochs)
    threads = int(data_cfg.read_threads)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(threads, 1) if threads else 0))
    if data_cfg.num_workers > 0:
        # grain's worker start-up reads absl flags; outside `app.run` (tests, notebooks) they
        # are unparsed and it raises. Their defaults are what we want.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_cfg.num_workers),
            per_worker_buffer_size=int(data_cfg.prefetch)))
    elif data_cfg.prefetch > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(
            it_ds, prefetch_buffer_size=int(data_cfg.prefetch))
    return Loader(it_ds, global_batch_size=global_batch_size, sharding=sharding,
                  index_counts=getattr(source, "index_counts", {}))
