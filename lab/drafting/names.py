"""The names of the drafters, importable without torch.

The `lab` command's parser offers them, and must not import torch (lab --help stays fast); the
drafters themselves are DRAFTERS in lab.drafting.registry, which tests/test_cli.py keeps in step.
"""

DRAFTER_NAMES: tuple[str, ...] = ("draft_model", "prompt_lookup", "medusa", "eagle", "controlled")
