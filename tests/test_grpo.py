"""GRPO: the advantage, clipping and k3 on numbers worked by hand; the completion mask with eos == pad
and truncation; the region-to-cell mapping on a hand-built tiled image; the AVAR and SAYO rewards
against transformers' eager attention (float64); one step moves log-probs the way the rewards say;
resume equals an uninterrupted run."""
import math
import os

import pytest
import torch
from PIL import Image

import data
import train as trainer
from methods import grpo
from methods.grpo import GRPOConfig
from records import read_records


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A briefly trained small model: the checkpoint GRPO starts from."""
    out = tmp_path_factory.mktemp("g") / "sft"
    trainer.train(trainer.TrainConfig(out=str(out), n_train=64, n_eval=4, batch_size=8, max_steps=4,
                                            warmup=1,
                                            save_every=0, log_every=100, device="cpu", objective="sft"))
    return str(out / "model")


def config(start, out, **kw):
    base = dict(init=start, out=str(out), n_train=64, n_eval=4, prompts_per_step=2, num_generations=4,
                max_new_tokens=12, max_steps=2, lr=1e-4, device="cpu", save_every=0, log_every=100)
    return GRPOConfig(**{**base, **kw})


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased: 0.577
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]) / torch.tensor([[std + 1e-4], [1e-4]])
    assert torch.allclose(grpo.advantages(r), want)
    assert torch.allclose(grpo.advantages(r, std_scale=False),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]))


def test_clipped_loss_and_k3_by_hand():
    """ratio 1.5 and 0.5 against A = +1 and -1, eps 0.2 / 0.28: -min(ratio A, clip(ratio) A)."""
    cfg = GRPOConfig(beta=0.5)
    # the sampling policy and the reference differ
    old, ref = torch.full((4, 1), -1.0), torch.full((4, 1), -2.0)
    logp = old + torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    per, (kl, clipped) = grpo.policy_loss(logp, old, ref, adv, torch.ones(4, 1), cfg)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1  # against the reference model, not the old policy
    assert torch.allclose(per[:, 0], torch.tensor([-1.28, 1.5, -0.5, 0.8]) + 0.5 * k3[:, 0])
    d = -1 - math.log(1.5)  # ref - logp in row 0
    assert abs(float(k3[0, 0]) - (math.exp(d) - d - 1)) < 1e-6 and int(clipped) == 2  # rows 0 and 3
    assert torch.allclose(kl, k3.sum())
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    per = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    assert float(grpo.aggregate(per, mask, 3, 2, "token")) == pytest.approx(9 / 3)
    assert float(grpo.aggregate(per, mask, 3, 2, "seq")) == pytest.approx((2 + 5) / 2)


def test_completion_mask_with_eos_as_pad_and_truncation():
    ids = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])  # eos = pad = 2
    mask, truncated = grpo.completion_mask(ids, 2)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]
    assert truncated.tolist() == [False, False, True]


def test_region_lights_exactly_its_cells_in_a_tiled_image(tmp_path):
    """96 x 64 with 32-px tiles: 3 x 2 tiles of 2 x 2 cells (16 px), then the global image (cells
    48 x 32). A box inside tile (row 1, col 1) across its top two cells lights those and the global
    cells it crosses."""
    proc = data.new_processor(["a question and an answer"] * 4, tile=32, image_seq_len=4, vocab_size=300,
                              split=True)
    Image.new("RGB", (96, 64)).save(tmp_path / "im.png")
    rec = {"images": [str(tmp_path / "im.png")], "boxes": [[40, 36, 56, 44]], "source": "t:1",
           "question": "q?"}
    ids = proc(data.record_prompt(proc, rec), [[str(tmp_path / "im.png")]])["input_ids"][0]
    lit = grpo.region_tokens(proc, rec, ids, Image.open(tmp_path / "im.png"))
    image_positions = (ids == proc.image_token_id).nonzero()[:, 0]
    assert len(image_positions) == 7 * 4
    assert [i for i, p in enumerate(image_positions)
            if lit[p]] == [4 * 4 + 0, 4 * 4 + 1, 6 * 4 + 2, 6 * 4 + 3]
    assert int(lit.sum()) == 4 and grpo.region_tokens(proc, {**rec, "boxes": []}, ids, None) is None


def test_top_entropy_tokens_ignore_padding():
    m_region = torch.tensor([[0.2, 0.1, 0.4, 0.9]])
    m_image = torch.tensor([[0.4, 0.4, 0.4, 0.9]])
    entropy = torch.tensor([[1.0, 3.0, 2.0, 9.0]])           # the padding has the highest entropy
    mask = torch.tensor([[True, True, True, False]])
    got = grpo.sayo_reward(m_region, m_image, torch.tensor([2]), torch.tensor([8]), entropy, mask, 0.5, 1e-6)
    r = lambda a, v: math.tanh(math.log((a / 2 + 1e-6) / (v / 8 + 1e-6)))
    # ceil(0.5 * 3) = 2 tokens: entropy 3 and 2
    assert float(got) == pytest.approx((r(0.1, 0.4) + r(0.4, 0.4)) / 2)


@pytest.mark.parametrize("text,ok", [
    ("Row 1: a circle. Answer: 1", True), ("<think>Row 1: a circle.</think><answer>1</answer>", True),
    ("Answer: 1", False), ("   Answer: 1", False), ("Row 1: a circle.", False), ("", False),
    ("Answer: 1. Row 1: a circle. Answer: 1", True),  # a rationale before the last marker
])
def test_format_reward_wants_a_rationale_then_an_answer(text, ok):
    assert grpo.has_format(text) is ok


def test_avar_and_sayo_rewards_match_eager_attention_float64(start, tmp_path):
    from transformers import AutoModelForImageTextToText
    cfg = config(start, tmp_path / "g", reward_avar=0.3, reward_region=1.0, num_generations=2)
    proc = data.Processor.from_pretrained(start)
    model = grpo.VLM.from_pretrained(start, dtype=torch.float32)
    from setting import synthetic
    synthetic.make_synthetic(str(tmp_path / "d"), 4, 2)
    recs = read_records(str(tmp_path / "d" / "train.jsonl"))[:2]
    seq, truncated, texts, has_region = grpo.rollouts(model, proc, recs, cfg, 0, torch.device("cpu"))
    # the rewards read these texts; the masses come from the sampled tokens
    right = lambda rec: rec["rationale"] + " Answer: " + rec["answer"]
    texts = [right(recs[i // 2]) if i % 2 == 0 else "Answer: purple" for i in range(len(texts))]
    model.double()
    seq64 = {k: v.double() if v.is_floating_point() else v for k, v in seq.items()}
    rows = torch.arange(len(texts))
    _, entropy, masses = grpo.score(model, seq64, rows, [0, 1, 2, 3])
    _, parts = grpo.rewards_of(recs, texts, {"masses": masses, "entropy": entropy}, seq, has_region, cfg,
                               [0, 1, 2, 3], [3], 2)
    hf = AutoModelForImageTextToText.from_pretrained(start, attn_implementation="eager",
                                                     dtype=torch.float64).eval()
    assert parts["accuracy"].tolist() == [1, 0, 1, 0]
    assert parts["avar"][1] == 0  # AVAR counts right answers only
    # one row at a time, padding removed (transformers' eager attention gives NaN on it)
    for b in range(len(texts)):
        real, start_b = seq["attention_mask"][b].bool(), int(seq["start"][b])
        with torch.no_grad():
            p = seq["prompt"][b:b + 1]  # the images are kept once per prompt
            out = hf(input_ids=seq["input_ids"][b][real][None], pixel_values=seq64["pixel_values"][p],
                     pixel_attention_mask=seq["pixel_attention_mask"][p], output_attentions=True)
        image, system, region = (((seq["groups"][b][real] >> bit) & 1).bool() for bit in (0, 1, 2))
        A = torch.stack([a[0][:, start_b:] for a in out.attentions])  # (L, H, n, T): the completion's rows
        avar = (A * image).sum() / (A * system).sum() * parts["accuracy"][b]
        assert float(parts["avar"][b]) == pytest.approx(float(avar), rel=1e-6, abs=1e-9)
        last = A[3].mean(0)                                           # (n, T): mean over heads
        a = (last * region).sum(-1) / region.sum()
        v = (last * image).sum(-1) / image.sum()
        r = torch.tanh(torch.log((a + 1e-6) / (v + 1e-6)))
        logp = torch.log_softmax(out.logits[0, start_b - 1:-1], -1)
        top = (-(logp.exp() * logp).sum(-1)).argsort(descending=True)[:math.ceil(0.3 * len(r))]
        assert float(parts["region"][b]) == pytest.approx(float(r[top].mean()), abs=1e-7)  # r is in [-1, 1]


def test_one_step_moves_logprobs_the_way_the_rewards_say(start, tmp_path, monkeypatch):
    """Rewards 1 for each group's first completion, 0 for the rest: after one step its log-prob is
    higher and the others' lower (inner_steps 2, so the ratio and clipping path runs too)."""
    seen = {}
    real = grpo.rollouts

    def rollouts(*args):
        seen["r"] = real(*args)
        return seen["r"]

    def rewards(recs, texts, *args):
        r = torch.tensor([1.0 if i % 4 == 0 else 0.0 for i in range(len(texts))])
        return r, {"accuracy": r}
    monkeypatch.setattr(grpo, "rollouts", rollouts)
    monkeypatch.setattr(grpo, "rewards_of", rewards)
    result = grpo.train(config(start, tmp_path / "g", max_steps=1, inner_steps=2, keep_truncated=True,
                               lr=3e-4))
    seq = seen["r"][0]
    rows = torch.arange(seq["cmask"].shape[0])
    total = lambda m: (grpo.score(m, seq, rows)[0] * seq["cmask"]).sum(1)
    change = total(result["model"]) - total(result["start"])
    first = rows % 4 == 0
    assert (change[first] > 0).all() and change[~first].mean() < 0, change


