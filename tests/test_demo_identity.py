"""The demo's `scenes=identity` (objects of colour x shape x pattern), the out-of-style held-out
triplets and the identity score of the exemplar eval; the default 'palette' demo unchanged."""
from __future__ import annotations

import functools
import hashlib

import cv2
import numpy as np
import pytest

from pbe_jax.configs import load_config
from pbe_jax.data import synthetic as syn
from pbe_jax.configs.pbe import get_config
from pbe_jax.configs.validate import problems
from pbe_jax.evaluation import exemplar as ex
from pbe_jax.evals import identity as ident
from tests.train_utils import CONFIG_FILE


@pytest.fixture(scope="module")
def demo():
    return load_config(f"{CONFIG_FILE}:demo,scenes=identity")


def _digest(scene) -> str:
    d = hashlib.sha256()
    for field in ("image", "boxes", "colours", "owner"):
        d.update(np.ascontiguousarray(getattr(scene, field)).tobytes())
    return d.hexdigest()[:16]


# Scenes (seed, index) at the demo's sides 72..128 as two generators drew them: 'palette' as
# main's (before the identities, commit 61bee2a), and the identity scenes as the first
# identity runs trained on them (commit 2b86ad4, then called 'palette').
PALETTE_DIGESTS = {(0, 0): "41e6a0fa3f4bb6f7", (0, 1): "d09fd504331a0f63",
                   (0, 2): "a513c3062cad2bd8", (1000, 0): "f8f3b43e0aee6ea5",
                   (1000, 1): "c17d48325f1a9657", (1000, 2): "7c0a46635b5f64c8"}
IDENTITY_DIGESTS = {(0, 0): "6f388b2b116509ff", (0, 1): "2084f5eac8435531",
                    (0, 2): "a7d51fffdc25d0b4", (1000, 0): "46d248ef76844ef2",
                    (1000, 1): "4b5252d394f744c9", (1000, 2): "f49f33cceadb293c"}


@pytest.mark.parametrize("style,digests", [("palette", PALETTE_DIGESTS),
                                           ("identity", IDENTITY_DIGESTS)])
def test_scenes_are_the_same_pictures_as_before(style, digests):
    for (seed, index), want in digests.items():
        scene = syn.draw_scene(index, seed=seed, min_side=72, max_side=128, style=style)
        assert _digest(scene) == want, (style, seed, index)
        if style == "palette":  # solid objects: no shape or pattern labels
            assert (scene.shapes == -1).all() and (scene.patterns == -1).all()


def test_scenes_argument_picks_the_style_and_the_identity_evals(demo):
    palette = load_config(f"{CONFIG_FILE}:demo")
    assert palette.data.synthetic_style == "palette"
    assert not palette.exemplar_eval.identity and palette.exemplar_eval.offstyle_triplets == 0
    assert load_config(f"{CONFIG_FILE}:demo,scenes=palette").to_dict() == palette.to_dict()
    assert demo.data.synthetic_style == "identity"
    assert demo.exemplar_eval.identity and demo.exemplar_eval.offstyle_triplets == 32
    dino = load_config(f"{CONFIG_FILE}:demo,scenes=identity,conditioner=dinov2")
    assert dino.data.synthetic_style == "identity" and dino.exemplar_eval.identity
    with pytest.raises(ValueError, match="scenes='radial'"):
        get_config("demo,scenes=radial")
    with pytest.raises(ValueError, match="scenes= picks the demo's"):
        get_config("sd15,scenes=identity")
    wrong = load_config(f"{CONFIG_FILE}:demo")
    wrong.exemplar_eval.identity = True
    assert any("config.exemplar_eval.identity=True" in p and "scenes=identity" in p
               for p in problems(wrong))


def test_palette_triplets_keep_the_rgb_colour_score(demo):
    palette = load_config(f"{CONFIG_FILE}:demo")
    t = ex.heldout_triplets(palette.data, 8, seed=1000)
    assert not t.hue and (t.ref_identity[:, 1:] == -1).all()
    d = hashlib.sha256()  # the same triplets as main's eval built before the identities
    for a in (t.source, t.edit, t.keep, t.reference, t.region, t.ref_colour, t.src_colour):
        d.update(np.ascontiguousarray(a).tobytes())
    assert d.hexdigest()[:16] == "907dab6d2a2d5b3a"
    assert ex.heldout_triplets(demo.data, 8, seed=1000, style="identity").hue
    # red mixed 40% with the pattern grey: its hue stays red, its RGB is nearest pink. The two
    # rules read it differently, so the 'palette' demo keeps the RGB one (its old numbers).
    x = np.round(0.6 * syn.PALETTE[0] + 0.4 * syn.PATTERN_GREY).astype(np.uint8)[None, None, None]
    region = np.ones((1, 1, 1), bool)
    assert ex.painted_colours(x, region, hue=True)[0] == 0
    assert ex.painted_colours(x, region)[0] == syn.PALETTE_NAMES.index("pink")
    with pytest.raises(ValueError, match="style='radial'"):
        ex.heldout_triplets(demo.data, 8, style="radial")


