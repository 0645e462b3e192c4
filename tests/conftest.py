"""Shared fixtures: the tiny built-in assets (tokenizer, task, student, teacher), built once per machine."""

import os

import pytest

# Keep test processes off the network and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# verl resolves its platform when first imported: tests run on tip_verl's CPU platform.
os.environ.setdefault("VERL_PLATFORM", "cpu")


@pytest.fixture(scope="session")
def tiny_assets():
    """The project's tiny assets (cached under $TIP_VERL_ASSETS or ~/.cache/tip_verl); built on first use."""
    from tip_verl.assets import build_assets

    return build_assets(quiet=True)
