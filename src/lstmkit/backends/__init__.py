"""How a recurrence is executed. Every backend keeps one contract
(:class:`lstmkit.backends.contract.Backend`: ``supports``, ``refusal``, ``run``);
:mod:`lstmkit.runner` is the only place that chooses one."""
