"""Tiny random checkpoints and processors in the real HF format, made by transformers (the oracle)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402

CORPUS = ["How many red squares are there? Describe the image. Answer: 3 because the left cell is blue.",
          "What is the shape in the top row? The circle is larger than the triangle. Answer: B"] * 20

# name -> (model_type, vision/text/top-level overrides); all give 4 <image> tokens per tile
MODEL_CONFIGS = {
    "idefics3_gqa_untied_s2": ("idefics3", dict(image_size=32, patch_size=8),
                               dict(num_attention_heads=6, num_key_value_heads=2), dict(scale_factor=2)),
    "smolvlm_tied_s3": ("smolvlm", dict(image_size=48, patch_size=8),
                        dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
                        dict(scale_factor=3, tie_word_embeddings=True)),
    "smolvlm_gqa_untied_s2": ("smolvlm", dict(image_size=32, patch_size=8),
                              dict(num_attention_heads=6, num_key_value_heads=3), dict(scale_factor=2)),
}


def tile_size(name):
    return MODEL_CONFIGS[name][1]["image_size"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with the SmolVLM special tokens, saved through transformers' tokenizer class."""
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tok")
    hf = PreTrainedTokenizerFast(tokenizer_object=data.train_tokenizer(CORPUS, vocab_size=400),
                                 pad_token="<|im_end|>", eos_token="<end_of_utterance>")
    hf.save_pretrained(d)
    return d


def make_hf_processor(tokenizer_dir, tile, split=True, longest=None):
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    ip = Idefics3ImageProcessorPil(do_image_splitting=split, size={"longest_edge": longest or 3 * tile},
                                   max_image_size={"longest_edge": tile}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                             chat_template=data.SMOLVLM_CHAT_TEMPLATE)


def make_hf_model(name, vocab_size, image_token_id, seed=0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig, \
        SmolVLMForConditionalGeneration
    kind, vision, text, top = MODEL_CONFIGS[name]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **vision)
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                num_hidden_layers=3, rope_theta=100000.0, max_position_embeddings=4096, **text)
    if top.get("tie_word_embeddings"):
        text["tie_word_embeddings"] = True
    cfg_cls, model_cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if kind == "idefics3"
                          else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    torch.manual_seed(seed)
    cfg = cfg_cls(vision_config=vision, text_config=text, image_token_id=image_token_id, **top)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random weights with larger norms than the init, so mistakes show in logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """name -> (folder with config.json, model.safetensors and processor files, the HF model)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    out = {}
    for name in MODEL_CONFIGS:
        d = tmp_path_factory.mktemp(name)
        model = make_hf_model(name, tok.get_vocab_size(), tok.token_to_id("<image>"))
        model.save_pretrained(d)
        make_hf_processor(tokenizer_dir, tile_size(name)).save_pretrained(d)
        out[name] = (d, model)
    return out