def _scene(index, style, demo):
    return syn.draw_scene(index, seed=3, style=style, min_side=demo.data.synthetic_min_side,
                          max_side=demo.data.synthetic_max_side)


def test_identity_objects_are_colour_shape_and_pattern(demo):
    seen = set()
    for i in range(40):
        s = _scene(i, "identity", demo)
        assert len(s.shapes) == len(s.patterns) == len(s.colours) == len(s.boxes)
        for k in range(len(s.boxes)):
            c, shape, pattern = s.identity(k)
            assert 0 <= c < len(syn.PALETTE) and 0 <= shape < len(syn.PALETTE_SHAPES)
            assert 0 <= pattern < len(syn.PATTERNS)
            seen.add((shape, pattern))
            own = s.image[s.owner == k].astype(np.float32)  # [n, 3]
            chroma = own.max(axis=1) - own.min(axis=1)
            share = np.mean(chroma >= ex.CHROMA_MIN)  # the colour's part of the object
            if syn.PATTERNS[pattern] == "solid":
                assert share > 0.9
            else:  # the colour and the light grey both show
                assert 0.2 < share < 0.95, (i, k, syn.PATTERNS[pattern], share)
    assert len(seen) >= 15  # most of the 20 shape x pattern pairs in 40 scenes
    varied = syn.draw_scene(0, seed=3, min_side=64, max_side=96)
    assert (varied.shapes == -1).all() and (varied.patterns == -1).all()


def test_shapes_and_patterns_are_what_they_say():
    area = {name: syn.identity_mask(k, 40, 40).mean() for k, name in enumerate(syn.PALETTE_SHAPES)}
    assert area["rectangle"] == 1.0 and abs(area["ellipse"] - np.pi / 4) < 0.05
    assert abs(area["triangle"] - 0.5) < 0.06 and abs(area["diamond"] - 0.5) < 0.06
    tri, dia = syn.identity_mask(2, 40, 40), syn.identity_mask(3, 40, 40)
    assert tri[2].sum() < tri[-2].sum()  # points up
    assert dia[20].sum() > dia[2].sum() and dia[20].sum() > dia[-2].sum()
    share = {name: syn.pattern_mask(k, 50, 50).mean() for k, name in enumerate(syn.PATTERNS)}
    assert share["solid"] == 1.0
    assert abs(share["stripes"] - 0.6) < 0.02 and abs(share["checks"] - 5 / 9) < 0.02
    assert 0.6 < share["dots"] < 0.9 and 0.3 < share["rings"] < 0.8
    stripes = syn.pattern_mask(1, 50, 50)
    assert (stripes == stripes[:, :1]).all()  # horizontal bands
    with pytest.raises(ValueError, match="synthetic_style"):
        syn.draw_scene(0, style="gradient")


def test_radial_style_and_references_on_a_plain_backdrop(demo):
    s = _scene(0, "radial", demo)
    bg = s.image[s.owner < 0].astype(np.float32)
    assert (bg.max(axis=1) - bg.min(axis=1)).mean() < 30  # muted: the colour score still reads it
    ref = syn.draw_object(0, 1, 0, 32)  # a solid red ellipse
    assert ref.shape == (32, 32, 3) and ref.dtype == np.uint8
    assert ref[0].min() >= 215 and ref[-1].min() >= 215  # light plain border
    np.testing.assert_allclose(ref[16, 16], syn.PALETTE[0], atol=10)
    assert not np.array_equal(ref, syn.draw_object(0, 0, 0, 32))  # the shape shows


