"""
The training run's settings: every flag of `python nanoattcot.py train` with its help and default,
the defaults that depend on each other (learning rates for scratch, --init and --lora) decided in one
place, and every value checked before anything runs (a one-line error naming the flag).
"""
import os
from dataclasses import dataclass

import config
import lora
import mass_kernel
import objective
from config import ConfigError, arg
from device import device_problem, pick_device
from methods.drift import DRIFT_MODES
from setting import synthetic


OBJECTIVES, MASS_IMPLS = ("sft", "attcot", "avar"), ("auto", *mass_kernel.ROUTES)
PIPELINE_OBJECTIVES = ("sft", "attcot")  # the default run fine-tunes the base with both, unless --objective
ANS_GROUPS = objective.ANS_GROUPS  # (a name the config's own `objective` field would shadow)
# fine-tuning a pretrained SmolVLM (--init): nanoVLM trains its backbones at 5e-5 and a new projector much
# faster; here the connector is pretrained too, so 1e-5 for both towers, 10x that for the connector, and
# nanoVLM's 3% warmup. From scratch (the small model) every part starts at 3e-3 with 30 warmup steps.
FINETUNE_LR, FINETUNE_LR_CONNECTOR, SCRATCH_LR, SCRATCH_WARMUP = 1e-5, 1e-4, 3e-3, 30
# The base's VLM stages (setting/base.py) train at the scratch rate (only the tower was pretrained). Its
# fine-tunes (the main job's): a third of its peak rate (it ended its own cosine at a tenth), the language
# model and connector alike, nanoVLM's 3% warmup, 400 steps; the tower stays frozen, as in the base's stages.
BASE_FINETUNE_LR, FINETUNE_STEPS = 1e-3, 400
# LoRA's adapters start at zero and are few: a rate as LLaMA-Factory's and PEFT's examples use (1e-4 to 2e-4)
LORA_LR, LORA_TARGETS = 2e-4, lora.TARGETS
LAYERS = "all, last, indices and a:b ranges such as 0,3 or 8: or -4:"


