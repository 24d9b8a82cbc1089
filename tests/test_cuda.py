"""The package on a CUDA device: what CPU-only CI cannot check (skipped without CUDA).

The product's defaults pick CUDA when present (docs/design.md §10, ``modeling.resolve_device``),
so the paths a GPU user takes are checked against the CPU's on the tiny world:

- the calibration statistics: float32 products on CUDA equal the CPU's; bfloat16 products (the
  default for a bf16 model on CUDA, docs/design.md §5c) stay within bf16 rounding of them;
- ``csulora calibrate`` end to end on CUDA, its metadata naming the device;
- ``tune`` of the calibrated method on CUDA picks a setting and writes a loadable adapter;
- a corrected adapter's logits on CUDA equal the CPU's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from csulora.references.calibration import calibrate
from csulora.references.calibration.data import target_modules
from csulora.references.calibration.groups import linear_modules, shared_input_groups
from csulora.references.calibration.statistics import accumulate_sums, full_sum
from csulora.eval.prompts import load_requests
from csulora.eval.tasks import date_task
from csulora.io.calibration_file import load_calibration
from csulora.io.modeling import load_model
from csulora.training.data import chat_prompt_ids, response_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda_data")
    harmful = root / "harmful.txt"
    harmful.write_text("\n".join(p.text for p in load_requests()[:N]) + "\n")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": i["prompt"], "response": i["response"]}) + "\n"
                            for i in date_task("train")[:N]))  # fmt: skip
    return {"root": root, "harmful": harmful, "task": task}


def task_examples(tokenizer, task: Path) -> list[dict]:
    pairs = [json.loads(line) for line in task.read_text().splitlines()]
    return [{"input_ids": chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"])} for p in pairs]


def gram_sums(aligned: Path, examples: list[dict], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model, tokenizer = load_model(aligned, device=device, dtype=dtype)
    linears = linear_modules(model, target_modules(aligned, None), aligned)
    groups = shared_input_groups(model, linears, examples[0]["input_ids"][:8])
    sums = accumulate_sums(model, examples, groups, linears, pad_id=tokenizer.pad_token_id, batch_size=4,
                           product_dtype=dtype, progress=False)  # fmt: skip
    return {name: full_sum(total).cpu() for name, total in sums.items()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_gram_sums_on_cuda_equal_the_cpu_ones(tiny_world, tiny_tokenizer, data):
    examples = task_examples(tiny_tokenizer, data["task"])
    cpu = gram_sums(tiny_world.aligned, examples, "cpu", torch.float32)
    cuda = gram_sums(tiny_world.aligned, examples, "cuda", torch.float32)
    half = gram_sums(tiny_world.aligned, examples, "cuda", torch.bfloat16)
    assert cpu.keys() == cuda.keys() == half.keys()
    for name in cpu:
        assert cuda[name].dtype == torch.float64  # float64 sums whatever the products' dtype
        assert relative_error(cuda[name], cpu[name]) < 1e-5, name
        # bf16 activations (8 mantissa bits) and bf16 products: a few parts in a thousand.
        assert relative_error(half[name], cpu[name]) < 3e-2, name


@pytest.fixture(scope="module")
def cuda_calibration(tiny_world, data):
    return calibrate(tiny_world.aligned, data["root"] / "cuda.safetensors", task=data["task"],
                     harmful=[str(data["harmful"])], max_new_tokens=16, batch_size=4, device="cuda",
                     dtype="float32", progress=False)  # fmt: skip


def test_calibrate_runs_on_cuda_and_says_so(cuda_calibration):
    file = load_calibration(cuda_calibration.path)
    assert file.info["device"] == "cuda" and file.info["products"] == "float32"
    module = file.module("model.layers.0.mlp.down_proj")
    assert torch.isfinite(module.harmful.matrix).all() and torch.isfinite(module.task.matrix).all()
    assert cuda_calibration.harmful_tokens > 0 and cuda_calibration.task_tokens > 0


def test_tune_scores_its_settings_on_cuda(tiny_world, data, cuda_calibration, tmp_path):
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.runner import tune_adapter

    result = tune_adapter(tiny_world.attacked, tmp_path / "tuned", aligned=tiny_world.aligned,
                          calibration=cuda_calibration.path, config=TuneConfig(method="calibrated", grid=(0.0, 30.0)),
                          harmful=[str(data["harmful"])], task=str(data["task"]), device="cuda",
                          progress=False)  # fmt: skip
    assert result.record["inputs"]["device"] == "cuda"
    scored = result.record["settings"]
    assert [s["value"] for s in scored] == [0.0, 30.0][: len(scored)] and scored
    assert all(s["scores"] for s in scored)
    # The tiny world has no qualifying setting (README); an adapter is written exactly when one qualifies.
    assert ((tmp_path / "tuned" / "adapter_model.safetensors").exists()) == result.qualified


def test_a_calibrated_adapter_has_the_same_logits_on_cuda_and_cpu(tiny_world, cuda_calibration, tmp_path):
    from peft import PeftModel

    from csulora.pipeline.api import correct_adapter

    out = tmp_path / "corrected"
    correct_adapter(tiny_world.attacked, out, "calibrated", calibration=cuda_calibration.path, progress=False,
                    strength=30.0)  # fmt: skip
    ids = torch.tensor([[1, 5, 9, 4, 7, 2]])
    logits = {}
    for device in ("cpu", "cuda"):
        model, _ = load_model(tiny_world.aligned, device=device, dtype="float32", merge=False)
        peft = PeftModel.from_pretrained(model, str(out)).eval()
        with torch.no_grad():
            logits[device] = peft(input_ids=ids.to(device)).logits.float().cpu()
    assert torch.allclose(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-4)
