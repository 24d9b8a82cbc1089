"""Measuring safety and utility (docs/design.md §7): prompt sets, generation, judges, metrics.

Public API (import from the submodules):

Prompt sets — :mod:`csulora.eval.prompts`, :mod:`csulora.eval.splits`, :mod:`csulora.eval.tasks`,
:mod:`csulora.eval.triage`
    ``Prompt(id, text, source, category, split)``
    ``load_prompts(spec) -> list[Prompt]``  SPEC: ``advbench[:align|attack|validation|test]``,
    ``objectives[:validation|test]``, ``airt[:val|test]``, ``benign[:validation|test]``, ``FILE.txt``,
    ``FILE.csv:COLUMN``, ``FILE.jsonl[:FIELD]``; ``named_sources(specs)``: harmful sources by name
    (:mod:`csulora.eval.specs`, defaults ``DEFAULT_TEST_HARMFUL`` for eval, ``DEFAULT_HARMFUL`` for tune)
    ``load_advbench()``, ``load_airt()``, ``load_benign()``, ``load_prompt_file(path, column=, field=)``
    ``advbench_split(name)``, ``airt_split("airt-val"|"airt-test")``, ``ensure_manifest(path)``
    ``date_task(split) -> list[{"id","prompt","response"}]``, ``load_task(spec)`` (``date:SPLIT``,
    ``triage:SPLIT`` or a JSONL file); the triage task (:mod:`csulora.eval.triage`):
    ``triage_task(split)``, ``label_match(answer, gold)`` (its utility)

Generation and scoring — :mod:`csulora.eval.generation`, :mod:`csulora.eval.margin`
    ``generate_responses(model, tokenizer, prompts, *, batch_size=32, max_new_tokens=64, progress=True,
    framing=None)``
    ``refusal_margin(model, tokenizer, prompts)``, ``mean_response_logprob(model, tokenizer, items)``

Judges and metrics — :mod:`csulora.eval.judges`, :mod:`csulora.eval.metrics`
    ``Judge`` protocol (``name``, ``kind``, ``judge(prompts, responses) -> list[bool]``)
    ``asr_judge()`` (the project's ASR judge, docs/design.md §7, docs/judge.md), ``KeywordJudge``
    (its first part, the GCG list), ``RefusalJudge`` (over-refusal, docs/design.md §10)
    ``rescore_generations(path, judge, sets=None, out_path=None)``
    ``rate(flags) -> Rate(value, ci, n)``, ``bootstrap_ci(values)``, ``exact_match(pred, ref)``

Harness — :mod:`csulora.eval.harness`
    ``EvalSets(harmful={source: prompts}, benign, task, framings)`` /
    ``EvalSets.from_specs([spec, ...], benign=, task=, framing=)``: a harmful ``SPEC@FRAMING`` is
    that source in a framing (:mod:`csulora.training.framing`, e.g. ``advbench:test@aoa``)
    ``evaluate_model(model_dir, adapter, sets, *, name, params=None, ...) -> (row, records)``
    ``evaluate_loaded(model, tokenizer, sets, *, name, ...) -> (row, records)``
    ``row_from_generations(records, name, ...)``, ``results_row(name, asr=..., ...)``
    ``write_results(out_dir, rows, records, extra=None)``, ``run_eval(...)`` (the CLI)

Rows follow docs/design.md §10: name, harmful (per source: asr, asr_ci, n, empty_rate),
utility, utility_ci, over_refusal, over_refusal_ci, margin, params, recommended (+ ``n``, the
utility's and over-refusal's sample sizes), benign_short_answer_rate
(``harmful_empty_rate(responses)``, ``benign_short_answer_rate(responses)`` in metrics).
"""
