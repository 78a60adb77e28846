"""A small vision-language model that answers GUI grounding prompts in text: a transformers LLaVA built here.

The model is :class:`transformers.LlavaForConditionalGeneration`: a CLIP
vision tower over the screenshot resized to a square, a two-layer projector
and a Llama decoder, all sized by a config dict (:data:`VLM_CONFIG`) and
initialised at random; :mod:`mmtts.modalities.gui.vlm_train` trains it on
the project's rendered screens. It writes its click as text, token by
token, in thousandths of the screenshot: ``(x,y)``, one token per digit,
as Qwen-VL style models do, so greedy decoding picks digits one at a time
and sampling draws whole answers from the model's own distribution.

The tokenizer is a word-level one built here with the ``tokenizers``
library: the words the renderer's instructions use, single digits and
punctuation, and the special tokens LLaVA needs. The processor is the real
:class:`transformers.LlavaProcessor`, so the model, its processor and
:class:`~mmtts.modalities.gui.sampler.TransformersSampler` go through
``save_pretrained`` / ``from_pretrained`` like any checkpoint.
"""

from __future__ import annotations

import re

import torch

from ...core.errors import MmttsError
from .render import ICON_COLORS, ICON_SHAPES, ORDINALS, WORDS

#: the prompt the model is trained on (``{instruction}`` filled in); answers follow the colon
PROMPT = "<image>{instruction}:"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
#: the words of the renderer's instruction templates besides labels, colours, shapes and ordinals
TEMPLATE_WORDS = ("click", "the", "in", "side", "menu", "file", "list", "button", "at", "bottom", "icon", "toolbar",
                  "item", "of", "window", "last", "close", "minimize", "maximize")
SYMBOLS = tuple("0123456789(),:'[]")
#: the model trained for the benchmark; ``image_size`` is the square side the screenshot is resized to
VLM_CONFIG = {"arch": "llava-clip-llama", "image_size": 96, "patch_size": 12, "vision_hidden": 96, "vision_layers": 2,
              "text_hidden": 128, "text_layers": 3, "heads": 4, "screens": 1500, "per_screen": 8, "steps": 3000,
              "batch": 32, "lr": 2e-3, "seed": 0}
#: a version trained in seconds, for tests
QUICK_VLM_CONFIG = {**VLM_CONFIG, "image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1, "text_hidden": 32,
                    "text_layers": 1, "heads": 2, "screens": 12, "per_screen": 4, "steps": 300, "batch": 8,
                    "lr": 1e-2}
#: the same model trained to answer with the target element's box "[x1,y1,x2,y2]" in thousandths
BOX_VLM_CONFIG = {**VLM_CONFIG, "answer": "box"}
#: its quick version (twice the steps of the quick click model: a box is twice as many digits)
QUICK_BOX_VLM_CONFIG = {**QUICK_VLM_CONFIG, "answer": "box", "steps": 600}
#: answer formats: a click "(x,y)" or a box "[x1,y1,x2,y2]"; a config without "answer" answers with points
ANSWERS = ("point", "box")
#: the longest answer of each format with its end token: "(999,999)" is 9 tokens, "[999,999,999,999]" 17
MAX_NEW_TOKENS = {"point": 12, "box": 20}


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens, digits and punctuation, then every word the instructions use."""
    words = list(SPECIAL) + list(SYMBOLS)
    for w in (*TEMPLATE_WORDS, *WORDS, *ICON_COLORS, *ICON_SHAPES, *ORDINALS):
        if w not in words:
            words.append(w)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """A word-level fast tokenizer: words split on spaces, digits and punctuation one token each."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[0-9(),:'\[\]]"), "isolated")])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"],
                                   padding_side="left")


def build_processor(config: dict):
    """The LLaVA processor of ``config``: the screenshot resized (not cropped) to a square, CLIP-normalised."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = int(config["image_size"])
    images = CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False,
                                crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=config["patch_size"],
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def answer_format(config: dict) -> str:
    """The answer format of ``config``: ``"point"`` (the default) or ``"box"``."""
    answer = config.get("answer", "point")
    if answer not in ANSWERS:
        raise MmttsError(f"the VLM config's answer must be one of {ANSWERS}, got {answer!r}")
    return answer


def build_config(config: dict):
    """The :class:`transformers.LlavaConfig` of ``config`` (vision tower, projector and decoder sizes)."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    heads, side, patch = int(config["heads"]), int(config["image_size"]), int(config["patch_size"])
    if side % patch:
        raise MmttsError(f"image_size={side} must be a multiple of patch_size={patch}")
    vision = CLIPVisionConfig(hidden_size=config["vision_hidden"], intermediate_size=2 * config["vision_hidden"],
                              num_hidden_layers=config["vision_layers"], num_attention_heads=heads,
                              image_size=side, patch_size=patch)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=config["text_hidden"],
                       intermediate_size=2 * config["text_hidden"], num_hidden_layers=config["text_layers"],
                       num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=(side // patch) ** 2 + 64, pad_token_id=vocab["<pad>"],
                       bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], tie_word_embeddings=True)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    return cfg, GenerationConfig(bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                                 max_new_tokens=MAX_NEW_TOKENS[answer_format(config)])


def build_vlm(config: dict, state: dict[str, torch.Tensor] | None = None):
    """(model, processor) of ``config``: random weights (seeded by ``config["seed"]``) or ``state`` loaded."""
    from transformers import LlavaForConditionalGeneration

    cfg, gen = build_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config = gen
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise MmttsError(f"the VLM's weights do not match its config: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}; train it again for this config")
        model.tie_weights()
    return model.eval(), build_processor(config)


def image_tokens(config: dict) -> int:
    """How many ``<image>`` tokens one screenshot becomes in the prompt."""
    return (int(config["image_size"]) // int(config["patch_size"])) ** 2


def answer_text(x: int, y: int) -> str:
    """The answer the model is trained to write for a click at (x, y) thousandths."""
    return f"({int(x)},{int(y)})"


def box_text(x1: int, y1: int, x2: int, y2: int) -> str:
    """The answer the box model is trained to write for an element whose box is (x1, y1, x2, y2) thousandths."""
    return f"[{int(x1)},{int(y1)},{int(x2)},{int(y2)}]"


def prompt_text(instruction: str) -> str:
    """The prompt for ``instruction`` (lower-cased words of the renderer stay as they are)."""
    return PROMPT.format(instruction=re.sub(r"\s+", " ", str(instruction)).strip())
