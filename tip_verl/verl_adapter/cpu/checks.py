"""Start-up checks for the CPU platform: turn a bad set-up into one clear message, early.

Where they run (all only when the CPU platform is selected):

* :func:`check_no_cuda` when verl instantiates the platform (``PlatformCPU.__init__``), i.e. in the
  driver at ``main_ppo``'s ``auto_set_device`` before Ray starts, and in every worker.
* :func:`check_model_dir` + :func:`check_tokenizer` + :func:`check_engine_config` when a training
  engine is built (the CPU engine registered for verl's ``EngineRegistry``) and when the HF rollout
  server starts, i.e. before any weights are loaded.
* :func:`run_startup_checks` is the one-call version used by the example script and the
  single-process workers.

Errors are :class:`CPUSetupError` (a ``RuntimeError``) whose text says what to change.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Union

ALLOW_CUDA_ENV = "TIP_VERL_CPU_ALLOW_CUDA"


class CPUSetupError(RuntimeError):
    """The CPU platform was asked for with a set-up it cannot run."""


def check_no_cuda() -> None:
    """Refuse the CPU platform on a machine where verl would use CUDA (unless explicitly allowed)."""
    if os.environ.get(ALLOW_CUDA_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    import torch

    if torch.cuda.is_available():
        raise CPUSetupError(
            "VERL_PLATFORM=cpu selects tip_verl's CPU platform, but this machine has CUDA "
            f"({torch.cuda.device_count()} visible device(s)) and verl would use it. Unset VERL_PLATFORM "
            "to train on the GPU(s) with verl's own platform and a vLLM/SGLang rollout, or set "
            f"{ALLOW_CUDA_ENV}=1 to run on the CPU anyway (e.g. to reproduce CPU tests)."
        )


def check_model_dir(path: Union[str, os.PathLike, None], role: str = "model") -> str:
    """The model directory must exist locally, hold a Hugging Face ``config.json`` and readable weights."""
    if path is None or str(path).strip() in ("", "None", "null"):
        raise CPUSetupError(f"no {role} path given (set it in the config, e.g. actor_rollout_ref.model.path=...).")
    local = os.path.expanduser(str(path))
    hint = (
        " The CPU backend runs offline: point it at a local Hugging Face model directory. The project's "
        "tiny student/teacher models are built with `python -m tip_verl.assets` (or "
        "`tip_verl.assets.build_assets()`)."
    )
    if not os.path.exists(local):
        raise CPUSetupError(f"{role} directory {local!r} does not exist.{hint}")
    if not os.path.isdir(local):
        raise CPUSetupError(f"{role} path {local!r} is not a directory.{hint}")
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise CPUSetupError(f"{role} directory {local!r} has no config.json (not a Hugging Face model).{hint}")
    from tip_verl.verl_adapter.checkpoints import CheckpointError, check_checkpoint_dir

    try:  # config.json with a model_type, complete weight files (headers and sizes only)
        check_checkpoint_dir(local, role)
    except CheckpointError as e:
        raise CPUSetupError(str(e)) from None
    return local


def check_tokenizer(path_or_tokenizer: Any, role: str = "model") -> Any:
    """verl's Qwen ChatML continuous-token builder needs ``"\\n"`` to be exactly one token.

    The rule lives in one place, :func:`tip_verl.assets.tokenizer.check_tokenizer`; its ``ValueError``
    becomes a :class:`CPUSetupError` naming the role. Returns the tokenizer.
    """
    from tip_verl.assets.tokenizer import check_tokenizer as checker

    tokenizer = path_or_tokenizer
    if isinstance(path_or_tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path_or_tokenizer))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CPUSetupError(f"cannot load the {role} tokenizer from {str(path_or_tokenizer)!r}: {e}") from e
    try:
        return checker(tokenizer)
    except ValueError as e:
        raise CPUSetupError(f"{role} tokenizer: {e}") from e


def check_engine_config(engine_config: Any, role: str = "actor") -> None:
    """Only the FSDP2 engine runs on the host (FSDP1 insists on an accelerator)."""
    strategy = getattr(engine_config, "strategy", None)
    if strategy is not None and strategy != "fsdp2":
        raise CPUSetupError(
            f"{role}: FSDP strategy {strategy!r} does not run on the CPU platform; use FSDP2: "
            "actor_rollout_ref.{actor,ref}.strategy=fsdp2 and actor_rollout_ref.{actor,ref}.fsdp_config.strategy=fsdp2 "
            "(tip_verl.verl_adapter.cpu_overrides.cpu_overrides() sets them)."
        )


def run_startup_checks(
    model_paths: Union[Mapping[str, Optional[str]], Iterable[Optional[str]], None] = None,
    *,
    tokenizer: bool = True,
    cuda: bool = True,
) -> None:
    """Run every check that applies: CUDA machine, each model directory and its tokenizer."""
    if cuda:
        check_no_cuda()
    if model_paths is None:
        return
    items = model_paths.items() if isinstance(model_paths, Mapping) else ((f"model {i}", p) for i, p in enumerate(model_paths))
    for role, path in items:
        local = check_model_dir(path, role=role)
        if tokenizer:
            check_tokenizer(local, role=role)
