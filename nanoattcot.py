"""
nanoattcot's main job, the papers' setting end to end on a CPU: a base model made in stages
(setting/base.py: a SigLIP-pretrained tower, alignment, text reasoning, the whole mix), then CoT-SFT
and Att-CoT fine-tuned from it on the same image chain-of-thought set, and one report that measures
the three (eval.py).

    python nanoattcot.py                      # the base (reused once made), CoT-SFT and Att-CoT, the report
    python nanoattcot.py base                 # the base alone
    python nanoattcot.py --compare sft,attcot,avar                 # other methods from the same base
    python nanoattcot.py --objective sft --drift-prior out/text_only/sft/model    # one method, its flags
    python nanoattcot.py --from-scratch --compare                  # no base: each from random weights
    python nanoattcot.py train --init DIR --data train.jsonl --eval-data eval.jsonl ...   # the trainer alone

The trainer is train.py, the objectives objective.py, every flag train_config.py (and the stages'
setting/base.StageConfig).
"""
import sys

import config
import train
from setting import base
from train_config import PIPELINE_OBJECTIVES, TrainConfig


def parser():
    p = config.new_parser("nanoattcot.py", "The main job: with no arguments, the papers' setting end to end "
                          "on a CPU (the base made in stages, CoT-SFT and Att-CoT fine-tuned from it, one "
                          "report). 'base' first: the base alone; 'train' first, or --data / --init / "
                          "--from-scratch: the trainer alone (train.py; torchrun nanoattcot.py train ...).")
    config.add_flags(p, TrainConfig)
    config.add_flags(p, base.StageConfig)
    p.add_argument("--compare", nargs="?", const="sft,attcot", default="",
                   help="objectives to train one after the other on the same data, side by side in one "
                        "table, comma-separated (the flag alone: sft,attcot; default: off)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv[:1] in (["train"], ["base"]) else ""
    args = vars(parser().parse_args(argv[1:] if stage else argv))
    compare = [o for o in args.pop("compare").split(",") if o]
    with config.one_line_errors():
        st = base.StageConfig(**{f: args.pop(f) for f in base.StageConfig.__dataclass_fields__})
        if args["data"] or args["init"] or st.from_scratch or stage == "train":
            return train.run(TrainConfig(**args), compare)
        chosen = any(a.split("=")[0] == "--objective" for a in argv)  # else both, side by side
        return base.pipeline(args, st, compare or ([] if chosen else list(PIPELINE_OBJECTIVES)),
                             base_only=stage == "base")


if __name__ == "__main__":
    main()
