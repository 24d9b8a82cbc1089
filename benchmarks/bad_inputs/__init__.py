"""The bad-input runner (issue 23): every command of the CLI fed every kind of bad input.

    PYTHONPATH=src .venv/bin/python -m benchmarks.bad_inputs            # every case, whole processes
    PYTHONPATH=src .venv/bin/python -m benchmarks.bad_inputs --fast     # the quick subset, in-process
    PYTHONPATH=src .venv/bin/python -m benchmarks.bad_inputs --only correct/

It drives ``python -m csulora ...`` (or :func:`csulora.cli.main` in-process with ``--fast``)
on copies of the tiny world (:mod:`benchmarks.bad_inputs.inputs`) through each case of
:mod:`benchmarks.bad_inputs.cases`: for every command (subspace, audit, correct, calibrate,
tune, eval, train, demo) at least one case per error class -- missing, empty, corrupt, wrong
kind, wrong model, NaN, out-of-range knob, existing output, output onto or inside an input,
unwritable output, interrupt (SIGINT and SIGTERM a running command) -- plus every case of
issue 23. Each case checks (:mod:`benchmarks.bad_inputs.run`):

- the exit code (2 for bad input, 130/143 for SIGINT/SIGTERM, 0 where the case must succeed);
- the message: one line ``csulora COMMAND: error: ...`` last on stderr, no traceback;
- every input's bytes unchanged (every file under every input hashed before and after), and
  nothing left beside the output (no staging, no probe, no half-written output).

A case whose fix belongs to another package (the correction pipeline, tune, calibrate) carries
``owner`` and the reason: it is an expected failure, counted apart, and reported as
``unexpected pass`` once fixed, so the owner can drop the mark. The result, one record per
case (expected, got, pass/fail), goes to ``benchmarks/results/bad_inputs.json``.
"""
