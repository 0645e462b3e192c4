"""Test instrument of the end-to-end runs: a record per rank each time the sparse lm_head runs, and one per weight
update the hf rollout receives.

On ``PYTHONPATH`` of a run (tests/e2e/test_tip_teacher_paths.py), Python imports this file at start-up in
every process of the job, Ray's workers included. With ``TIP_VERL_E2E_PROBE_DIR`` set it waits (a stdlib
import hook, nothing imported until then) for the modules in :data:`_TARGETS` and wraps

* ``TIPLMHeadMixin._tip_sparse_outputs`` (``tip_verl.verl_adapter.sparse_lm_head``) -- the kept-rows branch of the
  update step -- so that each call appends ``{"rank", "world", "pid", "sequences", "kept_rows", "packed_rows"}`` to
  ``<dir>/rank<R>.<pid>.jsonl``;
* ``HFGenerator.load_weights`` (``tip_verl.verl_adapter.cpu.hf_generator``) so that each update appends
  ``{"pid", "tensors", "adapters", "digest"}`` (the float64 sum of every received tensor) to
  ``<dir>/weights.<pid>.jsonl``.

Without the variable it does nothing. It changes no result: the wrapped methods' return values are passed on.
"""

import importlib.abc
import importlib.util
import json
import os
import sys

_DIR = os.environ.get("TIP_VERL_E2E_PROBE_DIR")


def _append(name: str, record: dict) -> None:
    with open(os.path.join(_DIR, name), "a") as f:
        f.write(json.dumps(record) + "\n")


def _instrument_sparse_lm_head(module) -> None:
    mixin = module.TIPLMHeadMixin
    original = mixin._tip_sparse_outputs
    if getattr(original, "__tip_e2e_probe__", False):
        return

    def _tip_sparse_outputs(self, output, output_args, plan, micro_batch, *args, **kwargs):
        result = original(self, output, output_args, plan, micro_batch, *args, **kwargs)
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        record = {"rank": rank, "world": world, "pid": os.getpid(), "sequences": int(len(micro_batch)),
                  "kept_rows": int(plan.positions.shape[0]), "packed_rows": int(plan.total_nnz)}
        _append(f"rank{rank}.{os.getpid()}.jsonl", record)
        return result

    _tip_sparse_outputs.__tip_e2e_probe__ = True
    mixin._tip_sparse_outputs = _tip_sparse_outputs


def _instrument_hf_generator(module) -> None:
    generator = module.HFGenerator
    original = generator.load_weights

    def load_weights(self, named_tensors, *args, **kwargs):
        named_tensors = list(named_tensors)
        result = original(self, named_tensors, *args, **kwargs)
        digest = sum(float(tensor.double().sum()) for _, tensor in named_tensors)
        _append(f"weights.{os.getpid()}.jsonl", {"pid": os.getpid(), "tensors": len(named_tensors),
                                                 "adapters": bool(kwargs.get("adapters")), "digest": digest})
        return result

    generator.load_weights = load_weights


_TARGETS = {"tip_verl.verl_adapter.sparse_lm_head": _instrument_sparse_lm_head,
            "tip_verl.verl_adapter.cpu.hf_generator": _instrument_hf_generator}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _TARGETS[module.__name__](module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
