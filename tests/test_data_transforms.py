"""Per-sample transforms of the PbE self-reference pipeline (PBE_SPEC.md section 2)."""
import cv2
import numpy as np
import pytest
import scipy.ndimage

from pbe_jax.data import transforms as tr
from pbe_jax.data.config import data_config
from pbe_jax.data.synthetic import synthetic_scene

W, H = 160, 120
BOX = (60, 40, 110, 90)  # x0, y0, x1, y1


def _cfg(**kw):
    c = data_config("sd15")
    c.resolution, c.reference_size = 64, 32
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _scene_with_object(colour=(250, 20, 20)):
    """A textured synthetic background with a solid object filling BOX."""
    img, _ = synthetic_scene(3, min_side=H, max_side=H)
    img = cv2.resize(img, (W, H))
    x0, y0, x1, y1 = BOX
    img[y0:y1, x0:x1] = colour
    return img


def _inside(inner, outer):
    return (inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2]
            and inner[3] <= outer[3])


def test_extend_box_moves_sides_out_within_ratio():
    for seed in range(50):
        ext = tr.extend_box(BOX, (W, H), np.random.default_rng(seed), 0.4)
        assert _inside(BOX, ext) and _inside(ext, (0, 0, W, H))
        assert BOX[0] - ext[0] <= int(0.4 * BOX[0])
        assert ext[2] - BOX[2] <= int(0.4 * (W - BOX[2]))


