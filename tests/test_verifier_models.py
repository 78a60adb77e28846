"""Classifier and CLIP verifiers on small models built here (no downloads)."""

import pytest
import torch
from torch import nn

import mmtts
from mmtts.core import MmttsError
from mmtts.verifiers import CLIPScore, ClassifierLogProb, MeanRank


def test_classifier_log_prob_matches_log_softmax_and_takes_context_labels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(6, 3, 8, 8)
    v = ClassifierLogProb(model, target=2, input_size=(4, 4))
    small = nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    expected = model(small).log_softmax(1)[:, 2]
    assert torch.allclose(v(x).float(), expected.detach(), atol=1e-6)
    per = ClassifierLogProb(model, input_size=(4, 4))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    got = per(x, {"label": labels})
    assert torch.allclose(got.float(), model(small).log_softmax(1).gather(1, labels[:, None])[:, 0].detach(),
                          atol=1e-6)
    with pytest.raises(MmttsError, match="needs a target class"):
        per(x)
    with pytest.raises(MmttsError, match=r"\(B, C, H, W\)"):
        v(torch.rand(6, 8, 8))


def test_classifier_verifier_accepts_a_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=3)
    v = ClassifierLogProb(model, target=1, input_size=(32, 32))
    s = v(torch.rand(3, 3, 20, 20))
    assert s.shape == (3,) and (s <= 0).all()


def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32,
                                                         head_width=16),
                           text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    return model, open_clip.get_tokenizer("ViT-B-32")


def test_clip_score_is_the_scaled_cosine_of_open_clip_embeddings():
    model, tok = tiny_clip()
    v = CLIPScore(model, tok, prompt="a bold digit")
    x = torch.rand(3, 3, 24, 24)
    s = v(x)
    imgs = nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    imgs = (imgs - v.mean) / v.std
    with torch.no_grad():
        ie = nn.functional.normalize(model.encode_image(imgs), dim=-1)
        te = nn.functional.normalize(model.encode_text(tok(["a bold digit"])[:, :16]), dim=-1)
    assert torch.allclose(s.float(), (100 * ie @ te.T)[:, 0], atol=1e-4)
    # grey images and per-candidate prompts from the context
    per = CLIPScore(model, tok)
    g = per(torch.rand(2, 1, 24, 24), {"prompt": ["a", "b"]})
    assert g.shape == (2,) and (g.abs() <= 100).all()
    with pytest.raises(MmttsError, match="needs a prompt"):
        per(torch.rand(2, 3, 24, 24))
    with pytest.raises(mmtts.core.MissingWeightsError, match="local open_clip checkpoint"):
        CLIPScore.from_pretrained("ViT-B-32", "/nonexistent/clip.bin")


def test_mean_rank_ensemble_of_real_verifiers():
    model, tok = tiny_clip()
    cls = ClassifierLogProb(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), target=0, input_size=(32, 32))
    ens = MeanRank([CLIPScore(model, tok, prompt="x"), cls])
    s = ens(torch.rand(5, 3, 32, 32))
    assert s.shape == (5,) and float(s.min()) >= 0 and float(s.max()) <= 1
    assert {"classifier", "clip"} <= set(mmtts.list_verifiers())


def test_clip_takes_uint8_pixels_and_refuses_other_scales_and_transformers_models():
    model, tok = tiny_clip()
    v = CLIPScore(model, tok, prompt="a bold digit")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(v(pixels), v(pixels.float() / 255.0))
    with pytest.raises(MmttsError, match="divide 0-255 pixels by 255"):
        v(pixels.float())
    with pytest.raises(MmttsError, match="dtype torch.int64"):
        v(pixels.long())
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2},
                                  vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                                  projection_dim=8)
    with pytest.raises(MmttsError, match="a transformers CLIPModel.*open_clip"):
        CLIPScore(transformers.CLIPModel(cfg), tok)
