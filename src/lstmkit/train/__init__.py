"""The training application behind ``lstmkit train``, ``lstmkit sample`` and ``lstmkit plot``.

- :mod:`~lstmkit.train.config`: the configuration dataclasses, read strictly;
- :mod:`~lstmkit.train.tasks`: the tasks (``charlm``, ``adding``, ``digits``): data, model, metrics;
- :mod:`~lstmkit.train.loop`: the training loop, single-process or DistributedDataParallel;
- :mod:`~lstmkit.train.checkpoint`: crash-safe checkpoints;
- :mod:`~lstmkit.train.plot`: loss and metric curves;
- :mod:`~lstmkit.train.cli`: the command lines.
"""
