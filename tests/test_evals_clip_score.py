"""Region CLIP score against a direct PyTorch computation of the official formula
(`eval_tool/clip_score/{test_bench_dataset,region_clip_score}.py`) with a tiny random
transformers CLIPVisionModelWithProjection, saved and loaded with ours."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pbe_jax.evals.clip_score import (
    compute_clip_score,
    official_crop_box,
    region_clip_batches,
    region_clip_inputs,
)
from pbe_jax.evals.features import clip_extractor
from pbe_jax.models.clip import CLIPVisionModelWithProjection
from tests.helpers import save_tiny_clip

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
BOXES = [(10, 70, 20, 90), (0, 96, 0, 112), (33, 41, 50, 97)]  # (top, bottom, left, right) incl.


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip_b32_tiny"))
    tm = save_tiny_clip(d, image_size=224, patch_size=32, projection_dim=16)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :112]
    results, masks, refs = [], [], []
    for i, (t, b, l, r) in enumerate(BOXES):
        smooth = np.stack([np.sin(yy / (5.0 + i)), np.cos(xx / 7.0), np.sin((xx - yy) / 11.0)], -1)
        results.append(np.clip(128 + 90 * smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8))
        mask = np.zeros((96, 112), np.uint8)
        mask[t:b + 1, l:r + 1] = 255
        masks.append(mask)
        size = [(50, 70), (224, 224), (300, 260)][i]
        refs.append(Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
    return dict(tm=tm, dir=d, results=results, masks=masks, refs=refs)


def _official_torch(tm, result, mask, ref_pil):
    """The official dataset item + score, written against torch (T.Resize on a tensor in
    torchvision 0.12 = F.interpolate bilinear, align_corners=False, no antialias)."""
    result_tensor = (torch.from_numpy(result).permute(2, 0, 1).float() / 255 - MEAN) / STD
    ref = np.array(ref_pil.resize((224, 224)).convert("RGB"))
    ref_tensor = (torch.from_numpy(ref).permute(2, 0, 1).float() / 255 - MEAN) / STD
    idx0 = np.nonzero(mask.ravel() == 255)[0]
    idxs = [idx0.min(), idx0.max()]
    out = np.column_stack(np.unravel_index(idxs, mask.shape))
    crop = result_tensor[:, out[0][0]:out[1][0], out[0][1]:out[1][1]]
    crop = F.interpolate(crop[None], size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        result_feat = tm(pixel_values=crop).image_embeds
        ref_feat = tm(pixel_values=ref_tensor[None]).image_embeds
    emb = result_feat.numpy()[0]
    result_feat = result_feat / result_feat.norm(dim=-1, keepdim=True)
    ref_feat = ref_feat / ref_feat.norm(dim=-1, keepdim=True)
    return (100.0 * result_feat @ ref_feat.T).item(), emb


def test_region_clip_score_matches_official_torch_formula(setup, tmp_path):
    ref_scores, ref_embeds = zip(*(_official_torch(setup["tm"], r, m, p)
                                   for r, m, p in zip(setup["results"], setup["masks"], setup["refs"])))
    ref_scores = np.array(ref_scores)
    assert ref_scores.std() > 1.0, f"degenerate random CLIP: scores {ref_scores}"
    model = CLIPVisionModelWithProjection.from_pretrained(setup["dir"])
    extract = clip_extractor(model, batch_size=4)
    pairs = [region_clip_inputs(r, m, p) for r, m, p in zip(setup["results"], setup["masks"], setup["refs"])]
    regions, refs = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    emb = extract(regions)
    ref_embeds = np.stack(ref_embeds)
    assert np.abs(emb - ref_embeds).max() <= 1e-4 * max(1.0, np.abs(ref_embeds).max())
    batches = [(regions[:2], refs[:2]), (regions[2:], refs[2:])]  # the last batch is padded
    mean, scores = compute_clip_score(batches, extract, progress=False)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3)
    np.testing.assert_allclose(mean, ref_scores.mean(), atol=1e-3)

    # The same from files on disk.
    paths = {"res": [], "mask": [], "ref": []}
    for i, (r, m, p) in enumerate(zip(setup["results"], setup["masks"], setup["refs"])):
        for kind, img in (("res", Image.fromarray(r)), ("mask", Image.fromarray(m)), ("ref", p)):
            paths[kind].append(str(tmp_path / f"{i:012d}_{kind}.png"))
            img.save(paths[kind][-1])
    file_batches = region_clip_batches(paths["res"], paths["mask"], paths["ref"], batch_size=2)
    assert len(file_batches) == 2
    _, file_scores = compute_clip_score(file_batches, extract, progress=False)
    np.testing.assert_allclose(file_scores, scores, rtol=1e-6)


def test_official_crop_box_and_its_errors():
    mask = np.zeros((20, 30), np.uint8)
    mask[4:9, 6:17] = 255  # rows 4..8, cols 6..16
    assert official_crop_box(mask) == (4, 8, 6, 16)  # end exclusive: last row/col dropped, as upstream
    with pytest.raises(ValueError, match="no white"):
        official_crop_box(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        region_clip_inputs(np.zeros((10, 10, 3), np.uint8), mask, Image.new("RGB", (8, 8)))
