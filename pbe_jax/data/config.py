"""The `config.data` block: where samples come from and every size / probability of the
Paint-by-Example self-reference pipeline (PBE_SPEC.md section 2).

Pixel sizes that the official code states in source-image pixels (`ref_pad` 10, `bezier_jitter`
5) are kept in source-image pixels; the elastic transform's pixel sizes (`elastic_alpha`,
`elastic_sigma`, `elastic_alpha_affine`) are in pixels of the reference image at
`reference_size` (albumentations applies it to the 224 px crop). The demo variant shrinks
everything with its tiny images so the augmentations look the same at 64 / 32 px.
"""
from __future__ import annotations

import ml_collections

PROFILES = ("demo", "paper")
_ALIASES = {"sd15": "paper"}  # the name this profile had when it served one config variant


def data_config(profile: str = "demo") -> ml_collections.ConfigDict:
    """`config.data` for a data `profile`: 'paper' (alias 'sd15') or 'demo'. Config variants
    pick a profile and override sizes (e.g. `resolution`), so a new variant needs no edit here.

    'paper' is the paper's recipe (512 px source, 224 px reference, the official box filter and
    augmentations; `source` must be set, e.g. 'openimages'). 'demo' is 64 px / 32 px on small
    synthetic scenes, for the CPU demo and the tests.
    """
    profile = _ALIASES.get(profile, profile)
    if profile not in PROFILES:
        raise ValueError(f"unknown data config profile {profile!r}; expected one of {PROFILES} "
                         f"(or {sorted(_ALIASES)})")
    demo = profile == "demo"
    c = ml_collections.ConfigDict()

    # --- where samples come from ---
    c.source = "synthetic"  # synthetic | coco | openimages | tfds | folder (pbe_jax.data.sources)
    c.annotations = ""  # coco: instances JSON; openimages: bbox CSV; folder: boxes .jsonl/.csv (optional)
    c.images_dir = ""  # coco / openimages / folder: folder holding the image files
    c.mask_suffix = "_mask"  # folder: NAME<mask_suffix>.png is the object mask of NAME.jpg (white = object)
    c.use_given_masks = False  # folder: the hole is the mask's shape, not a Bezier / box hole
    c.image_ext = ".jpg"  # openimages: file name = ImageID + image_ext
    c.tfds_name = "coco/2017"  # tfds: any dataset with `image` + `objects/bbox`
    c.tfds_split = "train"
    c.tfds_data_dir = ""  # '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    # False: the loader refuses source='synthetic' (the paper variants of configs/pbe.py set it,
    # so a run that forgot --config.data.source fails at start instead of training on demo scenes)
    c.allow_synthetic = True
    c.synthetic_num_images = 256 if demo else 10_000
    c.synthetic_min_side = 72 if demo else 400  # synthetic scene sides are drawn in [min, max]
    c.synthetic_max_side = 128 if demo else 640
    c.synthetic_seed = 0  # the scenes are a fixed dataset; `seed` only drives order and augment
    # 'varied': any colour and texture; 'palette' (configs/pbe.py demo): muted backgrounds, 1-3
    # large solid objects in 8 saturated colours, so a tiny model learns to follow the exemplar in
    # minutes (pbe_jax/data/synthetic.py); 'identity' (demo,scenes=identity): objects of colour x
    # shape x pattern.
    c.synthetic_style = "varied"

    # --- output sizes ---
    c.resolution = 64 if demo else 512  # square source image / mask side
    c.reference_size = 32 if demo else 224  # square reference side (CLIP input)

    # --- box filter (scripts/read_bbox.py) ---
    c.min_box_area = 0.02  # normalised box area bounds, inclusive
    c.max_box_area = 0.8
    c.min_box_side = 2  # px in the source image; thinner boxes are degenerate
    c.min_image_side = 16 if demo else 32  # px; smaller images are skipped (counted)
    # px (W x H); larger images (decompression bombs, huge scans) are skipped, counted as
    # 'too_large', before any pixel is decoded: 64 MP is ~200 MB of RGB per decode.
    c.max_image_pixels = 64_000_000

    # --- mask and crop (open-images.py __getitem__) ---
    c.arbitrary_mask_prob = 0.5  # Bezier mask with this probability, else the extended box
    c.box_extend_ratio = 0.4  # each side grows by randint(0, ratio * free space on that side)
    c.crop_shrink_ratio = 0.6  # square crop shrinks by randint(0, ratio * min margin)
    c.bezier_samples = 18  # points per edge at t = 0.05 .. 0.05 * samples
    c.bezier_jitter = 1 if demo else 5  # +- px per point, source-image pixels

    # --- reference augmentation (albumentations 0.4.3 Compose in the official code) ---
    c.ref_pad = 2 if demo else 10  # px of context around the box, clamped to the image
    c.ref_flip_prob = 0.5
    c.ref_rotate_prob = 0.5
    c.ref_rotate_limit = 20.0  # degrees
    c.ref_blur_prob = 0.3
    c.ref_blur_min = 3  # box-blur kernel drawn from the odd sizes in [min, max]
    c.ref_blur_max = 3 if demo else 7
    c.ref_elastic_prob = 0.3
    # albumentations 0.4.3 defaults at 224 px: alpha 1, sigma 50, alpha_affine 50. The random
    # affine part (corner points moved by up to alpha_affine px) dominates; the smooth
    # displacement itself is ~0.01 px with alpha 1.
    c.elastic_alpha = 1.0
    c.elastic_sigma = 50.0 * (32 / 224 if demo else 1.0)
    c.elastic_alpha_affine = 50.0 * (32 / 224 if demo else 1.0)
    # Not in the paper: this share of references is the object alone, cut out by its mask and
    # pasted at a random place and scale (filling [fill_min, fill_max] of the side) on a plain
    # backdrop of a random tone, before the augmentations above (AnyDoor's background-removed
    # references; transforms.backdrop_reference). So a model also takes references that come
    # without their scene (product shots, segmented objects). Needs object masks: the
    # 'synthetic' source, or 'folder' with NAME_mask.png files. 0 = off (the paper's recipe).
    c.ref_backdrop_prob = 0.0
    c.ref_backdrop_fill_min = 0.5
    c.ref_backdrop_fill_max = 0.95

    # --- decoding ---
    # Decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when even the reduced image
    # still gives at least `resolution` px for the crop and `reference_size` px for the box.
    c.decode_reduced = True

    # --- loader ---
    c.num_workers = 0 if demo else 8  # grain worker processes; 0 = in-process
    c.read_threads = 2 if demo else 1  # threads per process applying the per-sample transform
    c.prefetch = 2  # batches buffered per worker process
    c.max_retries = 8  # bad records replaced by random others before a sample gives up
    c.cv2_threads = 1  # OpenCV's own thread pool per process (the workers already parallelise)
    return c


def check_source(data_cfg) -> None:
    """Fail, naming the flags to set, when a config that trains a real model
    (`allow_synthetic=False`) would read the synthetic demo scenes."""
    if data_cfg.source == "synthetic" and not data_cfg.get("allow_synthetic", True):
        raise ValueError(
            "config.data.source is 'synthetic' (procedural demo scenes), but this config trains a "
            "real model (config.data.allow_synthetic=False). Set the data: "
            "--config.data.source=openimages|coco|tfds --config.data.annotations=... "
            "--config.data.images_dir=... (tfds: --config.data.tfds_name=...), or pass "
            "--config.data.allow_synthetic=True to train on the synthetic scenes on purpose.")
