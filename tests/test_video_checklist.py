"""The checklist judge on a tiny random LLaVA (transformers), saved and loaded back: P(yes) per question, weighted."""

import pytest
import torch

from mmtts.core import MmttsError
from mmtts.verifiers.video import ChecklistJudge, PerDepth, frame_image

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "is", "there", "a", "digit", "moving", "right", "yes", "no", "?"]


def tiny_llava(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=["<image>"], padding_side="left")
    images = CLIPImageProcessor(size={"height": 16, "width": 16}, do_center_crop=False,
                                crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), LlavaProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("llava"))


def clips(n=3):
    return torch.rand(n, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_score_is_the_weighted_p_yes_of_each_question(vlm):
    model, processor = vlm
    q1, q2 = "is there a digit ?", "is there a digit moving right ?"
    v = clips()
    # P(yes) by hand: the next-token logits after the prompt, softmax over the yes and no tokens
    images = [frame_image(c, "grid") for c in v]
    inputs = processor(images=images, text=[f"<image> {q1}"] * 3, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, [WORDS.index("yes"), WORDS.index("no")]]
    by_hand = logits.softmax(-1)[:, 0].double()
    one = ChecklistJudge(model, processor, [q1], template="<image> {question}")(v)
    assert torch.allclose(one, by_hand, atol=1e-6) and bool(((one > 0) & (one < 1)).all())
    two = ChecklistJudge(model, processor, [q2], template="<image> {question}")(v)
    both = ChecklistJudge(model, processor, [(q1, 1.0), (q2, 3.0)], template="<image> {question}", batch_size=2)(v)
    assert torch.allclose(both, (one + 3 * two) / 4, atol=1e-6)
    assert images[0].shape == (8, 32, 3)  # four 8x8 frames side by side, grey to RGB


def test_views_and_depths(vlm):
    model, processor = vlm
    v = clips(2)
    first = ChecklistJudge(model, processor, ["is there a digit ?"], template="<image> {question}", view="first")
    assert torch.allclose(first(v), first(v[:, :, :1]))  # the first frame is all it sees
    staged = PerDepth({1: first, 3: ChecklistJudge(model, processor, ["is there a digit moving right ?"],
                                                   template="<image> {question}")})
    assert torch.equal(staged(v[:, :, :2]), first(v[:, :, :2]))


def test_bad_settings_are_refused(vlm):
    model, processor = vlm
    with pytest.raises(MmttsError, match="not one token"):
        ChecklistJudge(model, processor, ["is there a digit ?"], yes="maybe")
    with pytest.raises(MmttsError, match="question"):
        ChecklistJudge(model, processor, ["is there a digit ?"], template="<image>")
    with pytest.raises(MmttsError, match="non-empty"):
        ChecklistJudge(model, processor, [])
    with pytest.raises(MmttsError, match="view"):
        ChecklistJudge(model, processor, ["a"], view="all")
