"""`csulora tune`: choose a correction's strength on validation data, for the user.

Public API::

    from csulora.tuning import TuneConfig, tune_adapter, select_setting
    result = tune_adapter("attacked/", "tuned/", aligned="aligned/", subspace="sub.safetensors",
                          config=TuneConfig(method="resta"), task="val.jsonl")
    result.qualified, result.chosen_params   # e.g. True, {"restore": 1.5}
    # every method over its default grid; the calibrated one calibrates on the training data first
    tune_adapter("attacked/", "tuned/", aligned="aligned/", base="base/", calibration_task="train.jsonl",
                 config=TuneConfig(method="all"), task="val.jsonl")

The selection rules (:func:`select_setting`: one method, the weakest qualifying setting;
:func:`select_across_methods`: ``all``, the highest validation utility) are pure and
model-free; the runner scores each setting by generation with the evaluation harness and
writes OUTDIR atomically.
"""

from __future__ import annotations

from csulora.tuning.config import ALL_METHODS, TuneConfig, parse_grid
from csulora.tuning.selection import (
    Condition,
    MethodSweep,
    ScoredSetting,
    Selection,
    SettingScores,
    Verdict,
    select_across_methods,
    select_setting,
)

__all__ = [
    "ALL_METHODS",
    "Condition",
    "MethodSweep",
    "ScoredSetting",
    "Selection",
    "SettingScores",
    "TuneConfig",
    "TuneResult",
    "Verdict",
    "parse_grid",
    "select_across_methods",
    "select_setting",
    "tune_adapter",
]


def __getattr__(name: str):
    # The runner pulls in torch/transformers; import it only when asked for.
    if name in ("tune_adapter", "TuneResult"):
        from csulora.tuning import runner

        return getattr(runner, name)
    raise AttributeError(name)