def test_truncated_completions_leave_the_loss_by_default(start, tmp_path, monkeypatch):
    """Every completion marked truncated: by default none is in the loss and one step leaves the weights
    as they were (Adam on a zero gradient); with keep_truncated they train."""
    real = grpo.rollouts

    def all_truncated(*args):
        seq, truncated, texts, has_region = real(*args)
        return seq, torch.ones_like(truncated), texts, has_region
    monkeypatch.setattr(grpo, "rollouts", all_truncated)
    monkeypatch.setattr(grpo, "rewards_of", lambda recs, texts,
                        *a: (torch.tensor([len(t) % 3.0 for t in texts]), {}))
    dropped = grpo.train(config(start, tmp_path / "a", max_steps=1))
    for p, q in zip(dropped["model"].parameters(), dropped["start"].parameters()):
        assert torch.equal(p, q)
    kept = grpo.train(config(start, tmp_path / "b", max_steps=1, keep_truncated=True))
    assert not torch.equal(kept["model"].lm_head.weight, kept["start"].lm_head.weight)


def test_old_logprobs_are_taken_once_per_batch_of_rollouts(start, tmp_path, monkeypatch):
    """inner_steps 3: the ratio is 1 at the first update and moves away from 1 at the later ones (the
    old log-probs stay those of the policy that sampled; both passes at its temperature, 0.7)."""
    seen, real = [], grpo.policy_loss

    def spy(logp, logp_old, *args):
        seen.append(float((logp.detach() - logp_old).abs().max()))
        return real(logp, logp_old, *args)
    monkeypatch.setattr(grpo, "policy_loss", spy)
    monkeypatch.setattr(grpo, "rewards_of", lambda recs, texts,
                        *a: (torch.tensor([len(t) % 3.0 for t in texts]), {}))
    grpo.train(config(start, tmp_path / "g", max_steps=1, inner_steps=3, keep_truncated=True, micro_batch=64,
                      temperature=0.7))
    assert len(seen) == 3 and seen[0] < 1e-5 and seen[1] > 1e-3 and seen[2] > seen[1]


