"""The model against transformers on tiny random checkpoints in the real HF format."""
import json

import pytest
import torch

import data
import files
from conftest import MODEL_CONFIGS, make_hf_processor, tile_size
from model import VLM, CheckpointError
from test_processor import IMAGES

TEXTS = ["User:<image>How many circles?<end_of_utterance>\nAssistant:",
         "User:<image>Compare<image>these two.<end_of_utterance>\nAssistant: The left",
         "User: no image in this one, and it is longer than the others.<end_of_utterance>\nAssistant:",
         "<image>"]
IMAGE_LISTS = [[IMAGES[0]], [IMAGES[1], IMAGES[3]], [], [IMAGES[4]]]


def batch(ckpt_dir, split=True, padding_side="right", texts=TEXTS, images=IMAGE_LISTS):
    proc = data.Processor.from_pretrained(ckpt_dir)
    proc.image_processor.split = split
    return proc(texts, images, padding_side=padding_side)


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@pytest.mark.parametrize("split", [True, False])
def test_logits_match_transformers(checkpoints, name, split):
    path, hf = checkpoints[name]
    ours = VLM.from_pretrained(path).eval()
    assert ours.config.tie_word_embeddings == bool(MODEL_CONFIGS[name][3].get("tie_word_embeddings"))
    b = batch(path, split)
    assert b["pixel_values"].shape[1] > (1 if not split else 4)  # several tiles: the split path is exercised
    with torch.no_grad():
        want = hf(**b).logits
        got = ours(**b).logits
    diff = max_diff(got, want, b["attention_mask"])
    print(f"{name} split={split}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["idefics3_gqa_untied_s2"])
def test_left_padding_with_position_ids(checkpoints, name):
    path, hf = checkpoints[name]
    ours = VLM.from_pretrained(path).eval()
    b = batch(path, padding_side="left")
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(**b, position_ids=pos).logits
        got = ours(**b, position_ids=pos).logits
    assert max_diff(got, want, b["attention_mask"]) <= 1e-4


def test_save_then_transformers_loads(checkpoints, tmp_path):
    from transformers import AutoModelForImageTextToText
    for name, (path, _) in checkpoints.items():
        ours = VLM.from_pretrained(path).eval()
        ours.save_pretrained(tmp_path / name)
        hf = AutoModelForImageTextToText.from_pretrained(tmp_path / name).eval()
        assert type(hf).__name__.lower().startswith(MODEL_CONFIGS[name][0])
        b = batch(path)
        with torch.no_grad():
            assert max_diff(ours(**b).logits, hf(**b).logits, b["attention_mask"]) <= 1e-4
        again = VLM.from_pretrained(tmp_path / name)  # and our own loader reads it back
        assert all(torch.equal(a, b)
                   for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_sharded_checkpoint_and_bf16(checkpoints, tmp_path):
    path, hf = checkpoints["idefics3_gqa_untied_s2"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = VLM.from_pretrained(tmp_path)
    ref = VLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert VLM.from_pretrained(path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_config_variants():
    """rope_theta at either place, derived head_dim, missing num_attention_heads, tying at either level."""
    from model import VLMConfig
    base = {"model_type": "smolvlm", "scale_factor": 3, "vision_config": {"hidden_size": 32},
            "text_config": {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                            "num_hidden_layers": 1}}
    c = VLMConfig.from_hf({**base,
                           "text_config": {**base["text_config"], "rope_parameters": {"rope_theta": 7.0}}})
    assert (c.text.rope_theta, c.text.num_attention_heads, c.text.head_dim,
            c.text.num_key_value_heads) == (7.0, 32, 2, 32)
    c = VLMConfig.from_hf({**base,
                           "text_config": {**base["text_config"], "rope_theta": 5.0,
                                           "num_attention_heads": 4,
                                                   "tie_word_embeddings": True}})
    assert (c.text.rope_theta, c.text.head_dim, c.tie_word_embeddings) == (5.0, 16, True)
    assert VLMConfig.from_hf({**base, "tie_word_embeddings": True}).tie_word_embeddings
    with pytest.raises(CheckpointError, match="model_type 'llava'"):
        VLMConfig.from_hf({**base, "model_type": "llava"})


def test_bad_checkpoints_name_the_keys(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    sd = load_file(path / "model.safetensors")
    sd.pop("model.text_model.norm.weight")
    sd["model.text_model.extra.weight"] = torch.zeros(1)
    sd["lm_head.weight"] = sd["lm_head.weight"][:-1]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        VLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing: model.text_model.norm.weight" in msg
    assert "unexpected: model.text_model.extra.weight" in msg
    assert "shape mismatch: lm_head.weight" in msg
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        VLM.from_pretrained(tmp_path)


def test_bad_files_name_the_file_and_key(checkpoints, tmp_path):
    """A config without a text key, one without text_config, a truncated safetensors file, an index
    without weight_map or with a missing shard: each error names the file (and the key)."""
    import shutil
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    shutil.copytree(path, tmp_path / "c")
    d = tmp_path / "c"
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["vocab_size"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"c/config.json: text_config has no 'vocab_size'"):
        VLM.from_pretrained(d)
    del config["text_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"c/config.json: no text_config"):
        VLM.from_pretrained(d)
    shutil.copy(path / "config.json", d / "config.json")
    blob = (path / "model.safetensors").read_bytes()
    for cut in (len(blob) // 2, 6):  # cut in the tensors, cut in the header
        (d / "model.safetensors").write_bytes(blob[:cut])
        with pytest.raises(CheckpointError, match=r"c/model.safetensors: not a readable safetensors file"):
            VLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors.index.json: the index has no 'weight_map'"):
        VLM.from_pretrained(d)
    index = {"weight_map": {"lm_head.weight": "shard-1.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"c/shard-1.safetensors: not found"):
        VLM.from_pretrained(d)


def test_sampling_follows_temperature_and_top_p():
    """Frequencies of 40,000 seeded draws against the definition: p = softmax(logits / T), then the
    smallest set of most likely tokens whose mass reaches top_p, renormalised. Greedy at T = 0."""
    from model import sample
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.2])
    n = 40000
    for T, top_p in ((1.0, 1.0), (0.5, 1.0), (1.5, 0.8), (1.0, 0.5), (2.0, 0.95)):
        p = torch.softmax(logits.double() / T, -1)
        keep, mass = [], 0.0
        for i in p.argsort(descending=True).tolist():
            keep.append(i)
            mass += float(p[i])
            if mass >= top_p:
                break
        want = torch.zeros_like(p)
        want[keep] = p[keep] / p[keep].sum()
        draws = sample(logits.expand(n, -1).clone(), T, top_p, torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=len(logits)).double() / n
        assert (freq[want == 0] == 0).all(), (T, top_p, freq)
        bound = 4 * (want * (1 - want) / n).sqrt() + 1e-9
        assert ((freq - want).abs() <= bound).all(), (T, top_p, freq, want)
    assert (sample(logits.expand(3, -1), 0.0) == 0).all()


def test_image_token_count_mismatch(checkpoints):
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    ours = VLM.from_pretrained(path)
    b = batch(path, texts=[TEXTS[0]], images=[IMAGE_LISTS[0]])
    b["input_ids"][0, b["input_ids"][0].tolist().index(ours.config.image_token_id)] = 5
    with pytest.raises(ValueError, match="<image> tokens but the images give"):
        ours(**b)


# --- generation


def prompts(path, texts, images):
    return batch(path, texts=texts, images=images, padding_side="left")


@pytest.mark.parametrize("name", ["idefics3_gqa_untied_s2", "smolvlm_tied_s3"])
def test_greedy_matches_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    ours = VLM.from_pretrained(path).eval()
    for i in range(2):
        b = prompts(path, [TEXTS[i]], [IMAGE_LISTS[i]])
        want = hf.generate(**b, max_new_tokens=12, do_sample=False,
                           eos_token_id=None)[:, b["input_ids"].shape[1]:]
        got = ours.generate(**b, max_new_tokens=12)
        assert torch.equal(got, want)


def test_cached_equals_uncached_and_batched_equals_single(checkpoints):
    path, _ = checkpoints["smolvlm_gqa_untied_s2"]
    ours = VLM.from_pretrained(path).eval()
    b = prompts(path, TEXTS[:3], IMAGE_LISTS[:3])
    cached = ours.generate(**b, max_new_tokens=10)
    assert torch.equal(cached, ours.generate(**b, max_new_tokens=10, use_cache=False))
    for i in range(3):
        single = ours.generate(**prompts(path, [TEXTS[i]], [IMAGE_LISTS[i]]), max_new_tokens=10)
        assert torch.equal(single[0], cached[i])


def test_samples_of_a_prompt_share_its_prefill(checkpoints):
    """num_samples = 3 gives what the prompts repeated 3 times give: greedy, and sampled with one seed
    (with and without the cache), while the vision tower sees each prompt's images once."""
    path, _ = checkpoints["smolvlm_gqa_untied_s2"]
    ours = VLM.from_pretrained(path).eval()
    b = prompts(path, TEXTS[:2], IMAGE_LISTS[:2])
    repeated = {k: v.repeat_interleave(3, 0) for k, v in b.items()}
    images, prefill = [], []
    ours.vision.register_forward_hook(lambda m, args, out: images.append(args[0].shape[0]))
    ours.layers[0].register_forward_hook(lambda m, args, out: prefill.append(args[0].shape[:2]))
    assert torch.equal(ours.generate(**b, max_new_tokens=8, num_samples=3),
                       ours.generate(**repeated, max_new_tokens=8))
    assert images[0] * 3 == images[1]
    T = b["input_ids"].shape[1]  # the prompt's first pass: 2 rows, not 6
    assert [s for s in prefill if s[1] == T] == [torch.Size([2, T]), torch.Size([6, T])]
    for cache in (True, False):
        draw = lambda batch, n: ours.generate(**batch, max_new_tokens=8, temperature=1.0, use_cache=cache,
                                              generator=torch.Generator().manual_seed(0), num_samples=n)
        shared = draw(b, 3)
        assert torch.equal(shared, draw(repeated, 1)) and not torch.equal(shared[0], shared[1])


def test_generation_stops_at_eos(checkpoints):
    """A row that samples an eos keeps its tokens up to it and is eos after it; the other row goes on as
    without the eos; generation stops once every row has ended. Sampling: the same seed gives the same
    tokens with and without the KV cache, and a vanishing top-p is greedy."""
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    ours = VLM.from_pretrained(path).eval()
    b = prompts(path, TEXTS[:2], IMAGE_LISTS[:2])
    free = ours.generate(**b, max_new_tokens=8)
    eos = int(free[0, 2])  # make the third greedy token of sample 0 the eos
    got = ours.generate(**b, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got[0, :3], free[0, :3]) and (got[0, 2:] == eos).all()
    first_eos_1 = (free[1] == eos).nonzero()
    n1 = int(first_eos_1[0]) + 1 if len(first_eos_1) else 8
    assert torch.equal(got[1, :n1], free[1, :n1]) and (got[1, n1:] == eos).all()
    # ends row 1 by step 4
    eos_1 = next(int(t) for t in free[1, :4].flip(0) if int(t) not in free[0, :3].tolist())
    both = ours.generate(**b, max_new_tokens=8, eos_token_id=[eos, eos_1])
    n = 1 + max(int((torch.isin(free[i], torch.tensor([eos, eos_1]))).nonzero()[0]) for i in range(2))
    assert both.shape == (2, n) and n <= 4
    for row in range(2):
        k = int(torch.isin(free[row], torch.tensor([eos, eos_1])).nonzero()[0]) + 1
        assert torch.equal(both[row, :k], free[row, :k])
        assert torch.isin(both[row, k:], torch.tensor([eos])).all()
    sample = lambda **kw: ours.generate(**b, max_new_tokens=6, temperature=1.0,
                                        generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(sample(top_p=0.9), sample(top_p=0.9, use_cache=False))
    assert torch.equal(sample(top_p=1e-9), free[:, :6])


def test_attention_masses_match_materialised_attention(checkpoints):
    """The model hands post-RoPE q, k to attention_mass: the image-token mass per layer equals
    transformers' eager attention probabilities (output_attentions=True) summed over image keys."""
    import mass_kernel
    from transformers import AutoModelForImageTextToText
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    ours = VLM.from_pretrained(path).eval()
    hf = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    b = batch(path, texts=TEXTS[:2], images=IMAGE_LISTS[:2])
    ids, mask = b["input_ids"], b["attention_mask"]
    is_image = (ids == ours.config.image_token_id) & mask.bool()
    q_pos = torch.arange(ids.shape[1]).expand_as(ids)
    layers = (0, 2)
    with torch.no_grad():
        out = ours(**b, mass_layers=layers, mass_fn=lambda i, q, k: mass_kernel.attention_mass(
            q, k, q_pos, is_image.to(torch.uint8), 1, impl="reference"))
        attn = hf(**b, output_attentions=True).attentions
    for i in layers:
        want = (attn[i] * is_image[:, None, None, :]).sum(-1)  # (B, H, T)
        got = out.masses[i][..., 0]
        assert got.shape == want.shape
        assert (got - want).abs()[mask.bool()[:, None].expand_as(got)].max() < 1e-5


def test_attention_masses_refuse_left_padding(checkpoints):
    """Every route but the fused one sees keys by position, so a padding key before a real token would
    dilute the masses: asked for masses, a left-padded batch is an error (a plain forward is not)."""
    import mass_kernel
    path, _ = checkpoints["idefics3_gqa_untied_s2"]
    model = VLM.from_pretrained(path).eval()
    b = batch(path, texts=TEXTS[:2], images=IMAGE_LISTS[:2], padding_side="left")
    assert not b["attention_mask"].all()
    q_pos = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])
    groups = (b["input_ids"] == model.config.image_token_id).to(torch.uint8)
    hook = lambda i, q, k: mass_kernel.attention_mass(q, k, q_pos, groups, 1, impl="reference")
    with torch.no_grad():
        model(**b)
        with pytest.raises(ValueError, match="attention masses need right padding"):
            model(**b, mass_layers=[0], mass_fn=hook)


@pytest.mark.parametrize("name", ["idefics3_gqa_untied_s2", "smolvlm_tied_s3"])
def test_train_flops_match_counted_flops(checkpoints, name):
    """The MFU numerator against torch's FlopCounterMode counting every matmul and convolution of
    a real forward and backward (math SDPA, so attention shows as matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    path, _ = checkpoints[name]
    model = VLM.from_pretrained(path)
    b = batch(path, texts=[TEXTS[1]] * 2, images=[IMAGE_LISTS[1]] * 2)  # equal lengths: no padding
    assert b["attention_mask"].all()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(**b).logits.float().square().mean().backward()
    counted, estimated = counter.get_total_flops(), model.train_flops(b["input_ids"], b["attention_mask"])
    assert estimated == pytest.approx(counted, rel=1e-9)


def test_read_json_names_the_file_and_raises_the_callers_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: not found"):
        files.read_json(tmp_path / "nope.json", data.DataError)
    (tmp_path / "bad.json").write_text("{bad")
    with pytest.raises(data.DataError, match="bad.json: not valid JSON"):
        files.read_json(tmp_path / "bad.json", data.DataError)
    with pytest.raises(CheckpointError, match="bad.json: not valid JSON"):
        files.read_json(tmp_path / "bad.json", CheckpointError)
