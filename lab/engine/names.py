"""The names of the acceptance policies, importable without torch.

The `lab` command's parser lists them, and must not import torch (lab --help stays fast); the
policies themselves are POLICIES in lab.engine.policies, which tests/test_cli.py keeps in step.
"""

POLICY_NAMES: tuple[str, ...] = ("exact", "rejection", "confidence", "topk", "typical")