@pytest.mark.parametrize("size", [(160, 120), (120, 160), (300, 90)])
def test_square_crop_holds_extended_box(size):
    w, h = size
    box = (w // 3, h // 3, w // 3 + w // 6, h // 3 + h // 6)
    squares = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        ext = tr.extend_box(box, size, rng, 0.4)
        crop = tr.square_crop(ext, size, rng, 0.6)
        assert _inside(ext, crop) and _inside(crop, (0, 0, w, h))
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        if (cw, ch) != (w, h):
            assert cw == ch and cw >= 0.4 * min(w, h)  # shrink <= 0.6 of the margin per side
            squares += 1
    assert squares > 0


def test_square_crop_falls_back_to_whole_image():
    # W == H, and a box wider than the short side: the official code uses the whole image.
    rng = np.random.default_rng(0)
    assert tr.square_crop((10, 10, 20, 20), (100, 100), rng, 0.6) == (0, 0, 100, 100)
    assert tr.square_crop((5, 10, 95, 20), (100, 50), rng, 0.6) == (0, 0, 100, 50)


def test_bezier_mask_differs_from_box_and_stays_near_it():
    ext = (45, 25, 130, 105)
    jitter = 5
    size = 0
    for seed in range(10):
        poly = tr.bezier_polygon(BOX, ext, np.random.default_rng(seed), 18, jitter)
        assert 36 <= len(poly) <= 72 and poly.shape[1] == 2
        # Every vertex lies between the box shrunk by the jitter and the extended box grown by it.
        assert (poly[:, 0] >= ext[0] - jitter).all() and (poly[:, 0] <= ext[2] + jitter).all()
        assert (poly[:, 1] >= ext[1] - jitter).all() and (poly[:, 1] <= ext[3] + jitter).all()
        hole = np.zeros((H, W), np.uint8)
        cv2.fillPoly(hole, [np.round(poly).astype(np.int32)], 1)
        box = np.zeros((H, W), np.uint8)
        box[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 1
        iou = (hole & box).sum() / (hole | box).sum()
        assert 0.6 < iou < 0.97, iou  # not the box, but near it
        assert hole[(BOX[1] + BOX[3]) // 2, (BOX[0] + BOX[2]) // 2] == 1


def _official_bezier_points(box, ext):
    """The loop of the official open-images.py with `bezier.Curve` and random_width 0."""
    import bezier

    x0, y0, x1, y1 = box
    top = [[x0, (x0 + x1) / 2, x1], [y0, ext[1], y0]]
    down = [[x1, (x0 + x1) / 2, x0], [y1, ext[3], y1]]
    left = [[x0, ext[0], x0], [y1, (y0 + y1) / 2, y0]]
    right = [[x1, ext[2], x1], [y0, (y0 + y1) / 2, y1]]
    pts = []
    for nodes in (top, right, down, left):
        curve = bezier.Curve(np.asfortranarray(nodes, dtype=float), degree=2)
        xs, ys = [], []
        for i in range(1, 19):
            x, y = curve.evaluate(i * 0.05)[:, 0]
            if x not in xs and y not in ys:
                pts.append((x, y))
                xs.append(x)
                ys.append(y)
    return np.array(pts)


def test_bezier_points_match_the_bezier_library_exactly():
    pytest.importorskip("bezier")
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(60):
        x0, y0 = rng.integers(0, 300, 2)
        w, h = rng.integers(10, 300, 2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        grow = rng.integers(0, 50, 4)
        ext = (box[0] - grow[0], box[1] - grow[1], box[2] + grow[2], box[3] + grow[3])
        ours = tr.bezier_polygon(box, tuple(int(v) for v in ext), rng, 18, 0)
        ref = _official_bezier_points(box, ext)
        np.testing.assert_array_equal(ours, ref)  # same points, same drops
        lengths.add(len(ref))
    assert len(lengths) > 3  # the drop rule matters: point counts vary


def test_bezier_straight_edge_keeps_one_point():
    # A box on the top border with no room to extend upward: the top curve is the line y = 0,
    # every sample repeats y, and only its first point is kept.
    box, ext = (20, 0, 60, 30), (10, 0, 70, 40)
    poly = tr.bezier_polygon(box, ext, np.random.default_rng(0), 18, 0)
    top = poly[poly[:, 1] == 0]
    assert len(top) == 1 and top[0, 0] == pytest.approx(20 + 0.05 * 40)


def _geometry(polygon=None):
    return tr.Geometry(size=(W, H), box=BOX, extended=(50, 30, 120, 100),
                       crop=(20, 0, 140, 120), reference=tr.pad_box(BOX, (W, H), 10),
                       polygon=polygon)


def test_render_source_polarity_and_content():
    img = _scene_with_object()
    out, mask = tr.render_source(img, _geometry(), 56)
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8
    assert mask.shape == (56, 56, 1) and mask.dtype == np.uint8
    # Crop (20, 0)-(140, 120): 120 px -> 56 px, so the box centre (85, 65) lands at (30, 30).
    assert mask[30, 30, 0] == 0  # hole = 0
    assert mask[2, 2, 0] == 255 and mask[53, 53, 0] == 255  # outside the extended box = keep
    np.testing.assert_array_equal(out[30, 30], (250, 20, 20))  # the image itself is not masked
    assert set(np.unique(mask)) > {0, 255}  # bilinear resize: soft values on the hole edge
    # The hole is the extended box: 50..120 x 30..100, i.e. 30..100 in the crop -> 14..46.7.
    assert (mask[15:46, 15:46] == 0).all()
    assert (mask[:13] == 255).all() and (mask[:, 48:] == 255).all()


def test_render_source_reduced_decode_gives_same_geometry():
    img = _scene_with_object()
    poly = tr.bezier_polygon(BOX, (50, 30, 120, 100), np.random.default_rng(1), 18, 5)
    full_img, full_mask = tr.render_source(img, _geometry(poly), 48)
    half = cv2.resize(img, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    half_img, half_mask = tr.render_source(half, _geometry(poly), 48)
    hole_full, hole_half = full_mask[..., 0] < 128, half_mask[..., 0] < 128
    assert (hole_full != hole_half).mean() < 0.02
    assert np.abs(full_img.astype(int) - half_img).mean() < 12


def test_reference_crop_pads_and_keeps_the_object():
    img = _scene_with_object()
    geom = _geometry()
    crop = tr.reference_crop(img, geom)
    assert crop.shape == (BOX[3] - BOX[1] + 20, BOX[2] - BOX[0] + 20, 3)
    none = _cfg(ref_flip_prob=0, ref_rotate_prob=0, ref_blur_prob=0, ref_elastic_prob=0)
    ref = tr.augment_reference(crop, np.random.default_rng(0), none)
    assert ref.shape == (32, 32, 3) and ref.dtype == np.uint8
    np.testing.assert_array_equal(ref, cv2.resize(crop, (32, 32)))
    np.testing.assert_array_equal(ref[16, 16], (250, 20, 20))
    # pad clamps at the image border
    assert tr.pad_box((3, 4, 150, 118), (W, H), 10) == (0, 0, 160, 120)


def test_reference_augmentations_each_do_their_job():
    crop = _scene_with_object()[30:100, 50:120]
    base = _cfg(ref_flip_prob=0, ref_rotate_prob=0, ref_blur_prob=0, ref_elastic_prob=0)
    plain = tr.augment_reference(crop, np.random.default_rng(0), base)

    flip = tr.augment_reference(crop, np.random.default_rng(0), _cfg(
        ref_flip_prob=1, ref_rotate_prob=0, ref_blur_prob=0, ref_elastic_prob=0))
    np.testing.assert_array_equal(flip, plain[:, ::-1])

    rot = tr.augment_reference(crop, np.random.default_rng(0), _cfg(
        ref_flip_prob=0, ref_rotate_prob=1, ref_blur_prob=0, ref_elastic_prob=0))
    assert not np.array_equal(rot, plain)
    assert np.abs(rot[12:20, 12:20].astype(int) - plain[12:20, 12:20]).mean() < 10  # centre stays

    blur = tr.augment_reference(crop, np.random.default_rng(0), _cfg(
        ref_flip_prob=0, ref_rotate_prob=0, ref_blur_prob=1, ref_blur_min=5, ref_blur_max=5,
        ref_elastic_prob=0))
    np.testing.assert_array_equal(blur, cv2.blur(plain, (5, 5)))

    el = tr.augment_reference(crop, np.random.default_rng(0), _cfg(
        ref_flip_prob=0, ref_rotate_prob=0, ref_blur_prob=0, ref_elastic_prob=1,
        elastic_alpha_affine=6.0))
    assert el.shape == plain.shape and not np.array_equal(el, plain)


def test_elastic_identity_without_displacement():
    img = _scene_with_object()[:64, :64].copy()
    out = tr.elastic_transform(img, np.random.default_rng(0), alpha=0.0, sigma=50.0,
                               alpha_affine=0.0)
    np.testing.assert_array_equal(out, img)


def test_smooth_displacement_matches_scipy_in_distribution():
    """The coarse-grid field has about the std and smoothness of albumentations'
    gaussian_filter(uniform(-1, 1), sigma) at 224 px."""
    ours, ref = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        ours.append(tr.smooth_displacement((224, 224), rng, 50.0))
        ref.append(scipy.ndimage.gaussian_filter(rng.uniform(-1, 1, (224, 224)), 50.0))
    s_ours, s_ref = np.std(ours), np.std(ref)
    assert 0.5 < s_ours / s_ref < 2.0, (s_ours, s_ref)
    # smooth: neighbouring pixels differ by a small fraction of the spread
    step = np.abs(np.diff(ours[0], axis=1)).mean()
    assert step < 0.05 * (ours[0].max() - ours[0].min())


def test_pixel_boxes_clips_drops_and_filters():
    cfg = _cfg()
    boxes = np.array([
        [0.1, 0.1, 0.5, 0.5],      # fine
        [-0.2, 0.3, 0.4, 0.9],     # partly outside: clipped
        [0.5, 0.5, 0.5, 0.9],      # zero width: degenerate
        [0.9, 0.9, 0.1, 0.1],      # inverted: degenerate
        [np.nan, 0, 1, 1],         # not finite: degenerate
        [0.0, 0.0, 1.0, 1.0],      # area 1 > 0.8: filtered, not bad
        [0.1, 0.1, 0.15, 0.15],    # area 0.0025 < 0.02: filtered
        [1.5, 1.5, 2.0, 2.0],      # entirely outside: degenerate after clipping
    ])
    px, counts = tr.pixel_boxes(boxes, (200, 100), cfg)
    np.testing.assert_array_equal(px, [[20, 10, 100, 50], [0, 30, 80, 90]])
    assert counts == {"box_clipped": 1, "box_degenerate": 4}


def test_draw_geometry_is_seeded_and_consistent():
    cfg = _cfg(arbitrary_mask_prob=0.5)
    boxes = np.array([BOX, (10, 10, 50, 60)])
    kinds = set()
    for seed in range(30):
        g1 = tr.draw_geometry((W, H), boxes, np.random.default_rng(seed), cfg)
        g2 = tr.draw_geometry((W, H), boxes, np.random.default_rng(seed), cfg)
        assert g1.box == g2.box and g1.crop == g2.crop and g1.extended == g2.extended
        assert _inside(g1.box, g1.extended) and _inside(g1.extended, g1.crop)
        assert _inside(g1.box, g1.reference)
        kinds.add(g1.polygon is None)
    assert kinds == {True, False}  # both mask types occur


def test_pick_reduce_never_starves_the_crop():
    cfg = _cfg()
    cfg.resolution, cfg.reference_size = 512, 224
    big = tr.Geometry((4000, 3000), (1000, 1000, 2000, 2000), (900, 900, 2100, 2100),
                      (500, 0, 3500, 3000), (990, 990, 2010, 2010), None)
    assert tr.pick_reduce(big, cfg) == 4  # 3000 / 4 >= 512 and 1020 / 4 >= 224
    small = tr.Geometry((640, 480), (100, 100, 200, 200), (90, 90, 210, 210),
                        (0, 0, 480, 480), (90, 90, 210, 210), None)
    assert tr.pick_reduce(small, cfg) == 1
    cfg.decode_reduced = False
    assert tr.pick_reduce(big, cfg) == 1
