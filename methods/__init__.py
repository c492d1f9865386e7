"""The related methods, beside Att-CoT: AVAR's attention objective (avar.py), DRIFT's gradient bias
(drift.py), the difficulty filter (difficulty.py), the early-commitment term (commit.py), and GRPO
with AVAR's and SAYO's rewards (grpo.py, its own trainer: python -m methods.grpo)."""