def test_the_loop_scores_every_pass_at_the_sampling_temperature(start, tmp_path, monkeypatch):
    """The old log-probs (inner_steps 2, so they have their own pass), the reference model's and the
    gradient pass all take --temperature."""
    seen, real = [], grpo.score

    def spy(model, seq, rows, mass_layers=(), grad=False, temperature=1.0):
        seen.append((model is start_model[0], grad, temperature))
        return real(model, seq, rows, mass_layers, grad, temperature)
    start_model = [None]
    real_load = grpo.VLM.from_pretrained

    def load(*a, **kw):  # the first model train() loads is the frozen reference
        m = real_load(*a, **kw)
        start_model[0] = start_model[0] or m
        return m
    monkeypatch.setattr(grpo.VLM, "from_pretrained", load)
    monkeypatch.setattr(grpo, "score", spy)
    monkeypatch.setattr(grpo, "rewards_of", lambda recs, texts,
                        *a: (torch.tensor([len(t) % 3.0 for t in texts]), {}))
    grpo.train(config(start, tmp_path / "g", max_steps=1, keep_truncated=True, micro_batch=64,
                      temperature=0.7, inner_steps=2))
    assert sorted(set(seen)) == [(False, False, 0.7), (False, True, 0.7), (True, False, 0.7)]


