"""``lstmkit bench``: time lstmkit against ``torch.nn.LSTM`` and a naive per-step LSTM.

- :mod:`~lstmkit.bench.naive`: the deliberately naive baseline, "what a user would write".
- :mod:`~lstmkit.bench.measure`: the interleaved timer and the saved-for-backward counter.
- :mod:`~lstmkit.bench.suite`: the configurations and the run over them.
- :mod:`~lstmkit.bench.report`: the printed table and ``bench.json`` / ``.md`` / ``.png``.
- :mod:`~lstmkit.bench.cli`: the ``bench`` subcommand's arguments and entry point.
"""
