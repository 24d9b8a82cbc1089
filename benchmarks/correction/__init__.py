"""The correction benchmark: speed and private memory of csulora's corrections on a
synthetic 7B-shaped base/aligned pair (docs/benchmarks.md).

- :mod:`~benchmarks.correction.synth`: writes the pair and a PEFT adapter by streaming;
- :mod:`~benchmarks.correction.cases`: what one case does, run in its own interpreter;
- :mod:`~benchmarks.correction.memory`: ``RssAnon`` sampled from ``/proc``;
- :mod:`~benchmarks.correction.process`: one case in a child process, sampled from outside;
- :mod:`~benchmarks.correction.summary`: ratios, targets and tables from the runs;
- :mod:`~benchmarks.correction.cli`: the command, ``python -m benchmarks.correction``.
"""