def test_offstyle_triplets(demo):
    t = ex.heldout_triplets(demo.data, 16, seed=1000, offstyle=True)
    n = len(t) // 2
    assert t.ref_identity.shape == (2 * n, 3)
    np.testing.assert_array_equal(t.ref_identity[:, 0], t.ref_colour)
    np.testing.assert_array_equal(t.ref_identity[:n], t.src_identity[:n])
    assert (t.ref_colour[n:] != t.src_colour[n:]).all()
    # most cross partners differ in every attribute
    assert np.mean((t.ref_identity[n:] != t.src_identity[n:]).all(axis=1)) > 0.7
    for e in t.edit:  # plain rectangular holes
        ys, xs = np.nonzero(e)
        assert e[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.9
    # references: the object large on a plain light backdrop
    assert (t.reference[:, 0].astype(np.int32).min(axis=-1) >= 215).all()
    # the copy scores: the colour score still reads these scenes
    copy = ex.score_edits(t.source, t)
    assert copy["self_following"] == 1.0 and copy["exemplar_following"] == 0.0
    held = ex.heldout_triplets(demo.data, 16, seed=1000, style="identity")
    assert not np.array_equal(held.source[:4], t.source[:4])


def test_hue_colour_score_survives_grey_mixing(triplets_small):
    t = triplets_small
    # the reference colour at 40% mixed with grey: the colour part of a blurred pattern edge
    out = t.source.astype(np.float32).copy()
    for i in range(len(t)):
        mixed = 0.6 * syn.PALETTE[t.ref_colour[i]] + 0.4 * syn.PATTERN_GREY
        out[i][t.region[i]] = mixed
    s = ex.score_edits(out.astype(np.uint8), t)
    assert s["exemplar_following"] == 1.0 and s["self_following"] == 1.0


@pytest.fixture(scope="module")
def triplets_small(demo):
    return ex.heldout_triplets(demo.data, 16, seed=1000, style="identity")


def test_object_crops(triplets_small):
    t = triplets_small
    crops = ident.object_crops(t.source, t.region)
    assert crops.shape == (len(t), ident.CROP, ident.CROP, 3) and crops.max() <= 1.0
    np.testing.assert_allclose(ident.object_crops(t.source / 255.0, t.region), crops, atol=1e-5)
    with pytest.raises(ValueError, match="region 0 is empty"):
        ident.object_crops(t.source[:1], np.zeros_like(t.region[:1]))


def _paint_identity(t, identities):
    """The sources with each hole filled with a plain mid grey (nothing of the masked object
    left) and the object `identities` [N, 3] drawn in its region's box (at 4x and reduced, as
    the scenes' objects are)."""
    out = t.source.astype(np.float32).copy()
    out[t.edit] = 128.0
    for i, (c, s, p) in enumerate(identities):
        ys, xs = np.nonzero(t.region[i])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        big = cv2.resize(out[i, y0:y1, x0:x1], ((x1 - x0) * 4, (y1 - y0) * 4),
                         interpolation=cv2.INTER_NEAREST)
        syn._paint_object(big, syn.identity_mask(s, *big.shape[:2]), c, p,
                          np.random.default_rng(i))
        out[i, y0:y1, x0:x1] = cv2.resize(big, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_identity_classifier_is_accurate_and_scores_copies_and_perfect_edits(demo):
    clf = ident.fit_identity_classifier(functools.partial(ex.identity_renders, demo.data),
                                        seed=int(demo.exemplar_eval.identity_seed))
    assert clf.accuracy["identity"] >= 0.95, clf.accuracy
    for offstyle in (False, True):
        t = ex.heldout_triplets(demo.data, 32, seed=1000, offstyle=offstyle, style="identity")
        copy = ex.score_edits(t.source, t, clf)  # the masked object put back
        assert copy["exemplar_identity"] <= 0.05 and copy["self_identity"] >= 0.85, copy
        perfect = ex.score_edits(_paint_identity(t, t.ref_identity), t, clf)
        assert perfect["exemplar_identity"] >= 0.8, (offstyle, perfect)
        # a sparse object (a checked diamond: ~1/4 of its box coloured) can fall under the colour
        # score's MIN_OBJECT_SHARE and count as no object painted (1 of these 32)
        assert perfect["exemplar_following"] >= 0.95
        # the same objects with the wrong shape (next one): the identity score drops to ~0,
        # the colour score stays
        wrong = t.ref_identity.copy()
        wrong[:, 1] = (wrong[:, 1] + 1) % len(syn.PALETTE_SHAPES)
        bad = ex.score_edits(_paint_identity(t, wrong), t, clf)
        assert bad["exemplar_identity"] <= 0.2 and bad["exemplar_following"] >= 0.95, bad
