"""``csulora calibrate``: the activation statistics of the calibrated correction (docs/design.md §5c).

Once per aligned model and task, run the **aligned** model on two data sets and record, per
target module, the Gram of its inputs on every non-padding token:

- **harmful** (``S_h``): each harmful prompt followed by the aligned model's own greedy
  answer, through the chat template (the positions where the refusal is generated are what
  the induction argument of §5c needs covered);
- **task** (``S_t``): the adapter's training data, prompt + response.

The package, one job a module:

- :mod:`.data`: which prompts and task data, their checks, their tokens;
- :mod:`.answers`: the aligned model's answers, generated once and cached;
- :mod:`.groups`: which modules share an input, so share one Gram;
- :mod:`.statistics`: the Gram sums (upper-triangle strips, float64) and the stored statistics;
- :mod:`.replay`: later passes start from cached hidden states;
- :mod:`.passes`: the memory budget, the passes it asks for, the statistics pass;
- :mod:`.outputs`: the output checked before any work, the file and its run record;
- :mod:`.api`: :func:`calibrate` itself.

A second mode, :func:`calibrate_update` (``csulora calibrate ALIGNED --update UPDATE --pairs FILE``),
runs the **fine-tuned** model (ALIGNED with an adapter, or a full fine-tune) on harmful prompts
followed by harmful answers and writes Antidote's statistics through the same groups, passes and
statistics pass, with no task pass (:mod:`.update_inputs`: what it reads, checked; :mod:`.update`:
the run and its file, role ``update``).
"""

from csulora.references.calibration.api import CalibrationResult, calibrate
from csulora.references.calibration.data import CALIBRATION_MAX_NEW_TOKENS, DEFAULT_HARMFUL_SPECS
from csulora.references.calibration.outputs import run_record_path
from csulora.references.calibration.update import calibrate_update

__all__ = [
    "CALIBRATION_MAX_NEW_TOKENS",
    "DEFAULT_HARMFUL_SPECS",
    "CalibrationResult",
    "calibrate",
    "calibrate_update",
    "run_record_path",
]
