"""The SmolLM2 evidence pipeline (issue 5, rows of issues 6 and 8): staged and cached.

    python -m benchmarks.smol [--stage NAME] [--until NAME] [--cache .cache/smol] [--workers N]

Stages, in order (each writes its outputs under ``--cache`` and then a marker
``stages/NAME.json`` with its wall time; a stage with a marker is reused, so a killed run
resumes where it stopped; ``--stage NAME`` reruns that one stage, computing any missing
earlier stage first, and stops there; [module] is where each stage lives):

  base            GGUF -> float32 safetensors checkpoint                         [world]
  splits          split manifest (AdvBench, airt, date task, benign sets)        [world]
  base_answers    the base's greedy answers: benign align prompts, attack split  [world]
  aligned         full fine-tune of base (the safety alignment)                  [world]
  attacked        LoRA of aligned on harmful->compliant + the utility task       [world]
  benign_adapter  LoRA of aligned on the utility task alone                      [world]
  subspace        truncated SVD of D = aligned - base                            [corrections]
  calibration     csulora calibrate: activation statistics of aligned (issue 12) [calibrated]
  tune            csulora tune, defaults (calibrated), attacked + benign adapter [calibrated]
  sweeps          every correction's knob on the *validation* sets               [sweeps]
  select          choose each row's setting from validation                      [sweeps]
  test            every row on the test sets (never used for choices)            [reported]
  salora          SaLoRA adapter trained on the attack data, then tested         [reported]
  full_attacked   full fine-tune of aligned on the attack data (issue 14)        [full]
  full_inputs     subspace and audit for it (statistics: the calibration stage's) [full]
  full_sweeps     every method's dense correction on validation                  [full]
  full_select     each full row's setting, from validation                       [full]
  full_test       the full rows on the test sets                                 [full]
  outputs         smol.json, the table in docs/results.md, the Pareto PNG        [outputs]

Modules: ``pipeline`` (stage runner, cache markers, worker pool), ``world``, ``evaluation``
(sets, variants, cached generations, verdicts, one test row), ``corrections``, ``calibrated``
(the product's path: calibrate, then tune with its defaults), ``sweeps``,
``reported`` (test rows and the issue targets), ``outputs``. Importing the package registers
the stages in the order above.

Everything is seeded and runs on CPU in float32 (``pipeline.RUNS_ON``), so it is deterministic
and its numbers do not depend on the machine having a GPU.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a shared CPU, OpenMP threads that spin while waiting burn the time slices the other
# thread needs; passive waiting lets a descheduled peer catch up. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The stage modules, imported in pipeline order: each registers its stages on import.
from benchmarks.smol import world, corrections, calibrated, sweeps, reported, full, outputs  # noqa: E402,F401,I001
from benchmarks.smol.pipeline import STAGES, Context, Stage, run_pipeline, set_threads, stage_done  # noqa: E402

__all__ = ["STAGES", "Context", "Stage", "run_pipeline", "set_threads", "stage_done"]
