"""TIPConfig validation, contradictions, from_dict/to_dict."""

import dataclasses
import re

import numpy as np
import pytest

from tip_verl import METHODS, TIPConfig


def test_defaults_are_the_paper_setting():
    cfg = TIPConfig()
    assert (cfg.method, cfg.ratio, cfg.selection_scope, cfg.norm_scope) == ("soft_or", 0.5, "sequence", "batch")
    assert (cfg.divergence, cfg.sampling_mode, cfg.importance_weighting, cfg.invert) == ("k3", "without_replacement", False, False)
    assert (cfg.entropy_threshold, cfg.divergence_threshold, cfg.threshold_mode, cfg.seed) == (0.5, 0.5, "quantile", 0)
    assert METHODS == ("all", "entropy", "entropy_sample", "soft_or", "q3", "divergence", "random")


@pytest.mark.parametrize("field, value, allowed", [
    ("method", "topk", "must be one of"),
    ("method", 3, "must be one of"),
    ("ratio", 0.0, r"must be in \(0, 1\]"),
    ("ratio", 1.5, r"must be in \(0, 1\]"),
    ("ratio", -0.2, r"must be in \(0, 1\]"),
    ("ratio", float("nan"), "must be finite"),
    ("ratio", "0.5", "must be a float"),
    ("ratio", True, "must be a float"),
    ("selection_scope", "token", "must be one of"),
    ("norm_scope", "global", "must be one of"),
    ("divergence", "forward", "must be one of"),
    ("divergence", "k2", "must be one of"),
    ("sampling_mode", "with_replacement", "must be one of"),
    ("importance_weighting", 1, "must be a bool"),
    ("importance_weighting", "yes", "must be a bool"),
    ("invert", 0, "must be a bool"),
    ("entropy_threshold", 1.5, r"must be in \[0, 1\]"),
    ("divergence_threshold", -0.1, r"must be in \[0, 1\]"),
    ("entropy_threshold", None, "must be a float"),
    ("divergence_threshold", float("inf"), "must be finite"),
    ("threshold_mode", "median", "must be one of"),
    ("seed", -1, r"must be in \[0, 2\*\*63\)"),
    ("seed", 1.5, "must be an int"),
    ("seed", False, "must be an int"),
])
def test_invalid_field_names_field_and_value(field, value, allowed):
    with pytest.raises(ValueError) as err:
        TIPConfig(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"TIPConfig.{field}={value!r} is invalid: "), msg
    assert re.search(allowed, msg), msg


def test_ratio_message_format():
    with pytest.raises(ValueError, match=r"^TIPConfig\.ratio=0\.0 is invalid: must be in \(0, 1\]$"):
        TIPConfig(ratio=0.0)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'all', 'entropy', 'entropy_sample', 'soft_or', 'q3', 'divergence', 'random'"):
        TIPConfig(method="bogus")


@pytest.mark.parametrize("kwargs, field, fragment", [
    (dict(method="all", ratio=0.5), "ratio", "method='all' keeps every token: leave ratio unset or set it to 1.0"),
    (dict(method="all", ratio=1.0, invert=True), "invert", "cannot be combined with method='all'"),
    (dict(method="entropy_sample", invert=True), "invert", "cannot be combined with method='entropy_sample'"),
    (dict(method="soft_or", sampling_mode="poisson"), "sampling_mode", "requires method='entropy_sample'"),
    (dict(importance_weighting=True), "importance_weighting", "requires method='entropy_sample' and sampling_mode='poisson'"),
    (dict(method="entropy_sample", importance_weighting=True), "importance_weighting", "sampling_mode='without_replacement'"),
])
def test_contradictions_raise(kwargs, field, fragment):
    with pytest.raises(ValueError) as err:
        TIPConfig(**kwargs)
    assert str(err.value).startswith(f"TIPConfig.{field}=") and fragment in str(err.value)


def test_valid_combinations():
    assert TIPConfig(method="all", ratio=1).ratio == 1.0 and isinstance(TIPConfig(method="all", ratio=1).ratio, float)
    cfg = TIPConfig(method="entropy_sample", sampling_mode="poisson", importance_weighting=True, ratio=0.2)
    assert cfg.importance_weighting
    assert TIPConfig(method="soft_or", invert=True).invert
    assert TIPConfig(threshold_mode="absolute", divergence_threshold=3.0).divergence_threshold == 3.0
    for method in METHODS:
        TIPConfig(method=method, ratio=1.0 if method == "all" else 0.3)


def test_from_dict_round_trip_and_unknown_key_suggestion():
    cfg = TIPConfig(method="q3", ratio=0.2, selection_scope="batch", seed=7)
    assert TIPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["method"] == "q3" and set(cfg.to_dict()) == set(TIPConfig.field_names())
    with pytest.raises(ValueError) as err:
        TIPConfig.from_dict({"ratoi": 0.3, "method": "entropy"})
    msg = str(err.value)
    assert "'ratoi'" in msg and "did you mean 'ratio'?" in msg
    assert "valid keys are: method, ratio, selection_scope" in msg
    with pytest.raises(ValueError, match="'zzz'; valid keys"):
        TIPConfig.from_dict({"zzz": 1})
    with pytest.raises(ValueError, match="expects a mapping"):
        TIPConfig.from_dict([("ratio", 0.5)])
    with pytest.raises(ValueError, match="TIPConfig.ratio=2.0"):
        TIPConfig.from_dict({"ratio": 2.0})


def test_frozen_and_replace_revalidates():
    cfg = TIPConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.1  # type: ignore[misc]
    assert dataclasses.replace(cfg, ratio=0.1).ratio == 0.1
    with pytest.raises(ValueError, match="TIPConfig.ratio=0.0"):
        dataclasses.replace(cfg, ratio=0.0)


def test_method_all_alone_keeps_every_token_and_other_methods_default_to_half():
    assert TIPConfig(method="all").ratio == 1.0
    assert TIPConfig().ratio == 0.5 and TIPConfig(method="entropy").ratio == 0.5
    assert TIPConfig(method="all") == TIPConfig(method="all", ratio=1.0)
    assert TIPConfig.from_dict({"method": "all"}).ratio == 1.0
    # an explicit contradictory ratio is named together with the method
    with pytest.raises(ValueError, match=r"^TIPConfig\.ratio=0\.5 is invalid: method='all' keeps every token: "
                                         r"leave ratio unset or set it to 1\.0$"):
        TIPConfig(method="all", ratio=0.5)


def test_numpy_scalars_are_accepted_as_ints_and_floats():
    cfg = TIPConfig(ratio=np.float32(0.25), seed=np.int64(3), entropy_threshold=np.float64(0.4))
    assert (cfg.ratio, cfg.seed, cfg.entropy_threshold) == (0.25, 3, 0.4)
    assert type(cfg.seed) is int and type(cfg.ratio) is float
    with pytest.raises(ValueError, match=r"TIPConfig\.seed=.*True.* is invalid: must be an int"):
        TIPConfig(seed=np.bool_(True))
