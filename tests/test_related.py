"""The related methods: AVAR's L_img and L_sys against transformers' eager attention (float64), DRIFT's
three biases by hand with its static Delta and its errors, the test-time intervention against the
softmax with log f added to the image scores, and the difficulty filter's band and cache."""
import json
import math
import os
import re

import pytest
import torch

import data
import eval as eval_mod
import mass_kernel
import nanoattcot
import objective
import train as trainer
from methods import avar, difficulty, drift
from model import VLM, CheckpointError, small_config
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(out, **kw):
    base = dict(out=str(out), n_train=64, n_eval=6, batch_size=8, max_steps=4, warmup=1, save_every=0,
                log_every=100, device="cpu", objective="sft")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("r") / "run")
    return cfg, trainer.train(cfg)


def batch_of(result, n=3):
    return data.collate(data.encode_all(result["proc"], result["train_records"][:n]),
                        result["proc"].pad_token_id)


def test_system_span_is_the_scaffolding_before_the_users_content(run):
    proc = run[1]["proc"]
    ex = data.encode_record(proc, run[1]["train_records"][0])
    system = proc.tokenizer.decode(ex["input_ids"][ex["spans"] == data.S].tolist(),
                                   skip_special_tokens=False)
    assert system.replace(" ", "") == "<|im_start|>User:"
    first_user = int((ex["spans"] == data.P).nonzero()[0])
    assert (ex["spans"][:first_user] == data.S).all()


def test_avar_terms_match_eager_attention_float64(run):
    """L_img and L_sys per layer and head from a materialised softmax (transformers, eager, float64):
    the mean over (user-turn query, image key) pairs, causally masked pairs counted as 0."""
    from transformers import AutoModelForImageTextToText
    cfg, result = run
    batch = batch_of(result)
    layers = [0, 1, 3]
    hf = AutoModelForImageTextToText.from_pretrained(os.path.join(cfg.out, "model"),
                                                     attn_implementation="eager",
                                                     dtype=torch.float64).eval()
    with torch.no_grad():
        att = hf(**{k: batch[k]
                    for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")},
                 output_attentions=True).attentions
    want = {"img": [], "sys": []}
    for b, spans in enumerate(batch["spans"]):
        rows = (spans == data.P) | (spans == data.V)
        for name, keys, sign in (("img", spans == data.V, -1), ("sys", spans == data.S, 1)):
            per = [torch.log(att[l][b, h][rows][:, keys].mean() + 1e-6) for l in layers
                   for h in range(att[l].shape[1])]
            want[name].append(sign * torch.stack(per).mean())
    model = result["model"].double()
    try:
        terms = objective.loss_terms(model,
                                      {k: v.double() if v.is_floating_point() else v
                                       for k, v in batch.items()},
                                      TrainConfig(objective="avar", mass_impl="reference", avar_img=0.5,
                                                  avar_sys=0.25), layers)
    finally:
        result["model"].float()
    counts = objective.step_counts([batch])
    assert float(counts["img_count"]) == float(counts["sys_count"]) == 3
    assert (terms["img"].count, terms["img"].weight, terms["sys"].count, terms["sys"].weight) == \
        ("img_count", 0.5, "sys_count", 0.25)
    assert abs(float(terms["img"].sum) - float(sum(want["img"]))) < 5e-8  # an fp32 sum is 2e-7 off
    assert abs(float(terms["sys"].sum) - float(sum(want["sys"]))) < 5e-8
    loss = objective.total_loss(terms, counts)
    ce = terms["ce"].sum / (batch["labels"][:, 1:] != -100).sum()
    assert abs(float(loss - ce) - float(0.5 * sum(want["img"]) / 3 + 0.25 * sum(want["sys"]) / 3)) < 5e-8


def test_avar_without_masses_is_an_error():
    spans = torch.tensor([[data.S, data.V, data.P, data.R]])
    with pytest.raises(RuntimeError, match=r"no attention masses came back for layers \[1\]"):
        avar.avar_terms({0: torch.zeros(1, 1, 2, 2)}, [0, 1], torch.tensor([[data.V, data.P]]), spans)


@pytest.mark.parametrize("mode,want", [("absolute", [1.0, 0.0]), ("gradnorm", [5.0, 0.0]),
                                       ("adaptive_cosine", [4.0, 0.0])])
def test_drift_bias_by_hand(mode, want):
    """g = (3, 4), Delta = (1, 0): |g| = 5, cos = 3/5, so adaptive_cosine = (1 + 0.6) / 2 * 5 = 4
    along Delta."""
    got = drift.drift_bias(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), mode)
    assert torch.allclose(got, torch.tensor(want))
    # opposite to Delta's side: cos = -0.6, adaptive_cosine shrinks to 0.2 * 5 = 1
    g = torch.tensor([-3.0, 4.0])
    assert torch.allclose(drift.drift_bias(g, torch.tensor([2.0, 0.0]), "adaptive_cosine"),
                          torch.tensor([1.0, 0.0]))


