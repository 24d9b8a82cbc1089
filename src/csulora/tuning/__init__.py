"""`csulora tune`: choose a correction and its strength on validation data, for the user.

Public API::

    from csulora.tuning.runner import tune_adapter
    from csulora.tuning.config import TuneConfig
    result = tune_adapter("attacked/", "tuned/", aligned="aligned/", calibration="calib.safetensors",
                          config=TuneConfig(), task="val.jsonl")
    result.qualified, result.chosen_method, result.chosen_params   # e.g. True, "calibrated", {"strength": 10.0}

(``csulora.tune_adapter`` and ``csulora.TuneConfig`` name the same.) The package, by job:

- ``config``: :class:`TuneConfig` (the method or ``all``, its grid, the bounds, ``full_sweep``);
- ``data``: the validation data, read and checked before any model (test splits refused);
- ``plan``: which methods can run with the inputs given, and what each reads;
- ``states``: the model states reached in one loaded model (adapters attached with PEFT, a full
  checkpoint's settings swapped in memory); ``checkpoint``: the in-memory weight swaps;
- ``scoring``: one state's answers and measures, completely or lazily (stop when decided);
  ``score_cache``: scored states kept on disk;
- ``sweep``: the aligned model, the update, then each method's settings weakest first;
- ``scores``, ``verdicts``, ``selection``, ``hints``: the pure rule of docs/design.md §10;
- ``report``: tune.json, tune.png and the answers; ``runner``: :func:`tune_adapter`.
"""
