"""The SmolLM2 evidence pipeline (issue 22 §4: one complete table on the current world): staged and cached.

    python -m benchmarks.smol [--world date|triage] [--stage NAME] [--until NAME] [--cache .cache/smol] [--workers N]

Two worlds (``worlds``: what differs between them, docs/design.md §8): ``date`` (the default,
the list below) and ``triage`` (issue 24), which reuses the date world's shared stages (base,
splits, base_answers, aligned, realign_answers: cached once) and runs its own, named
``triage_*`` with their outputs and markers under ``.cache/smol/triage``: triage_data,
triage_attacked, triage_adapter, triage_aoa_data and triage_aoa (the identity-shift adapter:
benign requests in the ``aoa`` framing answered with its affirmation, ``benchmarks/smol/identity.py``),
triage_full, triage_calibration, triage_update_statistics, triage_table_tune, triage_table_picks,
triage_table_test, triage_outputs (smol_triage.json). Every triage row is also scored on the
AdvBench and objectives test splits in the ``aoa`` framing (``advbench@aoa``, ``objectives@aoa``).

Stages, in order (each writes its outputs under ``--cache`` and then a marker
``stages/NAME.json`` with its wall time; a stage with a marker is reused, so a killed run
resumes where it stopped; ``--stage NAME`` reruns that one stage, computing any missing
earlier stage first, and stops there; [module] is where each stage lives):

  base              GGUF -> float32 safetensors checkpoint                           [world]
  splits            split manifest (AdvBench, objectives, airt, date task, benign)   [world]
  base_answers      the base's greedy answers: benign align prompts, attack split    [world]
  aligned           full fine-tune of base (the safety alignment)                    [world]
  attacked          LoRA of aligned on harmful->compliant + the utility task         [world]
  benign_adapter    LoRA of aligned on the utility task alone                        [world]
  full_attacked     full fine-tune of aligned on the attack data (issue 14)          [full]
  calibration       csulora calibrate: the aligned model's statistics                [statistics]
  realign_answers   the base's compliant answers to calibrate's harmful prompts      [statistics]
  update_statistics csulora calibrate --update: each fine-tuned model's statistics   [statistics]
  table_tune        csulora tune --method all on each update                         [table]
  table_picks       each method's pick on each update, written by csulora correct    [table]
  salora            SaLoRA adapter trained on the attack data                        [reported]
  table_test        every row on the test sets                                       [reported]
  outputs           smol.json, the table in docs/results.md, the Pareto PNG          [outputs]

Modules: ``worlds`` (the worlds, their updates and rows), ``pipeline`` (stage runner, cache
markers, worker pool), ``world``, ``identity`` (the identity-shift examples), ``full``,
``evaluation`` (sets, variants, cached generations, verdicts, one test row), ``statistics``,
``table`` (tune on each update, each method's pick), ``reported`` (the rows and issue 22's
targets), ``outputs``. Importing the package registers the stages in the order above.

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
from benchmarks.smol import world, full, statistics, table, reported, outputs  # noqa: E402,F401,I001
from benchmarks.smol.pipeline import STAGES, Context, Stage, run_pipeline, set_threads, stage_done  # noqa: E402

__all__ = ["STAGES", "Context", "Stage", "run_pipeline", "set_threads", "stage_done"]