def test_drift_delta_is_static_and_biases_the_gradients(run, tmp_path):
    cfg, result = run
    model = VLM.from_pretrained(os.path.join(cfg.out, "model"), dtype=torch.float32)
    prior = VLM.from_pretrained(os.path.join(cfg.out, "model"), dtype=torch.float32)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    prior.save_pretrained(tmp_path / "prior")
    lines = []
    plain = drift.Drift(model, str(tmp_path / "prior"), "absolute", alpha=0.5, rescale=False,
                          log=lines.append)
    scaled = drift.Drift(model, str(tmp_path / "prior"), "absolute", alpha=0.5, log=lambda *a: None)
    theirs, ours = dict(prior.named_parameters()), dict(model.named_parameters())
    n_layers = len(model.layers)
    assert len(plain.delta) == 7 * n_layers
    assert f"biasing the gradients of {7 * n_layers} tensors" in lines[0]
    assert not any(n.startswith(("vision.", "connector.", "embed_tokens", "lm_head")) for n in plain.delta)
    name = "layers.1.self_attn.q_proj.weight"
    start = theirs[name].detach() - ours[name].detach()
    assert torch.allclose(plain.delta[name], start)
    assert torch.allclose(scaled.delta[name].norm(), ours[name].norm()) and torch.allclose(
        scaled.delta[name] / scaled.delta[name].norm(), start / start.norm(), atol=1e-6)
    with torch.no_grad():  # the weights move (a training step): Delta stays what it was at the start
        ours[name].add_(1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ratio = plain.apply(model)
    assert torch.allclose(ours[name].grad, 1 - 0.5 * start)
    assert (ours["vision.post_layernorm.weight"].grad == 1).all()
    biased = [ours[n] for n in plain.delta]  # |0.5 Delta| over |g| = |ones| on the biased tensors
    want = 0.5 * sum(float(d.double().pow(2).sum())
                     for d in plain.delta.values()) ** 0.5 / sum(p.numel() for p in biased) ** 0.5
    assert ratio == pytest.approx(want, rel=1e-6)


def test_drift_errors_name_the_problem(run, tmp_path, monkeypatch):
    cfg, result = run
    model = result["model"]
    with pytest.raises(CheckpointError, match="no language-model projection to bias"):
        # a naming mismatch: nothing would be hooked
        monkeypatch.setattr(drift, "DRIFT_MODULES", ("qkv_proj",))
        drift.Drift(model, os.path.join(cfg.out, "model"))
    monkeypatch.undo()
    small = VLM(model.config.__class__(**{**model.config.__dict__, "text": model.config.text.__class__(
        **{**model.config.text.__dict__, "intermediate_size": 64})}))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError,
                       match=r"layers.0.gate_proj.weight is \(64, 128\), the model's is \(512, 128\)"):
        drift.Drift(model, str(tmp_path / "small"))


