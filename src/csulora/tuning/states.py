"""The model states `tune` scores, reached in one loaded model (docs/design.md §5d, §10).

Every state is scored on the same in-memory model, which is loaded once:

- :class:`AdapterStates`: the aligned model, with the uncorrected adapter and each setting (a
  corrected adapter written beforehand into a scratch folder, so a bad input fails before any
  model is loaded) attached with PEFT under their own names; ``disable_adapter`` shows the aligned
  model for the fluency measure;
- :class:`CheckpointStates`: a full fine-tune, loaded once; the aligned reference is its weights
  swapped in, each setting its corrected weights copied in and the fine-tuned ones read back
  afterwards (a candidate folder per setting would be ~14 GB at 7B).

Each ``setting(candidate)`` context yields the state's *aligned view* (how to see the aligned
model in it). Only the chosen setting is written to OUTDIR (:meth:`ModelStates.write_chosen`),
by the correction pipeline itself, so its report and card are complete as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from csulora.tuning.checkpoint import copy_into, corrected_in_memory, weights_from
from csulora.tuning.plan import MethodPlan
from csulora.tuning.scoring import AlignedView

UNCORRECTED = "uncorrected"


@dataclass(frozen=True)
class Candidate:
    """One setting of one method's sweep."""

    plan: MethodPlan
    index: int  # position in the method's grid (weakest first)
    value: float
    folder: Path | None  # the corrected adapter written for it (None: a checkpoint's, applied in memory)
    identity: bool  # the update's own setting: scored once, as the uncorrected update

    @property
    def method(self) -> str:
        return self.plan.config.method

    @property
    def options(self) -> dict[str, Any]:
        return self.plan.config.setting_options(self.value)

    @property
    def state(self) -> str:
        return f"{self.method} {self.plan.config.knob}={self.value:g}"


class ModelStates(ABC):
    """How the sweep reaches each state in one loaded model."""

    model: Any
    update_path: Path

    def __init__(self, update_path: Path, aligned: Path, sources: Mapping[str, Mapping[str, Any]]) -> None:
        self.update_path, self.aligned_path, self.sources = Path(update_path), Path(aligned), sources
        self.model = None

    @abstractmethod
    def load(self, run: Mapping[str, Any]) -> tuple[Any, Any]:
        """Load the one model every state is reached in; (model, tokenizer)."""

    @abstractmethod
    def aligned(self) -> contextlib.AbstractContextManager[AlignedView]:
        """The aligned model."""

    @abstractmethod
    def uncorrected(self) -> contextlib.AbstractContextManager[AlignedView]:
        """The update as it is."""

    @abstractmethod
    def setting(self, candidate: Candidate) -> contextlib.AbstractContextManager[AlignedView]:
        """One corrected setting."""

    def prepare(self, candidates: Sequence[Candidate], scratch: Path, progress: bool) -> list[Candidate]:
        """The candidates, with whatever must exist before the model is loaded."""
        return list(candidates)

    def cache_files(self, candidate: Candidate | None) -> Path | None | bool:
        """The adapter folder a state's score cache key reads (``candidate`` None: the update itself);
        False: a state with no files of its own (applied in memory), never cached."""
        return False

    def kwargs(self, candidate: Candidate) -> dict[str, Any]:
        """The correction's sources (``aligned`` always) and the setting's options."""
        return {**self.sources[candidate.method], "aligned": self.aligned_path, **candidate.options}

    def write_chosen(self, candidate: Candidate, staging: Path) -> None:
        """Correct the update with the chosen setting straight into OUTDIR's staging folder."""
        from csulora.pipeline.api import write_correction
        from csulora.pipeline.correction import open_correction
        from csulora.pipeline.options import SourcePaths

        options = self.kwargs(candidate)
        # Every source SourcePaths knows (update_statistics included), the rest are the method's options.
        paths = SourcePaths(**{f.name: options.pop(f.name, None) for f in dataclasses.fields(SourcePaths)})
        with ExitStack() as stack:
            correction = open_correction(stack, self.update_path, candidate.method, paths=paths,
                                         method_options=options, progress=False)  # fmt: skip
            write_correction(correction, staging, input_spec=self.update_path, aligned_spec=paths.aligned)


