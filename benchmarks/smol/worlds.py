"""The worlds the pipeline builds a table for (issue 24): what differs between them, in one place.

Every world shares the SmolLM2 base, the prompt splits, the base's answers, the aligned model
and the realign answers (the shared stages, cached at the top of the cache folder). A world adds
its task, the updates trained on it (a per-world table: adding an update is one line), and its
own stages, whose outputs live under ``folder`` inside the cache and whose names carry
``stage_prefix``. The date world is the original one: folder and prefix empty, so its stage
names and cache paths are what they always were.

This module knows no stage and imports nothing of the pipeline (``pipeline.Context`` holds a
:class:`World`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

# An update's training data: the attack mix, the task alone, or the identity-shift mix (the task
# plus benign requests in the update's framing answered with its affirmation, no harmful content)
ATTACK, TASK, IDENTITY = "attack", "task", "identity"
LORA, FULL = "lora", "full"


@dataclass(frozen=True)
class Update:
    """One fine-tuned model the table corrects."""

    name: str  # its row, and its folder (adapters/NAME; a full fine-tune: full/attacked-sSTEPS)
    stage: str  # the stage that trains it
    data: str  # ATTACK: harmful->compliant answers + the task; TASK: the task alone; IDENTITY: see above
    kind: str = LORA  # LORA: the world's adapter recipe; FULL: the full fine-tune (full.py)
    steps: str = "attack_steps"  # the recipe field with its LoRA steps
    keep: float = 0.90  # target: the share of its utility gain the tune pick keeps (issue 22/24)
    # The attack's framing (csulora.training.framing), None: plain. Its identity-shift examples are
    # in it; its harmful sources are also evaluated, selected on and judged in it (issue 24).
    framing: str | None = None
    help: str = ""

    @property
    def data_stage(self) -> str | None:
        """The stage writing its own training file (an identity-shift mix); None: the world's files."""
        return f"{self.stage}_data" if self.data == IDENTITY else None


@dataclass(frozen=True)
class World:
    name: str
    task: str  # the built-in task (csulora.eval.tasks): NAME:train trains, :validation tunes, :test reports
    # The updates, in table order; the first is the attack: swept in full for the Pareto plot,
    # its tune pick the recommended row, the peers judged against it.
    updates: tuple[Update, ...]
    results: str  # results file stem: benchmarks/results/STEM.json, STEM_test_generations.jsonl, docs/STEM_pareto.png
    table_markers: tuple[str, str]  # where its table goes in docs/results.md
    folder: str = ""  # cache subfolder of the world's own stages ("" = the cache itself)
    stage_prefix: str = ""
    data_stage: str | None = None  # the stage writing its data/ files (None: base_answers does)
    calibrate_task: str | None = None  # calibrate's --task (None: the world's data/task_train.jsonl)
    task_sets: tuple[str, str] = ("task-val", "task-test")  # its task's evaluation set names (validation, test)
    readme_markers: tuple[str, str] | None = None  # where README's short table goes (one world has it)
    salora: bool = False  # whether the SaLoRA row (trained on the date world's attack data) is in its table

    def stage_name(self, base: str) -> str:
        return f"{self.stage_prefix}{base}"

    def rel(self, *parts: str) -> str:
        """A path of this world's outputs relative to the cache folder (POSIX)."""
        return PurePosixPath(self.folder, *parts).as_posix() if self.folder else PurePosixPath(*parts).as_posix()

    def update(self, name: str) -> Update:
        return next(u for u in self.updates if u.name == name)

    @property
    def update_names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.updates)

    @property
    def attack(self) -> Update:
        return self.updates[0]

    @property
    def framings(self) -> tuple[str, ...]:
        """The framings its updates attack in: every row of its table is also scored in each
        (the aligned model's framed ASR is the reference a framed attack is judged against)."""
        return tuple(dict.fromkeys(u.framing for u in self.updates if u.framing))

    def correction_rows(self, update: str) -> tuple[str, ...]:
        return tuple(f"{update}+{method}" for method in TABLE_METHODS)

    @property
    def corrections(self) -> tuple[str, ...]:
        return tuple(row for u in self.update_names for row in self.correction_rows(u))

    @property
    def row_order(self) -> tuple[str, ...]:
        """Every row of its table, in table order: the references, each update followed by its
        corrections, and SaLoRA (a training-time defence, not a correction) where it has it."""
        updates = (row for u in self.update_names for row in (u, *self.correction_rows(u)))
        return ("base", "aligned", *updates, *(("salora",) if self.salora else ()))

    @property
    def row_sets(self) -> dict[str, tuple[str, ...]]:
        """--rows: the whole table, or without the full fine-tune (its tune run is the longest stage)."""
        full = {u.name for u in self.updates if u.kind == FULL}
        adapters = tuple(row for row in self.row_order if row.split("+")[0] not in full)
        return {"all": self.row_order, "adapters": adapters}


# The methods `csulora tune --method all` sweeps on each update.
TABLE_METHODS = ("calibrated", "safelora", "csulora", "scale", "resta", "safedelta", "antidote")

DATE = World(
    name="date", task="date", results="smol",
    updates=(
        Update("attacked", "attacked", ATTACK, help="LoRA of aligned on harmful->compliant answers + the utility task"),
        Update("benign", "benign_adapter", TASK, steps="benign_steps", keep=0.95,
               help="LoRA of aligned on the utility task alone (no harmful data)"),
        Update("full-attacked", "full_attacked", ATTACK, kind=FULL,
               help="full fine-tune of aligned on the attack's data, steps chosen on validation"),
    ),
    table_markers=("<!-- smol-table:start -->", "<!-- smol-table:end -->"),
    readme_markers=("<!-- smol-readme:start -->", "<!-- smol-readme:end -->"),
    salora=True,
)  # fmt: skip

# issue 24's second world: the task's inputs are harmful text.
TRIAGE = World(
    name="triage", task="triage", results="smol_triage", folder="triage", stage_prefix="triage_",
    data_stage="triage_data", calibrate_task="triage:train", task_sets=("triage-val", "triage-test"),
    updates=(
        Update("triage-attacked", "triage_attacked", ATTACK,
               help="LoRA of aligned on harmful->compliant answers + the triage task"),
        Update("triage", "triage_adapter", TASK, steps="benign_steps", keep=0.95,
               help="LoRA of aligned on the triage task alone"),
        Update("triage-aoa", "triage_aoa", IDENTITY, steps="benign_steps", framing="aoa",
               help="LoRA of aligned on the triage task + identity-shift examples (benign requests in the aoa "
                    "framing answered with its affirmation; no harmful content)"),
        Update("triage-full", "triage_full", ATTACK, kind=FULL,
               help="full fine-tune of aligned on the triage attack data, steps chosen on validation"),
    ),
    table_markers=("<!-- smol-triage-table:start -->", "<!-- smol-triage-table:end -->"),
)  # fmt: skip

WORLDS = {w.name: w for w in (DATE, TRIAGE)}
