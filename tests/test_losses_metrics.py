import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualsearch.eval import image_to_text_ranks, retrieval_metrics, text_to_image_ranks
from dualsearch.model.heads import ProjectionHead
from dualsearch.model.losses import MAX_LOGIT_SCALE, clip_loss, seed_loss, siglip_loss


def _naive_seed(image, text, T):
    """The reference's formula, written out element by element."""
    B = len(image)
    logits = [[float(text[i] @ image[j]) / T for j in range(B)] for i in range(B)]
    sim = [[(float(text[i] @ text[j]) + float(image[i] @ image[j])) / (2 * T) for j in range(B)] for i in range(B)]
    targets = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in sim]

    def ce(t_row, logit_row):
        lse = math.log(sum(math.exp(v) for v in logit_row))
        return -sum(t * (logit - lse) for t, logit in zip(t_row, logit_row))

    col = lambda m, j: [m[i][j] for i in range(B)]  # noqa: E731
    total = 0.0
    for i in range(B):
        total += (ce(targets[i], logits[i]) + ce(col(targets, i), col(logits, i))) / 2
    return total / B


def test_seed_loss_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 4, generator=g) * 0.3, torch.randn(6, 4, generator=g) * 0.3
    got = float(seed_loss(image, text, 0.05))
    assert got == pytest.approx(_naive_seed(image.double(), text.double(), 0.05), rel=1e-4)


def test_clip_loss_matches_naive_and_clamps():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = (1 / 0.07) * i @ t.T
    naive = 0.0
    for k in range(5):
        naive += -torch.log_softmax(logits[k], 0)[k] - torch.log_softmax(logits[:, k], 0)[k]
    assert float(clip_loss(image, text, scale)) == pytest.approx(float(naive) / 10, rel=1e-5)
    big = clip_loss(image, text, torch.tensor(10.0))
    assert float(big) == pytest.approx(float(clip_loss(image, text, torch.tensor(MAX_LOGIT_SCALE))), rel=1e-6)


def test_siglip_loss_matches_naive():
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    s, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    naive = 0.0
    for x in range(4):
        for y in range(4):
            z = 1.0 if x == y else -1.0
            naive += -math.log(1 / (1 + math.exp(-z * (10.0 * float(i[x] @ t[y]) - 10.0))))
    assert float(siglip_loss(image, text, s, b)) == pytest.approx(naive / 4, rel=1e-5)


def test_losses_prefer_matching_pairs():
    x = F.normalize(torch.randn(8, 16), dim=-1)
    for loss in (lambda a, b: seed_loss(a, b, 0.05), lambda a, b: clip_loss(a, b, torch.tensor(3.0))):
        assert loss(x, x) < loss(x, x.roll(1, 0))


def test_projection_head_shape_and_structure():
    head = ProjectionHead(10, 6, layers=2, dropout=0.1)
    assert head(torch.randn(3, 10)).shape == (3, 6)
    assert isinstance(head.blocks[0]["norm"], torch.nn.LayerNorm) and len(head.blocks) == 2


def _naive_metrics(img, txt, owner, k):
    S = txt @ img.T
    t2i = np.array([1 + np.sum(S[m] > S[m, owner[m]]) for m in range(len(txt))])
    i2t = []
    for n in range(len(img)):
        own = np.where(owner == n)[0]
        best = S[own, n].max()
        i2t.append(1 + np.sum(S[:, n] > best))
    return t2i, np.array(i2t)


@pytest.mark.parametrize("block", [7, 1 << 24])
def test_recall_matches_naive_full_matrix(block):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    owner = np.repeat(np.arange(40), rng.integers(1, 4, size=40))
    txt = (img[owner] + rng.normal(scale=1.0, size=(len(owner), 8))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    t2i, i2t = _naive_metrics(img, txt, owner, 5)
    np.testing.assert_array_equal(text_to_image_ranks(img, txt, owner, block_elems=block), t2i)
    np.testing.assert_array_equal(image_to_text_ranks(img, txt, owner, block_elems=block), i2t)
    m = retrieval_metrics(img, txt, owner, k=5, block_elems=block)
    assert m.text_to_image["R@5"] == pytest.approx(100 * np.mean(t2i <= 5))
    assert m.image_to_text["R@1"] == pytest.approx(100 * np.mean(i2t <= 1))
    assert m.text_to_image["median_rank"] == np.median(t2i)
    first = [np.where(owner == n)[0][0] for n in range(40)]
    assert m.top_k_accuracy == {"k": 5, "value": pytest.approx(100 * np.mean(t2i[first] <= 5))}
    assert set(m.as_dict()) == {"text_to_image", "image_to_text", "top_k_accuracy", "images", "queries"}


def test_conse_prior_is_the_renormalised_top_t_mixture_of_class_embeddings():
    from dualsearch.model.prior import PriorHead

    torch.manual_seed(0)
    w, b, names = torch.randn(7, 5), torch.randn(7), torch.randn(7, 3)
    head = PriorHead(torch.nn.Identity(), w, b, names, top=2)
    feats = torch.randn(4, 5)
    got = head.prior(feats)
    p = torch.softmax(feats @ w.T + b, -1)
    for i in range(4):
        top = torch.topk(p[i], 2).indices
        want = (p[i, top, None] * F.normalize(names, dim=-1)[top]).sum(0) / p[i, top].sum()
        torch.testing.assert_close(got[i], want)
    # the head sees the features and the prior side by side
    torch.testing.assert_close(head(feats), torch.cat([feats, got], -1))


def test_fused_similarity_adds_the_zero_shot_similarity_with_its_weight():
    from dualsearch.model.prior import FusedTextHead, PriorHead, fused

    torch.manual_seed(1)
    a, b, za, zb = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 6), torch.randn(3, 6)
    for weight in (0.5, 1.0, 2.0):
        fa, fb = fused(a, za, weight), fused(b, zb, weight)
        torch.testing.assert_close(fa.norm(dim=-1), torch.ones(3))
        want = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
                + weight * F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T) / (1 + weight)
        torch.testing.assert_close(fa @ fb.T, want)
    text = FusedTextHead(ProjectionHead(6, 8), 1.0)
    assert text(torch.randn(2, 6)).shape == (2, 14)
    image = PriorHead(ProjectionHead(5 + 6, 8), torch.randn(4, 5), torch.randn(4), torch.randn(4, 6), 3, 1.0)
    assert image(torch.randn(2, 5)).shape == (2, 14)


