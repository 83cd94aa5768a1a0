"""How a recurrence is executed. Every backend exposes ``run`` with the same signature;
:mod:`lstmkit.runner` is the only place that chooses one."""