@dataclass
class TrainConfig:
    out: str = arg("out", "output folder: data, checkpoint, model, metrics, report")
    data: str = arg("", "training records (JSONL, LLaVA JSON); empty: the synthetic set, made in OUT/data")
    eval_data: str = arg("", "evaluation records; empty with the synthetic set: its eval split")
    init: str = arg("", "a SmolVLM / Idefics3 folder to fine-tune; empty: the small model from scratch")
    objective: str = arg("attcot", "sft (CE on the reply), attcot (+ L_vis + L_ans) or avar (+ AVAR's "
                         "L_img + L_sys)", choices=OBJECTIVES)
    lambda_vis: float = arg(0.1, "weight of L_vis: the rationale's attention on the image")
    lambda_ans: float = arg(0.1, "weight of L_ans: the answer's attention on --ans-group")
    ans_group: str = arg("rationale+image", "L_ans's key group: rationale+image, or user+rationale (all "
                         "but the chat scaffolding)", choices=ANS_GROUPS)
    ans_target: float = arg(None, "L_ans's floor: only answer tokens with mass below it are pushed "
                            "(none: all)", type=config.float_or_none)
    lambda_commit: float = arg(0.0, "weight of the early-commitment term: the answer forced after an early "
                               "cut of the rationale, its probability pushed down to --commit-floor")
    commit_floor: float = arg(0.5, "the early-commitment term's p0, the answer's probability among its "
                              "rivals: no push below it")
    commit_share: float = arg(0.25, "the share of each batch's records that get an early-cut copy")
    vis_target: float = arg(0.5, "L_vis's floor t: only rationale steps with image mass below t are pushed "
                            "(none: all)", type=config.float_or_none)
    eps: float = arg(1e-6, "added inside the logs of the attention terms")
    avar_img: float = arg(0.15, "weight of AVAR's image term (its released code's value)")
    avar_sys: float = arg(0.15, "weight of AVAR's system term (its released code's value)")
    drift_prior: str = arg("",
                           "DRIFT: a checkpoint whose language model has this one's shapes (a --text-only "
                           "run, say); empty: no DRIFT")
    drift_mode: str = arg("adaptive_cosine", "how DRIFT scales its bias", choices=DRIFT_MODES)
    drift_alpha: float = arg(1.0, "DRIFT's bias strength")
    drift_no_rescale: bool = arg(False, "DRIFT: keep Delta's own norm (default: rescaled to each weight's)")
    difficulty: str = arg("", "lo:hi: keep the records the starting model (--init) gets right at a rate in "
                          "[lo, hi]; empty: all")
    difficulty_samples: int = arg(4, "answers sampled per record for its success rate")
    visual_attn_scale: str = arg("", "test-time intervention in the final eval: comma-separated factors f "
                                 "on the image keys' attention (a table row per f); empty: none")
    visual_attn_layers: str = arg("all", f"the intervention's layers: {LAYERS}")
    text_only: bool = arg(False, "train on the synthetic set in words, without the image: from the base, a "
                          "text-only cold start (measured on images); from scratch, DRIFT's reasoning prior")
    prompt: str = arg(None, "how eval's CoT prompt asks: bare (the question as written; what the "
                      "from-scratch models were taught) or cot (+ 'Think step by step.'); None: cot from the "
                      "base, else bare", choices=("bare", "cot"))
    layers: str = arg("all", f"the layers whose attention masses the objective reads: {LAYERS}")
    mass_impl: str = arg("auto", "how masses are computed: auto (on a GPU the kernel once it passes its "
                         "self-check, SDPA where it cannot run or fails; on the CPU fused), cuda, fused "
                         "(the group bits as extra value columns of the model's own attention), reference "
                         "or sdpa",
                         choices=MASS_IMPLS)
    measure_vas: bool = arg(False, "compute the masses (and log VAS) with sft too")
    batch_size: int = arg(16,
                          "records per micro-batch (16 keeps the CPU demo within 8 minutes; the README's "
                          "experiment uses 32)")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    max_steps: int = arg(None, "optimizer steps; None: 400 fine-tuning the base, else 1200")
    lr: float = arg(None, "the language model's learning rate; None: 3e-3 from scratch, 1e-5 with --init, "
                    "2e-4 with --lora (the main job's fine-tunes of its base: 1e-3)")
    lr_vision: float = arg(None, "the vision tower's; None: 3e-3 from scratch, 1e-5 with --init")
    lr_connector: float = arg(None, "the connector's; None: 3e-3 from scratch, 1e-4 with --init")
    weight_decay: float = arg(0.01, "AdamW's weight decay")
    warmup: int = arg(None, "linear warmup steps; None: 30 from scratch, 3% of --max-steps with --init")
    grad_clip: float = arg(1.0, "the gradient's norm is clipped to this")
    max_len: int = arg(2048, "longest record in tokens; a longer one is skipped (the answer is never cut)")
    freeze_vision: bool = arg(None, "do not train the vision tower (fine-tuning the base: frozen, as in its "
                              "own stages; else trained)")
    lora: int = arg(0, "LoRA's rank: train low-rank adapters on the decoder's linears (lora.py), everything "
                    "else frozen, saved in PEFT's format in OUT/adapter; 0: a full fine-tune")
    lora_alpha: float = arg(32.0, "LoRA's alpha: the adapters' update is scaled by alpha / rank")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input")
    lora_targets: str = arg(",".join(LORA_TARGETS), "the decoder linears that get adapters")
    adapter: str = arg("", "a LoRA adapter folder (this project's or PEFT's), folded into --init first")
    merge: bool = arg(False, "with --lora: also write OUT/model, the model with its adapters folded in")
    activation_checkpointing: bool = arg(False, "recompute each block in the backward: less memory, about "
                                         "1/3 more compute")
    compile: bool = arg(False, "torch.compile the model")
    peak_tflops: float = arg(0.0,
                             "the accelerator's dense bf16 peak for MFU; 0: looked up from the GPU's name")
    eval_every: int = arg(0, "evaluate every this many steps as well (0: at the end only)")
    save_every: int = arg(250, "write a checkpoint every this many steps (0: at the end only)")
    family: str = arg("grid", "the synthetic set's family: grid (counts, comparisons, a cell's colour; the "
                      "rationale walks the grid) or wording (negations and which-questions; the rationale "
                      "says what is seen, never the answer)", choices=tuple(synthetic.FAMILIES))
    n_train: int = arg(20000, "synthetic training records from scratch (fewer images and the small model "
                       "memorises them; from the base: --cot-records)")
    n_eval: int = arg(150, "synthetic eval ITEMS: each comes with its counterfactual twin, so the eval has "
                      "twice as many records")
    eval_limit: int = arg(0, "evaluate on at most this many records, twins counted (0: all)")
    seed: int = arg(0, "seed of the synthetic set, the initial weights and the batch order")
    device: str = arg("auto", "auto (the GPU if there is one), cpu, cuda or cuda:N")
    resume: bool = arg(False, "continue from OUT/checkpoint (the same batches as an uninterrupted run)")
    skip_nonfinite: bool = arg(False, "skip a step whose loss is not finite (default: stop with an error)")
    strict: bool = arg(False, "stop at the first bad record (default: skip it, count it, say why)")
    log_every: int = arg(10, "print a line every this many steps")

    def __post_init__(self):
        finetune = bool(self.init)
        self.freeze_vision = bool(self.freeze_vision)
        self.max_steps = 1200 if self.max_steps is None else self.max_steps
        self.prompt = self.prompt or "bare"
        self.lr = (LORA_LR if self.lora else FINETUNE_LR if finetune else SCRATCH_LR) if self.lr is None \
            else self.lr
        self.lr_vision = (FINETUNE_LR if finetune
                          else SCRATCH_LR) if self.lr_vision is None else self.lr_vision
        self.lr_connector = (FINETUNE_LR_CONNECTOR if finetune
                             else SCRATCH_LR) if self.lr_connector is None \
            else self.lr_connector
        if self.warmup is None:
            self.warmup = max(1, round(0.03 * self.max_steps)) if finetune else SCRATCH_WARMUP
        band, scales = numbers(self.difficulty, ":"), numbers(self.visual_attn_scale, ",")
        band_ok = band == [] or (band is not None and len(band) == 2 and 0 <= band[0] <= band[1] <= 1)
        config.check(self, [
            ("objective", self.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
            ("drift_mode", self.drift_mode in DRIFT_MODES,
             f"one of {', '.join(DRIFT_MODES)}"),
            ("drift_prior", not self.drift_prior or os.path.isdir(self.drift_prior),
             "an existing checkpoint folder"),
            ("difficulty", band_ok, "lo:hi with 0 <= lo <= hi <= 1"),
            ("difficulty", not self.difficulty or bool(self.init),
             "given with --init (the model whose success it measures)"),
            ("visual_attn_scale", scales is not None and all(f > 0 for f in scales),
             "comma-separated factors > 0"),
            ("mass_impl", self.mass_impl in MASS_IMPLS, f"one of {', '.join(MASS_IMPLS)}"),
            *[(k, getattr(self, k) is None or 0 < getattr(self, k) <= 1, "in (0, 1] or none")
              for k in ("vis_target", "ans_target")],
            ("ans_group", self.ans_group in ANS_GROUPS, f"one of {', '.join(ANS_GROUPS)}"),
            *[(k, 0 < getattr(self, k) <= 1, "in (0, 1]") for k in ("commit_floor", "commit_share")],
            ("family", self.family in synthetic.FAMILIES, f"one of {', '.join(synthetic.FAMILIES)}"),
            ("prompt", self.prompt in ("bare", "cot"), "bare or cot"),
            ("lambda_commit", not self.lambda_commit or int(os.environ.get("WORLD_SIZE", 1)) == 1,
             "0 under torchrun (its second forward per micro-batch is untested with DDP)"),
            ("eps", self.eps > 0, "> 0"), ("grad_clip", self.grad_clip > 0, "> 0"),
            *[(k, getattr(self, k) > 0, "> 0") for k in ("lr", "lr_vision", "lr_connector")],
            *config.at_least(self, 1, ("batch_size", "grad_accum", "max_len", "log_every", "n_train",
                                       "n_eval", "difficulty_samples")),
            *config.at_least(self, 0, ("lambda_vis", "lambda_ans", "lambda_commit", "avar_img", "avar_sys",
                                       "drift_alpha",
                                       "weight_decay", "warmup", "max_steps", "save_every", "eval_every",
                                       "eval_limit", "peak_tflops")),
            ("eval_data", bool(self.eval_data or not self.data),
             "given with --data (every run ends in an evaluation)"),
            ("init", not self.init or os.path.isdir(self.init), "an existing checkpoint folder"),
            ("lora", self.lora >= 0, ">= 0"), ("lora", not self.lora or bool(self.init),
                                               "given with --init (adapters fine-tune a trained model)"),
            ("lora", not (self.lora and self.drift_prior), "0 with --drift-prior (its bias is per weight)"),
            ("lora_targets", set(self.lora_targets.split(",")) <= set(lora.TARGETS),
             f"a comma-separated subset of {','.join(lora.TARGETS)}"),
            ("adapter", not self.adapter or (bool(self.init) and os.path.isdir(self.adapter)),
             "an existing adapter folder, given with --init"),
            ("merge", not self.merge or bool(self.lora), "given with --lora"),
            ("adapter", not (self.adapter and self.lora), "not with --lora (new adapters over a merged one "
             "would be saved as if over --init alone: --merge first, then --init that model)")])
        config.layer_set(self.layers, flag="--layers")  # the grammar now; the range once the model is loaded
        config.layer_set(self.visual_attn_layers, flag="--visual-attn-layers")
        if device_problem(self.device):
            raise ConfigError(device_problem(self.device))
        if self.mass_impl == "cuda" and pick_device(self.device).type != "cuda":
            raise ConfigError("--mass-impl cuda: the kernel runs on a CUDA device, and this run's is "
                              f"{pick_device(self.device)}")


def numbers(text, sep):  # "0.2:0.8" -> [0.2, 0.8]; "" -> []; None if a part is not a number
    try:
        return [float(x) for x in text.split(sep)] if text else []
    except ValueError:
        return None