@pytest.mark.parametrize("spec,want", [("none", (0, 0.0)), ("conse:20", (20, 0.0)), ("conse:5:0.5", (5, 0.5)),
                                       ("conse:1000:1", (1000, 1.0))])
def test_prior_specs(spec, want):
    from dualsearch.model.prior import parse_prior

    assert parse_prior(spec) == want


@pytest.mark.parametrize("spec", ["conse", "conse:0", "conse:1001", "conse:5:0", "conse:5:-1", "clip:3"])
def test_bad_prior_specs_are_one_line_errors(spec):
    from dualsearch.errors import DualsearchError
    from dualsearch.model.prior import parse_prior

    with pytest.raises(DualsearchError, match="bad image prior"):
        parse_prior(spec)


def test_multi_positive_clip_loss():
    """owner = arange(B) is CLIP's loss; with several captions per image, text->image is the usual
    cross-entropy and image->text averages -log softmax over the image's own captions."""
    torch.manual_seed(0)
    img, txt, scale = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(math.log(10.0))
    assert torch.allclose(clip_loss(img, txt, scale, torch.arange(4)), clip_loss(img, txt, scale), atol=1e-6)
    bias = torch.tensor(-1.0)
    assert torch.allclose(siglip_loss(img, txt, scale, bias, torch.arange(4)), siglip_loss(img, txt, scale, bias))
    txt = torch.randn(7, 8)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    logits = 10.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    t2i = F.cross_entropy(logits.T, owner)
    lsm = F.log_softmax(logits, dim=-1)
    i2t = torch.stack([-lsm[i, owner == i].mean() for i in range(4)]).mean()
    assert torch.allclose(clip_loss(img, txt, scale, owner), (t2i + i2t) / 2, atol=1e-6)
    z = torch.tensor([[1.0 if owner[j] == i else -1.0 for j in range(7)] for i in range(4)])
    want = -F.logsigmoid(z * (logits - 1.0)).sum() / 4
    assert torch.allclose(siglip_loss(img, txt, scale, bias, owner), want, atol=1e-5)
    # the image's other captions are no longer negatives: captions of one image all close to it
    close = F.normalize(img, dim=-1)[owner] * 5 + 0.01 * torch.randn(7, 8)
    per_pair = F.cross_entropy(10.0 * F.normalize(img, dim=-1)[owner] @ F.normalize(close, dim=-1).T,
                               torch.arange(7))
    assert clip_loss(img, close, scale, owner) < per_pair  # duplicates as negatives cost the per-pair loss


def test_soft_target_and_hard_negative_variants_of_the_clip_loss():
    from dualsearch.model.losses import clip_variant_loss

    torch.manual_seed(1)
    img, txt, ls = torch.randn(6, 8), torch.randn(6, 8), torch.tensor(math.log(10.0))
    plain = clip_loss(img, txt, ls)
    assert torch.allclose(clip_variant_loss(img, txt, ls), plain, atol=1e-6)
    # HN-NCE at beta 0 weights every negative 1: InfoNCE
    assert torch.allclose(clip_variant_loss(img, txt, ls, hard_negatives=1e-12), plain, atol=1e-5)
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = 10.0 * i @ t.T
    soft = F.softmax(10.0 * (t @ t.T + i @ i.T) / 2, dim=-1)
    target = 0.7 * torch.eye(6) + 0.3 * soft
    want = (-(target * F.log_softmax(logits, -1)).sum(-1).mean()
            - (target * F.log_softmax(logits.T, -1)).sum(-1).mean()) / 2
    assert torch.allclose(clip_variant_loss(img, txt, ls, soft_targets=0.3), want, atol=1e-5)
    beta = 0.5
    w = torch.exp(beta * logits).fill_diagonal_(0)
    w = 5 * w / w.sum(-1, keepdim=True)
    den = torch.exp(logits.diagonal()) + (w * torch.exp(logits)).sum(-1)
    rows = (torch.log(den) - logits.diagonal()).mean()
    wt = torch.exp(beta * logits.T).fill_diagonal_(0)
    wt = 5 * wt / wt.sum(-1, keepdim=True)
    cols = (torch.log(torch.exp(logits.diagonal()) + (wt * torch.exp(logits.T)).sum(-1)) - logits.diagonal()).mean()
    assert torch.allclose(clip_variant_loss(img, txt, ls, hard_negatives=beta), (rows + cols) / 2, atol=1e-5)
    assert clip_variant_loss(img, txt, ls, hard_negatives=beta) > plain  # hard negatives weigh more