def test_intervention_is_the_softmax_with_log_f_on_the_image_keys(run):
    """Boosting layer 1 by f: layer 0 is untouched; layer 1's attention output is softmax(s + log f [image
    key]) V computed by hand, and its masses are the unboosted ones f-reweighted (mass_kernel.boosted)."""
    cfg, result = run
    model, batch = result["model"].double(), batch_of(result)
    pixels = batch["pixel_values"].double()
    seen = {}

    def grab(tag):
        def mass_fn(layer, q, k):
            seen[tag, layer] = (q, k)
            q_pos = torch.arange(q.shape[2]).expand(q.shape[0], -1)
            return mass_kernel.attention_mass(q, k, q_pos, groups, 1, impl="reference")
        return mass_fn
    groups = (batch["spans"] == data.V).to(torch.uint8)
    captured = {}
    keep = lambda module, args, out: captured.update(x=args[0], out=out[0])
    hook = model.layers[1].self_attn.register_forward_hook(keep)
    try:
        with torch.no_grad():
            plain = model(batch["input_ids"], pixels, batch["pixel_attention_mask"], batch["attention_mask"],
                          mass_layers=[0, 1], mass_fn=grab("plain"))
            model.boost_image_attention(3.0, [1])
            boosted = model(batch["input_ids"], pixels, batch["pixel_attention_mask"],
                            batch["attention_mask"],
                            mass_layers=[0, 1], mass_fn=grab("boost"))
            att, (q, k) = model.layers[1].self_attn, seen["boost", 1]
            B, T = batch["input_ids"].shape
            rep = att.n_head // att.n_kv
            v = att.v_proj(captured["x"]).view(B, T, att.n_kv,
                                               att.hd).transpose(1, 2).repeat_interleave(rep, 1)
            scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(att.hd)
            scores = scores + math.log(3.0) * (batch["spans"] == data.V)[:, None, None, :]
            causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
            visible = causal & batch["attention_mask"].bool()[:, None, None, :]
            p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            want = att.o_proj((p @ v).transpose(1, 2).reshape(B, T, -1))
    finally:
        model.boost_image_attention(1.0)
        hook.remove()
        result["model"].float()
    assert torch.equal(plain.masses[0], boosted.masses[0])
    assert torch.equal(plain.masses[1], boosted.masses[1])
    real = batch["attention_mask"].bool()
    assert (captured["out"] - want)[real].abs().max() < 1e-8  # float64 (SDPA on CPU: ~1e-9)
    image_mass = (p * (batch["spans"] == data.V)[:, None, None, :]).sum(-1)  # (B, H, T)
    got = mass_kernel.boosted(torch.stack([boosted.masses[1][..., 0], 1 - boosted.masses[1][..., 0]], -1),
                              3.0)[..., 0]
    assert (got - image_mass)[real[:, None, :].expand_as(got)].abs().max() < 1e-7


def test_boosted_masses_by_hand():
    m = torch.tensor([0.2, 0.3])  # image, rationale: f = 2 gives the image 0.4 of 1.2
    assert torch.allclose(mass_kernel.boosted(m, 2.0), torch.tensor([0.4 / 1.2, 0.3 / 1.2]))
    assert mass_kernel.boosted(m, 1.0) is m


