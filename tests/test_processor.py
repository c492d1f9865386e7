"""The processor against transformers' Idefics3Processor with its PIL image processor."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
from conftest import make_hf_processor


def photo(w, h, mode="RGB", seed=0):
    """A real-looking image: a gradient, noise and a few shapes, so resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    im = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        draw.ellipse([x0, y0, x0 + w // 4, y0 + h // 4], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8)))
    elif mode != "RGB":
        im = im.convert(mode)
    return im


IMAGES = [photo(50, 40), photo(200, 70, seed=1), photo(31, 97, seed=2), photo(80, 80, "RGBA", seed=3),
          photo(120, 45, "L", seed=4), photo(20, 20, seed=5), photo(300, 300, "P", seed=6),
          photo(32, 32, seed=7)]


@pytest.mark.parametrize("split", [True, False])
def test_matches_transformers(tokenizer_dir, tmp_path, split):
    hf = make_hf_processor(tokenizer_dir, tile=32, split=split)
    hf.save_pretrained(tmp_path)
    ours = data.Processor.from_pretrained(tmp_path)
    # a batch whose samples hold different numbers of images, and a text-only sample
    texts = ["<image>Describe.", "A<image>B<image>C", "no image here", "<image><image><image>x"]
    images = [[IMAGES[0]], [IMAGES[1], IMAGES[2]], [], [IMAGES[3], IMAGES[4], IMAGES[5]]]
    for t, ims in [(texts, images), (["<image>q", "<image><image>"], [[IMAGES[6]], [IMAGES[7], IMAGES[1]]])]:
        want = hf(text=t, images=ims, padding=True, return_tensors="pt")
        got = ours(t, ims)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
        assert got["pixel_values"].shape == want["pixel_values"].shape
        assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-6
        assert torch.equal(got["pixel_attention_mask"], want["pixel_attention_mask"].long())


def test_single_images_each_size(tokenizer_dir, tmp_path):
    """Every image alone (sizes smaller and larger than the tile, every mode), splitting on."""
    hf = make_hf_processor(tokenizer_dir, tile=32, split=True, longest=128)
    hf.save_pretrained(tmp_path)
    ours = data.Processor.from_pretrained(tmp_path)
    for im in IMAGES:
        want = hf(text=["User:<image>hi"], images=[[im]], return_tensors="pt")
        got = ours(["User:<image>hi"], [[im]])
        assert torch.equal(got["input_ids"], want["input_ids"]), im.size
        assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-6, (im.size, im.mode)


def test_chat_template_and_decode(tokenizer_dir, tmp_path):
    hf = make_hf_processor(tokenizer_dir, tile=32)
    hf.save_pretrained(tmp_path)
    ours = data.Processor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Three."}]},
                {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            hf.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours.apply_chat_template(messages[:1]) == \
        "<|im_start|>User:<image>How many?<end_of_utterance>\nAssistant:"
    ids = ours("How many red squares?")["input_ids"][0]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "How many red squares?"


def test_legacy_layout(tokenizer_dir, tmp_path):
    """Older SmolVLM repos: preprocessor_config.json and chat_template.json beside processor_config.json."""
    import json, shutil
    hf = make_hf_processor(tokenizer_dir, tile=32)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, tmp_path / f)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_image_splitting": True, "size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
         "resample": 1, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": data.SMOLVLM_CHAT_TEMPLATE}))
    ours = data.Processor.from_pretrained(tmp_path)
    want = hf(text=["<image>x"], images=[[IMAGES[1]]], return_tensors="pt")
    got = ours(["<image>x"], [[IMAGES[1]]])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-6
    assert ours.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "q"}]}]) == \
        "<|im_start|>User: q<end_of_utterance>\nAssistant:"


def test_bad_input(tokenizer_dir, tmp_path):
    hf = make_hf_processor(tokenizer_dir, tile=32)
    hf.save_pretrained(tmp_path)
    ours = data.Processor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        ours(["<image>x"], [[IMAGES[0], IMAGES[1]]])
    with pytest.raises(ValueError, match="no images were given"):
        ours(["<image>x"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ours(["<image>x"], [[str(bad)]])
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize("split,size,hot", [
    (True, (128, 96), (0, 48, 64, 96)),     # resized to 64 x 64, four 32-px tiles + the global image
    (True, (20, 20), (10, 0, 20, 10)),      # smaller than a tile: one canvas, the image in its corner
    (False, (96, 64), (48, 32, 96, 64)),    # no splitting: the global image alone
])
def test_image_token_boxes_follow_the_pixels(split, size, hot):
    """Each image token's box in the original image, checked against the pixels the processor
    actually puts in that token's cell (tiles, then the global image; 2 x 2 cells per tile,
    pixel-shuffle order checked on model.pixel_shuffle): one hot region, aligned to the cells."""
    import model
    ip = data.ImageProcessor({"do_image_splitting": split, "size": {"longest_edge": 64},
                              "max_image_size": {"longest_edge": 32}, "resample": 0})
    proc = data.new_processor(["a red circle"] * 10, tile=32, image_seq_len=4, vocab_size=300)
    proc.image_processor = ip
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste((255, 255, 255), hot)
    tiles, rows, cols = ip.tiles(im)
    boxes = proc.image_token_boxes(*size)
    assert len(boxes) == proc.image_prompt(rows, cols).count(data.SPECIAL["image"]) == 4 * len(tiles)
    # token k of a tile is the k-th 2 x 2 block of its 4 x 4 patches, row-major (pixel shuffle, s = 2)
    patch_ids = torch.arange(16.0).view(1, 16, 1)
    blocks = model.pixel_shuffle(patch_ids, 2)[0]  # (4, 4): the patches of each token
    assert blocks[1].tolist() == [2, 3, 6, 7] and blocks[2].tolist() == [8, 9, 12, 13]
    inside = lambda b: hot[0] <= b[0] and b[2] <= hot[2] and hot[1] <= b[1] and b[3] <= hot[3]
    apart = lambda b: b[2] <= hot[0] or hot[2] <= b[0] or b[3] <= hot[1] or hot[3] <= b[1]
    for k, box in enumerate(boxes):
        tile = np.asarray(tiles[k // 4].convert("L"), dtype=np.float32) / 255
        i, j = divmod(k % 4, 2)
        cell = np.pad(tile,
                      ((0, 32 - tile.shape[0]),
                       (0, 32 - tile.shape[1])))[16 * i:16 * i + 16, 16 * j:16 * j + 16]
        assert inside(box) or apart(box)
        assert (cell.mean() > 0.99) if inside(box) else (cell.mean() < 0.01), (k, box)