def test_passes_not_needed_are_skipped_and_the_update_is_unchanged(start, tmp_path, monkeypatch):
    """inner_steps 1 without an attention reward: no no-grad policy pass (the update's own log-probs,
    detached, are the old ones), and the trained weights equal those of a run that takes the pass.
    beta 0: the starting model scores only every kl_every steps, and only those rows log a KL; beta > 0:
    every step."""
    calls, real = [], grpo.score

    def spy(model, seq, rows, mass_layers=(), grad=False, temperature=1.0):
        calls.append(("start" if not model.training else "grad" if grad else "old", int(steps[0])))
        return real(model, seq, rows, mass_layers, grad, temperature)
    steps = [0]
    real_step = grpo.grpo_step

    def counting_step(*args):
        steps[0] = args[6]
        return real_step(*args)
    monkeypatch.setattr(grpo, "score", spy)
    monkeypatch.setattr(grpo, "grpo_step", counting_step)
    monkeypatch.setattr(grpo, "rewards_of", lambda recs, texts,
                        *a: (torch.tensor([len(t) % 3.0 for t in texts]), {}))
    kw = dict(max_steps=3, keep_truncated=True, micro_batch=64, kl_every=2, lr=3e-4)
    skipped = grpo.train(config(start, tmp_path / "a", **kw))
    assert sorted(set(calls)) == [("grad", 0), ("grad", 1), ("grad", 2), ("start", 0), ("start", 2)]
    assert ["kl" in row for row in skipped["metrics"]] == [True, False, True]
    calls.clear()  # the same rewards, but an attention reward's layers ask for the no-grad pass
    taken = grpo.train(config(start, tmp_path / "b", reward_avar=0.3, **kw))
    assert ("old", 1) in calls
    for p, q in zip(skipped["model"].parameters(), taken["model"].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.equal(skipped["model"].lm_head.weight, skipped["start"].lm_head.weight)
    calls.clear()
    grpo.train(config(start, tmp_path / "c", beta=0.01, **kw))
    assert {s for who, s in calls if who == "start"} == {0, 1, 2}


def test_each_prompts_images_pass_the_vision_tower_once(start, tmp_path):
    """G = 3 completions of 2 prompts: generation and scoring each run the vision tower on 2 images,
    not 6, and scoring a subset of rows runs only the prompts it holds."""
    cfg = config(start, tmp_path / "g", num_generations=3)
    proc, model = data.Processor.from_pretrained(start), grpo.VLM.from_pretrained(start, dtype=torch.float32)
    from setting import synthetic
    synthetic.make_synthetic(str(tmp_path / "d"), 4, 2)
    recs = read_records(str(tmp_path / "d" / "train.jsonl"))[:2]
    seen = []
    model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    seq = grpo.rollouts(model, proc, recs, cfg, 0, torch.device("cpu"))[0]
    tiles = int((seq["pixel_values"][0] != 0).flatten(1).any(1).sum())
    assert seen == [2 * tiles] and seq["input_ids"].shape[0] == 6
    seen.clear()
    grpo.score(model, seq, torch.arange(6))
    grpo.score(model, seq, torch.tensor([3, 5]))
    assert seen == [2 * tiles, tiles]


def test_rollouts_are_scored_at_the_sampling_temperature(start, tmp_path):
    """The log-probs and entropies GRPO's ratio and KL use are those of logits / temperature, the
    distribution the completions were sampled from."""
    cfg = config(start, tmp_path / "g", temperature=0.5)
    proc, model = data.Processor.from_pretrained(start), grpo.VLM.from_pretrained(start, dtype=torch.float32)
    from setting import synthetic
    synthetic.make_synthetic(str(tmp_path / "d"), 4, 2)
    recs = read_records(str(tmp_path / "d" / "train.jsonl"))[:2]
    seq = grpo.rollouts(model, proc, recs, cfg, 0, torch.device("cpu"))[0]
    rows = torch.arange(seq["cmask"].shape[0])
    logp, entropy, _ = grpo.score(model, seq, rows, temperature=0.5)
    with torch.no_grad():  # each row with its own copy of its prompt's images
        logits = model(seq["input_ids"], seq["pixel_values"][seq["prompt"]],
                       seq["pixel_attention_mask"][seq["prompt"]], seq["attention_mask"]).logits
    for b in range(len(rows)):
        s, n = int(seq["start"][b]), int(seq["cmask"][b].sum())
        want = torch.log_softmax(logits[b, s - 1:s - 1 + n] / 0.5, -1)
        assert torch.allclose(logp[b, :n], want.gather(-1, seq["completion"][b, :n, None])[:, 0], atol=1e-5)
        assert torch.allclose(entropy[b, :n], -(want.exp() * want).sum(-1), atol=1e-4)


def test_resume_equals_an_uninterrupted_run(start, tmp_path, monkeypatch):
    """Rewards that differ within each group (the text's length mod 3), so that every step moves the
    model."""
    monkeypatch.setattr(grpo, "rewards_of", lambda recs, texts,
                        *a: (torch.tensor([len(t) % 3.0 for t in texts]), {}))
    kw = dict(max_steps=3, keep_truncated=True)
    straight = grpo.train(config(start, tmp_path / "a", **kw))
    assert not torch.equal(straight["model"].lm_head.weight, straight["start"].lm_head.weight)
    real = grpo.rollouts

    def interrupted(model, proc, recs, cfg, step, device):
        if step == 2:
            raise KeyboardInterrupt
        return real(model, proc, recs, cfg, step, device)
    monkeypatch.setattr(grpo, "rollouts", interrupted)
    with pytest.raises(SystemExit):
        grpo.train(config(start, tmp_path / "b", **kw))
    monkeypatch.setattr(grpo, "rollouts", real)
    resumed = grpo.train(config(start, tmp_path / "b", resume=True, **kw))
    assert [m["reward"] for m in resumed["metrics"]] == [m["reward"] for m in straight["metrics"]]
    for (name, p), q in zip(straight["model"].named_parameters(), resumed["model"].parameters()):
        assert torch.equal(p, q), name


def test_system_tokens_are_the_training_spans_s_with_and_without_a_system_message():
    """GRPO's system key group on left-padded prompts is data.py's S span of the same record: the
    scaffolding, and with a system message that message too (AVAR's "system")."""
    proc = data.new_processor(["Count well. How many? Answer: 1"] * 20, tile=32, image_seq_len=4,
                              vocab_size=300)
    recs = [{"question": "How many?", "images": [], "reply": "x Answer: 1", "source": "t",
             "system": "Count well.",
             "history": [{"role": "system", "text": "Count well."}]},
            {"question": "How many more of them?", "images": [], "reply": "x Answer: 2", "source": "t"}]
    batch = proc([data.record_prompt(proc, r) for r in recs], None, padding_side="left")
    got = grpo.system_tokens(proc, batch["input_ids"], batch["attention_mask"],
                             [r.get("system") for r in recs])
    for b, r in enumerate(recs):
        n = int((data.encode_record(proc, r)["spans"] == data.S).sum())
        pad = int((batch["attention_mask"][b] == 0).sum())
        assert int(got[b].sum()) == n and got[b, pad:pad + n].all()
    assert int(got[0].sum()) > int(got[1].sum())  # the system message is in the group


def test_reward_flags_alone_take_the_papers_weights():
    p = grpo.parser()
    assert p.parse_args([]).reward_avar == 0.0 and p.parse_args(["--reward-avar"]).reward_avar == 0.3
    assert p.parse_args(["--reward-region"]).reward_region == 1.0
    assert p.parse_args(["--reward-avar", "0.5"]).reward_avar == 0.5


def test_shared_image_features_with_ragged_tiles_and_a_text_only_prompt():
    """Prompts with 1, 3 and 0 real tiles (padding tiles all zero): the shared features of any rows
    equal the vision tower run on each row's own images, in row order; rows of the text-only prompt
    alone give no features."""
    from model import TextConfig, VisionConfig, VLMConfig
    torch.manual_seed(0)
    model = grpo.VLM(VLMConfig(VisionConfig(32, 64, 1, 2, 8, 32), TextConfig(50, 48, 96, 2, 6, 2, 8), 2, 49))
    pixels = torch.zeros(3, 3, 3, 32, 32)
    pixels[0, :1], pixels[1] = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    seq = {"prompt": torch.tensor([0, 0, 1, 2, 2, 1]), "pixel_values": pixels,
           "pixel_attention_mask": (pixels != 0).any(2).long()}
    for rows in (torch.arange(6), torch.tensor([5, 0, 3]), torch.tensor([1, 2])):
        got = grpo.shared_image_features(model, seq, rows)
        want = [model.image_features(pixels[p][None]) for p in seq["prompt"][rows].tolist() if p != 2]
        assert torch.allclose(got, torch.cat(want), atol=1e-6)
    assert grpo.shared_image_features(model, seq, torch.tensor([3, 4])).shape == (0, 48)