def test_boosted_generation_with_cache_equals_without(run):
    """The image keys follow the KV cache and the rows that leave the batch."""
    cfg, result = run
    model, proc = result["model"], result["proc"]
    recs = result["train_records"][:3]
    prompts = [data.record_prompt(proc, r) for r in recs]
    batch = proc(prompts, [[data.load_image(p) for p in r["images"]] for r in recs], padding_side="left")
    model.boost_image_attention(4.0)
    try:
        a = model.generate(**batch, max_new_tokens=12, eos_token_id=proc.eos_token_id)
        b = model.generate(**batch, max_new_tokens=12, eos_token_id=proc.eos_token_id, use_cache=False)
    finally:
        model.boost_image_attention(1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        model.boost_image_attention(2.0, [9])  # no such layer
    with pytest.raises(ValueError):
        model.boost_image_attention(0.0)


def test_difficulty_filter_band_and_cache(tmp_path, monkeypatch):
    """The band, and the cache keyed by content: the same weights and records read it back; another k,
    retrained weights or an edited record sample again."""
    records = [{"source": f"f:{i}", "type": "count" if i % 2 else "cell", "answer": "1"} for i in range(8)]
    rates = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.25, 1.0]
    calls = []

    def stub(model, proc, recs, k, *args, **kw):
        calls.append(k)
        return rates
    monkeypatch.setattr(difficulty, "success_rates", stub)
    lines, model = [], torch.nn.Linear(2, 2)
    kept = difficulty.difficulty_filter(model, None, records, (0.25, 0.75), 4, str(tmp_path),
                                        log=lines.append)
    assert [r["source"] for r in kept] == ["f:1", "f:2", "f:3", "f:5", "f:6"] and calls == [4]
    assert lines[-1] == ("difficulty: kept 5 of 8 (rate in [0.25, 0.75]); success rate bands: 0 1, "
                         "0.25-0.75 5, 1 2; "
                         "kept per type: cell 2/4, count 3/4")
    again = difficulty.difficulty_filter(model, None, records, (0.5, 1.0), 4, str(tmp_path), log=lines.append)
    assert calls == [4]
    assert [r["source"] for r in again] == ["f:2", "f:3", "f:4", "f:5", "f:7"]  # from the cache
    moved = [{**r, "source": f"g:{i}"} for i, r in enumerate(records)]  # the same records in another file
    difficulty.difficulty_filter(model, None, moved, (0.5, 1.0), 4, str(tmp_path), log=lines.append)
    assert calls == [4]
    difficulty.difficulty_filter(model, None, records, (0.5, 1.0), 2, str(tmp_path), log=lines.append)
    assert calls == [4, 2]  # another k is another measurement
    edited = records[:3] + [{**records[3], "answer": "2"}] + records[4:]
    difficulty.difficulty_filter(model, None, edited, (0.5, 1.0), 4, str(tmp_path), log=lines.append)
    assert calls == [4, 2, 4]
    with torch.no_grad():
        model.weight.add_(1e-3)  # retrained, same folder
    difficulty.difficulty_filter(model, None, records, (0.5, 1.0), 4, str(tmp_path), log=lines.append)
    assert calls == [4, 2, 4, 4]


def test_success_rates_count_sampled_answers(monkeypatch):
    """k samples per record, each scored like the eval: here the stub answers record i right on its
    first i samples."""
    records = [{"source": f"f:{i}", "question": "q", "answer": "2", "images": []} for i in range(3)]

    def fake_generate(model, proc, recs, *args, temperature=0.0, **kw):
        assert temperature == 1.0 and len(recs) == 9
        return ["Answer: 2" if j % 3 < i else "Answer: 5" for i in range(3) for j in range(3)]
    monkeypatch.setattr(difficulty, "generate_answers", fake_generate)
    model = torch.nn.Linear(1, 1)
    assert difficulty.success_rates(model, None, records, 3) == [0.0, 1 / 3, 2 / 3]


def test_compare_list_avar_and_intervention_rows(tmp_path, capsys):
    """--compare sft,avar with --visual-attn-scale: one report, a row per objective and per factor."""
    out = tmp_path / "cmp"
    nanoattcot.main(["--compare", "sft,avar", "--from-scratch", "--out", str(out), "--n-train", "48",
                     "--n-eval", "4", "--max-steps", "2",
                     "--batch-size", "8", "--save-every", "0", "--device", "cpu", "--visual-attn-scale", "4",
                     "--visual-attn-layers", "2:"])
    report = json.load(open(out / "report.json"))
    assert list(report["results"]) == ["sft", "sft img x4", "avar", "avar img x4"]
    rows = [json.loads(l) for l in open(out / "avar" / "metrics.jsonl")]
    assert all("img" in r and "sys" in r for r in rows)
    r = report["results"]
    for name in ("sft", "avar"):  # the boost in layers 2-3 raises their image mass, leaves layers 0-1 alone
        plain, boosted = (r[n]["where_it_looks"]["gold"]["image_mass_by_layer"]
                          for n in (name, f"{name} img x4"))
        assert plain[:2] == pytest.approx(boosted[:2], abs=1e-6)
        assert all(b > p for p, b in zip(plain[2:], boosted[2:]))
    with pytest.raises(SystemExit, match="'dpo' is not one of sft, attcot, avar"):
        nanoattcot.main(["--compare", "sft,dpo", "--out", str(tmp_path / "x"), "--device", "cpu"])