class AdapterStates(ModelStates):
    """An adapter's states: the aligned model loaded once, adapters attached with PEFT by name."""

    def load(self, run: Mapping[str, Any]) -> tuple[Any, Any]:
        from csulora.io.modeling import load_model

        self.model, tokenizer = load_model(self.aligned_path, device=run["device"], dtype=run["dtype"])
        self._settings = 0
        return self.model, tokenizer

    @contextmanager
    def aligned(self) -> Iterator[AlignedView]:
        yield contextlib.nullcontext

    @contextmanager
    def uncorrected(self) -> Iterator[AlignedView]:
        from csulora.io.modeling import attach_adapter

        self.model = attach_adapter(self.model, self.update_path, adapter_name=UNCORRECTED, model_dir=self.aligned_path)
        self.model.eval()
        yield self.model.disable_adapter  # stays attached: the settings sit beside it

    @contextmanager
    def setting(self, candidate: Candidate) -> Iterator[AlignedView]:
        if candidate.folder is None:  # a method with only a dense form: its correction applied in memory
            with self._dense_setting(candidate) as view:
                yield view
            return
        name = f"setting-{self._settings:03d}"
        self._settings += 1
        self.model.load_adapter(str(candidate.folder), adapter_name=name)
        self.model.set_adapter(name)
        self.model.eval()
        try:
            yield self.model.disable_adapter
        finally:
            self.model.set_adapter(UNCORRECTED)
            self.model.delete_adapter(name)

    @contextmanager
    def _dense_setting(self, candidate: Candidate) -> Iterator[AlignedView]:
        """The aligned model with ``W_aligned + X`` on the adapter's modules (adapters off); its aligned
        view reads the aligned weights back, then puts the setting's in again."""
        with self.model.disable_adapter():
            base = self.model.get_base_model()
            with corrected_in_memory(base, self.update_path, candidate.method, restore_from=self.aligned_path,
                                     **self.kwargs(candidate)) as correction:  # fmt: skip

                @contextmanager
                def aligned_view() -> Iterator[None]:
                    with weights_from(base, self.aligned_path, restore_from=self.aligned_path):
                        yield
                    copy_into(base, correction.weights(), source=self.update_path)  # the setting again

                yield aligned_view

    def prepare(self, candidates: Sequence[Candidate], scratch: Path, progress: bool) -> list[Candidate]:
        """Every setting as a corrected adapter, before any model is loaded (bad inputs fail early);
        a dense-only method's settings are corrected in memory when scored (their output is no LoRA)."""
        from dataclasses import replace

        from csulora.methods.registry import get_method
        from csulora.pipeline.api import correct_adapter

        written = []
        for candidate in tqdm(candidates, desc="write settings", unit="setting", disable=None if progress else True):
            if not get_method(candidate.method).has_factored_form:
                written.append(candidate)
                continue
            folder = scratch / f"{candidate.method}-{candidate.index:02d}"
            options = {**self.sources[candidate.method], **candidate.options}
            correct_adapter(self.update_path, folder, candidate.method, progress=False, **options)
            written.append(replace(candidate, folder=folder))
        return written

    def cache_files(self, candidate: Candidate | None) -> Path | None | bool:
        if candidate is None:
            return self.update_path
        return candidate.folder if candidate.folder is not None else False


class CheckpointStates(ModelStates):
    """A full fine-tune's states: its weights loaded once; the aligned model and each setting
    swapped in and out. The aligned view swaps the aligned weights in, then the state's back.
    Its settings have no files of their own, so they are never cached."""

    def load(self, run: Mapping[str, Any]) -> tuple[Any, Any]:
        from csulora.io.modeling import load_model

        self.model, tokenizer = load_model(self.update_path, device=run["device"], dtype=run["dtype"])
        return self.model, tokenizer

    def _aligned_weights(self) -> contextlib.AbstractContextManager[None]:
        return weights_from(self.model, self.aligned_path, restore_from=self.update_path)

    @contextmanager
    def aligned(self) -> Iterator[AlignedView]:
        with self._aligned_weights():
            yield contextlib.nullcontext

    @contextmanager
    def uncorrected(self) -> Iterator[AlignedView]:
        yield self._aligned_weights

    @contextmanager
    def setting(self, candidate: Candidate) -> Iterator[AlignedView]:
        with corrected_in_memory(self.model, self.update_path, candidate.method, **self.kwargs(candidate)) as correction:

            @contextmanager
            def aligned_view() -> Iterator[None]:
                with self._aligned_weights():
                    yield
                copy_into(self.model, correction.weights(), source=self.update_path)  # the setting again

            yield aligned_view

