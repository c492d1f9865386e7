"""The papers' setting in miniature: the synthetic image sets and their chain-of-thought records
(synthetic.py), the base model made in stages (base.py), its vision tower's contrastive pretraining
(vision_stage.py)."""