def test_text_only_set_carries_the_grid_in_words(tmp_path):
    from setting import synthetic
    synthetic.make_synthetic(str(tmp_path), n_train=6, n_eval=3)
    train, text = ([json.loads(l) for l in open(p)]
                   for p in (tmp_path / "train.jsonl", tmp_path / "train_text.jsonl"))
    assert len(train) == len(text) and all("image" not in t and "boxes" not in t for t in text)
    for im, tx in zip(train, text):
        assert tx["question"].endswith(im["question"]) and tx["answer"] == im["answer"]
        # a count or compare rationale walks every cell: untagged, the grid in words
        if im["type"] != "cell":
            walk = re.sub(r" \((?:circle|square|triangle) \d+\)", "", im["rationale"].split(" So ")[0])
            assert tx["question"] == f"The grid: {walk} {im['question']}"


def test_drift_is_wired_before_clipping_and_matches_across_accumulation_and_ranks(run, tmp_path):
    """From scratch with the prior's tokenizer and the same seed: the first step's summed gradients
    (as clipping gets them) equal the unbiased ones (alpha 0) minus the adaptive_cosine bias toward
    prior - initial weights; 2 gloo processes x 2 micro-batches give the same biased gradients."""
    from test_train import COMMON, run_dumping_grads
    prior = os.path.join(run[0].out, "model")
    flags = [*COMMON, "--objective", "sft", "--drift-prior", prior]
    plain = run_dumping_grads(tmp_path, "a0", ["--batch-size", "8", *flags, "--drift-alpha", "0"])
    one = run_dumping_grads(tmp_path, "a1", ["--batch-size", "8", *flags])
    two = run_dumping_grads(tmp_path, "ddp", ["--batch-size", "2", "--grad-accum", "2", *flags],
                            launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", "29534"))
    for a, b in zip(one[1], two[1]):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-9
    proc = data.Processor.from_pretrained(prior)
    torch.manual_seed(0)  # the run's initial weights
    start = VLM(small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id))
    bias = drift.Drift(start, prior, log=lambda *a: None)
    biased = 0
    for (name, _), g0, g1 in zip(start.named_parameters(), plain[1], one[1]):
        want = g0 - drift.drift_bias(g0, bias.delta[name],
                                       "adaptive_cosine") if name in bias.delta else g0
        assert torch.allclose(g1, want, rtol=1e-4, atol=1e-7), name
        biased += name in bias.delta and not torch.allclose(g0, g1)
    assert biased == len(bias.delta) == 28


def _difficulty_on_rank(rank, cache_dir, port):
    """One of two gloo processes: the difficulty filter with a stub sampler that leaves a file per call."""
    import time
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def stub(model, proc, recs, k, *args, **kw):
        open(os.path.join(cache_dir, f"sampled-on-rank-{rank}"), "w").close()
        time.sleep(1.0)  # rank 1 reaches the cache check while rank 0 is still sampling
        return [0.5] * len(recs)
    difficulty.success_rates = stub
    torch.manual_seed(0)
    records = [{"source": f"f:{i}", "type": "count", "answer": "1"} for i in range(4)]
    kept = difficulty.difficulty_filter(torch.nn.Linear(2, 2), None, records, (0.25, 0.75), 2, cache_dir,
                                     log=lambda l: None)
    assert len(kept) == 4
    dist.destroy_process_group()


def test_difficulty_filter_under_ddp_samples_on_rank_0_only(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_difficulty_on_rank, args=(str(tmp_path), 29547), nprocs=2)
    made = sorted(os.listdir(tmp_path))
    assert [f for f in made if f.startswith("sampled")] == ["sampled-on-rank-0"]
    assert len([f for f in made if f.startswith("difficulty-") and f.endswith(".json")]) == 1
