"""``nn.Module``\\ s that hold parameters and compose layers and directions.

A module never computes a gate: :class:`LSTMCell` calls :mod:`lstmkit.cells`, and
:class:`LSTM` loops over layers and directions, handing each layer-direction to
:func:`lstmkit.runner.run_layer`, which owns the loop over time.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstmkit import cells, runner
from lstmkit import validation as check
from lstmkit.state import LSTMState, detach_state

# the constructor arguments of torch.nn.LSTM after its two sizes, which lstmkit.LSTM shares
SHARED_OPTIONS = ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")


def _initialise(module: nn.Module, kinds: dict[str, str], hidden_size: int) -> None:
    """``torch.nn.LSTM``'s initialisation for every ``"uniform"`` parameter,
    U(-1/sqrt(H), 1/sqrt(H)), drawn in registration order so that the same seed gives the same
    weights; ``"ones"`` and ``"zeros"`` parameters are filled."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, kind in kinds.items():
            weight = getattr(module, name)
            if kind == "uniform":
                weight.uniform_(-bound, bound)
            else:  # the kinds were checked with the cell (validation.INIT_KINDS)
                weight.fill_({"ones": 1.0, "zeros": 0.0}[kind])


class LSTMCell(nn.Module):
    r"""One LSTM step, a drop-in for ``torch.nn.LSTMCell``.

    Computes :func:`lstmkit.cells.lstm_step`:

    .. math::
        (i, f, g, o) &= (\sigma, \sigma, \tanh, \sigma)(W_{ih} x + b_{ih} + W_{hh} h + b_{hh}) \\
        c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c')

    Args:
        input_size: I, features of the input ``x``.
        hidden_size: H, features of the hidden and cell state.
        bias: if ``False``, no ``bias_ih`` / ``bias_hh``. Default ``True``.
        device, dtype: where and in which dtype to create the parameters.

    Inputs: ``input, (h_0, c_0)``
        - ``input``: ``(N, I)`` or unbatched ``(I)``.
        - ``h_0``, ``c_0``: ``(N, H)`` or ``(H)``; zeros when ``hx`` is omitted.

    Outputs: ``(h_1, c_1)``, each ``(N, H)`` or ``(H)``.

    Parameters, named, shaped and initialised as in ``torch.nn.LSTMCell``:
    ``weight_ih`` ``(4H, I)``, ``weight_hh`` ``(4H, H)``, ``bias_ih`` and ``bias_hh`` ``(4H)``,
    gate blocks in the order (i, f, g, o), all drawn from U(-1/sqrt(H), 1/sqrt(H)).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # what torch.nn.LSTMCell takes: sizes with __index__, any truth value as bias
        self.input_size = check.check_positive_int("input_size", input_size, any_index=True)
        self.hidden_size = check.check_positive_int("hidden_size", hidden_size, any_index=True)
        self.bias = check.check_truth("bias", bias)
        check.check_factory(device, dtype)
        factory = {"device": device, "dtype": dtype}
        gates = 4 * self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, self.input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, self.hidden_size, **factory))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _initialise(
            self, {name: "uniform" for name, _ in self.named_parameters()}, self.hidden_size
        )

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}"

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        x = check.check_input("input", input, (1, 2), self.input_size, self.weight_ih)
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        shape = (x.size(0), self.hidden_size) if batched else (self.hidden_size,)
        if hx is None:
            h = c = x.new_zeros(x.size(0), self.hidden_size)
        else:
            what = "for batched input" if batched else "for unbatched input"
            h, c = check.check_hx(hx, shape, shape, input, what)
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        xp = cells.project_input(x, self.weight_ih, self.bias_ih, self.bias_hh)  # (N, 4H)
        h, c = cells.lstm_step(xp, h, c, self.weight_hh)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


class LSTM(nn.Module):
    r"""A multi-layer LSTM, a drop-in for ``torch.nn.LSTM``, written on tensor operations.

    Every layer and direction applies :func:`lstmkit.cells.lstm_step` at each time step:

    .. math::
        (i_t, f_t, g_t, o_t) &= (\sigma, \sigma, \tanh, \sigma)
            (W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \tanh(c_t) \quad (\text{times } W_{hr} \text{ if } proj\_size > 0)

    Layer ``k > 0`` takes the (direction-concatenated) output of layer ``k - 1`` as its
    input, after dropout with probability ``dropout`` in training mode.

    Shape legend: N = batch size, L = sequence length, D = 2 if bidirectional else 1,
    H_in = ``input_size``, H_cell = ``hidden_size``, H_out = ``proj_size`` if it is > 0 else
    ``hidden_size``.

    Args:
        input_size: H_in.
        hidden_size: H_cell, features of the cell state (and of h without projection).
        num_layers: stacked layers. Default 1.
        bias: if ``False``, no ``bias_ih`` / ``bias_hh`` parameters. Default ``True``.
        batch_first: input and output are ``(N, L, *)`` instead of ``(L, N, *)``; the state
            ``(h, c)`` is never batch-first. Default ``False``.
        dropout: dropout probability on the outputs of every layer but the last, applied in
            training mode only. Default 0.
        bidirectional: run a second, reversed direction in every layer. Default ``False``.
        proj_size: if > 0, an LSTM with projections (LSTMP): ``h_t = W_hr h_t``, of size
            ``proj_size``, which must be smaller than ``hidden_size``. Default 0.
        device, dtype: where and in which dtype to create the parameters.

    Keyword-only options (lstmkit only):
        cell: ``"lstm"`` (default, the equations above), ``"layernorm"`` (Ba et al. 2016),
            ``"peephole"`` (Gers & Schmidhuber 2000), ``"cifg"`` (coupled input-forget gate,
            Greff et al. 2017; three gate blocks), or your own :class:`lstmkit.cells.Cell`
            instance. Each cell's equations and extra parameters are in
            :mod:`lstmkit.cells`; extra parameters follow the same ``_l{k}`` / ``_reverse``
            suffixes.
        forget_bias: added to the forget-gate block of every ``bias_ih`` at initialisation
            (Jozefowicz et al. 2015 recommend 1). Default 0, which keeps nn.LSTM's weights.
        recurrent_dropout: variational dropout of ``h_{t-1}`` before the recurrent product
            (Gal & Ghahramani 2016): one mask per sequence, the same at every step. Training
            only. In [0, 1), default 0.
        weight_drop: DropConnect on ``weight_hh`` (AWD-LSTM, Merity et al. 2018): one mask per
            forward pass, applied to a copy; the parameter itself is never replaced. Training
            only. In [0, 1), default 0.
        zoneout: probability that a unit keeps its previous value at a step (Krueger et al.
            2017), one float for both ``h`` and ``c`` or a pair ``(p_h, p_c)``; in evaluation
            every unit moves by the expectation ``p * old + (1 - p) * new``. Default 0.
        backend: how the loop over time runs: ``"auto"`` (default: ``"triton"`` for CUDA
            tensors where it can run the layer, ``"native"`` for CPU tensors where it can,
            else ``"fused"`` where it supports the cell and regularisers, else
            ``"reference"``), ``"native"`` (the time loop in C++ as custom operators, CPU,
            float32/float64, the plain cell without in-loop regularisers; see
            :func:`lstmkit.native_available`), ``"fused"`` (one autograd Function per
            layer-direction with a hand-written backward), ``"triton"`` (persistent Triton
            kernels on the GPU, ``docs/gpu.md``; a ValueError at the call where it cannot run
            the layer) or ``"reference"`` (the per-step autograd loop that is the oracle). May
            be changed on an existing module (``model.backend = "reference"``; an unknown name
            is a ValueError there and then).

    Inputs: ``input, hx=None, *, lengths=None``
        - ``input``: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, unbatched
          ``(L, H_in)``, or a ``PackedSequence`` (sorted or not).
        - ``hx``: a tuple ``(h_0, c_0)`` of ``(D * num_layers, N, H_out)`` and
          ``(D * num_layers, N, H_cell)`` (no N for unbatched input); zeros when omitted.
        - ``lengths`` (lstmkit only): ``(N,)`` valid length of each padded sequence, in
          ``[1, L]``. Steps past a length neither change that sequence's state nor produce
          output, and the reverse direction starts at each sequence's own last valid step,
          exactly as with a ``PackedSequence`` but without packing.

    Outputs: ``output, (h_n, c_n)``
        - ``output``: ``(L, N, D * H_out)`` (batch-first if asked; a ``PackedSequence`` for a
          packed input); zero at padded steps when lengths are given.
        - ``h_n``: ``(D * num_layers, N, H_out)``, ``c_n``: ``(D * num_layers, N, H_cell)``,
          the state after each sequence's last valid step, ordered layer by layer, forward
          direction before reverse (row ``2k + 1`` is layer ``k``'s reverse direction).

    Errors: a bad argument or input raises a ``TypeError`` or ``ValueError`` that names it; where
    ``torch.nn.LSTM`` raises another class for the same mistake (a ``RuntimeError`` for an
    ``hx`` of the wrong shape), it is an instance of that class too (:mod:`lstmkit.validation`).
    A custom ``cell`` is checked when the model is built and what its ``step`` returns at every
    step.

    Trap: for a bidirectional LSTM ``h_n`` is *not* ``output[-1]``. The reverse direction
    finishes at time step 0, so its final state is ``output[0, :, H_out:]``; only the forward
    half of ``output[-1]`` equals ``h_n[-2]``.

    Parameters (per layer ``k``; suffix ``_reverse`` for the reverse direction), named,
    shaped, ordered and initialised exactly as in ``torch.nn.LSTM``, so ``state_dict`` moves
    between the two with ``strict=True`` and the same seed gives the same weights:
    ``weight_ih_l{k}`` ``(4H_cell, H_in or D*H_out)``, ``weight_hh_l{k}`` ``(4H_cell, H_out)``,
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``(4H_cell)``, ``weight_hr_l{k}`` ``(H_out, H_cell)``
    (only with ``proj_size > 0``); all U(-1/sqrt(H_cell), 1/sqrt(H_cell)).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        cell: str | cells.Cell = "lstm",
        forget_bias: float = 0.0,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.input_size = check.check_positive_int("input_size", input_size)
        self.hidden_size = check.check_positive_int("hidden_size", hidden_size)
        # torch.nn.LSTM takes num_layers with __index__ and any truth value as bidirectional
        self.num_layers = check.check_positive_int("num_layers", num_layers, any_index=True)
        self.bias = check.check_bool("bias", bias)
        self.batch_first = check.check_bool("batch_first", batch_first)
        self.dropout = check.check_probability("dropout", dropout)
        self.bidirectional = check.check_truth("bidirectional", bidirectional)
        self.proj_size = check.check_proj_size(proj_size, self.hidden_size)
        check.check_factory(device, dtype)
        self.cell = check.check_cell(cell, cells.CELLS)
        self.forget_bias = check.check_real("forget_bias", forget_bias)
        zoneout_h, zoneout_c = check.check_pair("zoneout", zoneout)
        self.regularizers = runner.Regularizers(
            recurrent_dropout=check.check_rate("recurrent_dropout", recurrent_dropout),
            weight_drop=check.check_rate("weight_drop", weight_drop),
            zoneout_h=check.check_rate("zoneout (for h)", zoneout_h),
            zoneout_c=check.check_rate("zoneout (for c)", zoneout_c),
        )
        self.backend = backend  # checked by the property
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: it is applied between "
                "layers only",
                stacklevel=2,
            )
        if self.forget_bias and (not bias or self.cell.forget_gate is None):
            raise ValueError(
                f"forget_bias={forget_bias} needs bias=True and a cell with a forget gate, "
                f"got bias={bias} and cell={self.cell.name!r}"
            )
        factory = {"device": device, "dtype": dtype}
        input_size, hidden_size, proj_size = self.input_size, self.hidden_size, self.proj_size
        directions = 2 if self.bidirectional else 1
        out_size = proj_size or hidden_size
        gates = self.cell.gates * hidden_size
        self._init: dict[str, str] = {}  # parameter name -> "uniform" | "ones" | "zeros"
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(self.num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                # torch.nn.LSTM's parameters, in its order, then the cell's own
                shapes = {
                    "weight_ih": ((gates, layer_input), "uniform"),
                    "weight_hh": ((gates, out_size), "uniform"),
                }
                if bias:
                    shapes |= {"bias_ih": ((gates,), "uniform"), "bias_hh": ((gates,), "uniform")}
                if proj_size:
                    shapes |= {"weight_hr": ((proj_size, hidden_size), "uniform")}
                for kind, (_, init) in self.cell.extra.items():
                    shape = check.check_extra_shape(self.cell, kind, hidden_size, out_size)
                    shapes[kind] = (shape, init)
                names = []
                for kind, (shape, init) in shapes.items():
                    names.append(kind + suffix)
                    setattr(self, names[-1], nn.Parameter(torch.empty(shape, **factory)))
                    self._init[names[-1]] = init
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()
        runner.prepare(self.backend, self.cell, self.weight_ih_l0.device)

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation (U(-1/sqrt(H), 1/sqrt(H)), drawn in registration order),
        the cell's extra parameters as it declares, then ``forget_bias`` on ``bias_ih``."""
        _initialise(self, self._init, self.hidden_size)
        if self.forget_bias:
            with torch.no_grad():
                for names in self._all_weights:
                    bias = getattr(self, names[2])  # bias_ih of the layer-direction
                    bias.view(self.cell.gates, -1)[self.cell.forget_gate] += self.forget_bias

    @property
    def backend(self) -> str:
        """How the loop over time runs (see the class docstring); may be set on an existing
        model, and is checked when it is."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        # nn.Module.__setattr__ hands a plain value to object.__setattr__, so this runs
        self._backend = check.check_choice("backend", value, runner.BACKEND_NAMES)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters per layer-direction, in ``torch.nn.LSTM``'s order."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op kept for ``torch.nn.LSTM`` compatibility: lstmkit reads each parameter
        where it is and never needs them in one contiguous buffer."""

    @classmethod
    def from_torch(
        cls,
        module: nn.LSTM,
        *,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        backend: str = "auto",
    ) -> LSTM:
        """An ``LSTM`` computing what the ``torch.nn.LSTM`` ``module`` computes: its sizes,
        options, device, dtype, training mode and a copy of its weights, plus lstmkit's
        keyword-only options that add no parameters (see the class docstring). Building it
        does not move the caller's random stream. The way there: :func:`lstmkit.to_torch`.

        Raises:
            TypeError: ``module`` is not a ``torch.nn.LSTM``.
        """
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"module must be a torch.nn.LSTM, got {type(module).__name__}")
        weight = module.weight_ih_l0
        with torch.random.fork_rng(devices=[]):
            model = cls(
                module.input_size,
                module.hidden_size,
                **{name: getattr(module, name) for name in SHARED_OPTIONS},
                device=weight.device,
                dtype=weight.dtype,
                recurrent_dropout=recurrent_dropout,
                weight_drop=weight_drop,
                zoneout=zoneout,
                backend=backend,
            )
        model.load_state_dict(module.state_dict())
        return model.train(module.training)

    def __prepare_scriptable__(self) -> LSTM:
        """Called by ``torch.jit.script`` before it compiles the module: refuse clearly."""
        raise RuntimeError(
            "torch.jit.script cannot compile lstmkit.LSTM (its backends, cells and options "
            "are Python objects TorchScript does not support); use torch.compile(model), "
            "torch.export.export(model, (x,)) or torch.jit.trace(model, (x,)) instead"
        )

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "proj_size": 0,
            "cell": cells.CELLS["lstm"],
            "forget_bias": 0.0,
            "regularizers": runner.Regularizers(),
            "backend": "auto",
        }
        for name, default in defaults.items():
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text

    def _infer_stack(
        self, x: Tensor, h0: Tensor, c0: Tensor, layers: list[cells.Params], directions: int = 1
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """:func:`lstmkit.runner.infer_stack` for this stack on ``x`` (``(T, N, H_in)``), its
        layer-directions' parameters ``layers``, or ``None`` where its layers go one by one (it
        declines, or dropout between layers has masks to draw)."""
        if self._dropout_between_layers():
            return None
        return runner.infer_stack(
            x,
            h0,
            c0,
            layers,
            cell=self.cell,
            backend=self.backend,
            regularizers=self.regularizers,
            training=self.training,
            directions=directions,
        )

    def _infer_whole(
        self, input: object, hx: object, one_step: bool = False
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """:func:`lstmkit.runner.infer_whole` for ``forward(input, hx)`` (or ``step``) of this
        unidirectional stack where it draws no masks: its result, or ``None`` where the full
        path runs."""
        return runner.infer_whole(
            input,
            hx,
            self._parameters,
            self._all_weights,
            sizes=(self.input_size, self.hidden_size, self.proj_size or self.hidden_size),
            batch_first=self.batch_first,
            one_step=one_step,
            cell=self.cell,
            backend=self._backend,
            regularizers=self.regularizers,
        )

    def _plain_inference(self) -> bool:
        """Whether a forward now may be plain inference, as far as the module tells at little
        cost: a unidirectional stack that draws no masks (evaluation mode, or training mode
        without regularisers or dropout between layers) and whose first weight wants no
        gradient. The C++ entry (:meth:`_infer_whole`) asks the rest of every tensor; this
        spares training's forwards its call (1.2% of an S training step at 1 thread)."""
        if self.bidirectional:
            return False
        if self._dropout_between_layers() or runner.draws_masks(self.regularizers, self.training):
            return False
        weight = self._parameters.get("weight_ih_l0")
        return not torch.is_grad_enabled() or (weight is not None and not weight.requires_grad)

    def _dropout_between_layers(self) -> bool:
        """Whether a forward pass now drops out the outputs between layers."""
        return self.training and self.dropout > 0 and self.num_layers > 1

    def _layer_params(self, layer: int, direction: int) -> dict[str, Tensor | None]:
        """The parameters of one layer-direction by name without suffix, ``None`` where
        absent."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        # registered parameters straight from the registry; anything else (a parametrization's
        # property, a plain tensor attribute, or nothing) as attribute lookup finds it.
        # Module.__getattr__ alone costs ~1 us a name, and raises for every absent one.
        registered = self._parameters
        params = {}
        for kind in (*cells.NN_PARAMETERS, *self.cell.extra):
            name = kind + suffix
            params[kind] = registered[name] if name in registered else self._attribute(name)
        return params

    def _attribute(self, name: str) -> Tensor | None:
        """The attribute ``name`` or ``None``, looked for where one can live (the instance,
        its buffers and submodules, its class: a parametrization's property) before asking
        ``getattr``, whose failure for an absent name costs ~1.4 us (0.2 us this way)."""
        if (
            name in self.__dict__
            or name in self._buffers
            or name in self._modules
            or hasattr(type(self), name)
        ):
            return getattr(self, name)
        return None

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if lengths is None and self._plain_inference():
            whole = self._infer_whole(input, hx)
            if whole is not None:
                output, h_n, c_n = whole
                return output, (h_n, c_n)
        weight = self.weight_ih_l0
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "lengths must be None for a PackedSequence input, which carries its own "
                    f"lengths; got {type(lengths).__name__}"
                )
            check.check_input("input.data", input.data, (2,), self.input_size, weight)
            x, packed_lengths = pad_packed_sequence(input)  # (L, N, H_in), original order
            lengths = packed_lengths.to(x.device)
            batched = True
        else:
            x = check.check_input("input", input, (2, 3), self.input_size, weight)
            batched = x.dim() == 3
            if not batched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
            if x.size(0) == 0:
                raise check.LSTMValueError(
                    f"input must have at least one time step, got shape {tuple(input.shape)}"
                )
            if lengths is not None:
                if not batched:
                    raise ValueError(
                        "lengths must be None for unbatched (2-D) input, got "
                        f"{type(lengths).__name__}"
                    )
                lengths = check.check_lengths(lengths, x.size(1), x.size(0), x.device)
        # no hx: zeros, which the stack operator makes itself (two calls fewer, ~10 us cold)
        h0, c0 = (None, None) if hx is None else self._initial_state(hx, x, batched)

        directions = 2 if self.bidirectional else 1
        layers = [
            [self._layer_params(layer, direction) for direction in range(directions)]
            for layer in range(self.num_layers)
        ]
        stack = None
        if lengths is None:
            flat = [params for per_direction in layers for params in per_direction]
            stack = self._infer_stack(x, h0, c0, flat, directions)
        if stack is not None:
            output, h_n, c_n = stack
        else:
            if h0 is None:
                h0, c0 = self._initial_state(None, x, batched)
            h_n, c_n = [], []
            layer_input = x  # (L, N, features)
            for layer in range(self.num_layers):
                outputs = []
                for direction in range(directions):
                    k = layer * directions + direction
                    out, h, c = runner.run_layer(
                        layer_input,
                        h0[k],
                        c0[k],
                        layers[layer][direction],
                        cell=self.cell,
                        reverse=direction == 1,
                        lengths=lengths,
                        backend=self.backend,
                        regularizers=self.regularizers,
                        training=self.training,
                    )
                    outputs.append(out)
                    h_n.append(h)
                    c_n.append(c)
                layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
                if self._dropout_between_layers() and layer < self.num_layers - 1:
                    layer_input = F.dropout(layer_input, self.dropout, training=True)
            output = layer_input
            h_n, c_n = torch.stack(h_n), torch.stack(c_n)

        if isinstance(input, PackedSequence):
            order = input.sorted_indices
            if order is not None:
                output = output.index_select(1, order)
                packed_lengths = packed_lengths[order.cpu()]
            data = pack_padded_sequence(output, packed_lengths).data
            return PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            ), (h_n, c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def step(
        self, input: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, LSTMState]:
        """Run one time step through every layer, for streaming (unidirectional models only).

        Calling ``step`` on ``x[0], x[1], ...`` in turn, feeding back the returned state, gives
        the outputs and final state of ``forward(x)`` (the same values up to rounding). The
        per-layer step is :func:`lstmkit.runner.step_layer`, a one-step sequence on the
        backend that :attr:`backend` chooses, as ``forward`` would; layers are stacked as in
        :meth:`forward`, with ``dropout`` between them in training mode (fresh masks per step,
        as ``forward`` draws one per element).

        In evaluation mode zoneout moves each unit by its expectation, exactly as ``forward``
        does. In training mode ``step`` raises if ``recurrent_dropout``, ``weight_drop`` or
        ``zoneout`` is on: their masks are drawn per sequence, which a step does not see.

        Args:
            input: ``(N, H_in)``, or unbatched ``(H_in)``: the input at this step.
            state: an :class:`~lstmkit.state.LSTMState` or a tuple ``(h, c)`` of
                ``(num_layers, N, H_out)`` and ``(num_layers, N, H_cell)`` (no N for unbatched
                input), as ``torch.nn.LSTM``'s ``(h_n, c_n)``; zeros when omitted.

        Returns:
            ``(output, state)``: the top layer's ``(N, H_out)`` (or ``(H_out)``) output and the
            new :class:`~lstmkit.state.LSTMState`. Cut it from the graph with
            :meth:`detach_state` for truncated back-propagation through time.

        Raises:
            ValueError: a bidirectional model, a wrong input size or state shape, an active
                regulariser in training mode, or a :attr:`backend` that cannot run a layer.
                TypeError: a wrong type or dtype.
        """
        if self._plain_inference():
            whole = self._infer_whole(input, state, one_step=True)
            if whole is not None:
                output, h_n, c_n = whole
                return output, LSTMState(h_n, c_n)
        if self.bidirectional:
            raise ValueError(
                "step() needs a unidirectional LSTM (bidirectional=False): the reverse "
                "direction starts from the end of the sequence, which a stream has not seen; "
                "got bidirectional=True, use forward() on whole sequences"
            )
        x = check.check_input("input", input, (1, 2), self.input_size, self.weight_ih_l0)
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        sequence = x.unsqueeze(0)  # one time step
        # the state of a unidirectional stack has hx's layout: one time step, time-major
        h0, c0 = self._initial_state(state, sequence, batched, check.STATE_NAMES)
        layers = [self._layer_params(layer, 0) for layer in range(self.num_layers)]
        stack = self._infer_stack(sequence, h0, c0, layers)
        if stack is not None:
            output, h_n, c_n = stack
            layer_input = output[0]
        else:
            hs, cs = [], []
            layer_input = x
            for layer in range(self.num_layers):
                h, c = runner.step_layer(
                    layer_input,
                    h0[layer],
                    c0[layer],
                    layers[layer],
                    cell=self.cell,
                    backend=self.backend,
                    regularizers=self.regularizers,
                    training=self.training,
                )
                hs.append(h)
                cs.append(c)
                layer_input = h
                if self._dropout_between_layers() and layer < self.num_layers - 1:
                    layer_input = F.dropout(layer_input, self.dropout, training=True)
            h_n, c_n = torch.stack(hs), torch.stack(cs)
        if not batched:
            return layer_input.squeeze(0), LSTMState(h_n.squeeze(1), c_n.squeeze(1))
        return layer_input, LSTMState(h_n, c_n)

    @staticmethod
    def detach_state(state: tuple[Tensor, Tensor] | None) -> LSTMState | None:
        """:func:`lstmkit.state.detach_state`: ``state`` cut from the autograd graph, for
        truncated back-propagation through time."""
        return detach_state(state)

    def _initial_state(
        self,
        hx: object,
        x: Tensor,
        batched: bool,
        names: check.StateNames = check.HX_NAMES,
    ) -> tuple[Tensor, Tensor]:
        """``(h_0, c_0)`` as ``(D * num_layers, N, H_out)`` and ``(..., H_cell)``, from ``hx``
        (checked, its names in messages are ``names``) or zeros; ``x`` is ``(L, N, *)``."""
        states = self.num_layers * (2 if self.bidirectional else 1)
        out_size = self.proj_size or self.hidden_size
        batch = (x.size(1),) if batched else ()
        h_shape = (states, *batch, out_size)
        c_shape = (states, *batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(states, x.size(1), out_size)
            return h0, x.new_zeros(states, x.size(1), self.hidden_size)
        what = "for batched input" if batched else "for unbatched input"
        h0, c0 = check.check_hx(hx, h_shape, c_shape, x, what, names)
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0


class SimpleLSTM(nn.Module):
    """The notebook's single-layer LSTM, fixed: a batch-first one-layer :class:`LSTM`.

    Returns ``(output, h_n, c_n)``: ``output`` ``(N, L, H)``, and the final hidden and cell
    state ``(N, H)`` (the notebook fed the *cell* state through time as the hidden state).
    """

    def __init__(self, input_size: int, hidden_size: int, **factory) -> None:
        super().__init__()
        self.lstm = LSTM(input_size, hidden_size, batch_first=True, **factory)

    def forward(self, input_seq: Tensor, *, lengths=None) -> tuple[Tensor, Tensor, Tensor]:
        output, (h_n, c_n) = self.lstm(input_seq, lengths=lengths)
        return output, h_n[0], c_n[0]


class BidirectionalLSTM(nn.Module):
    """The notebook's bidirectional LSTM, fixed: a batch-first bidirectional :class:`LSTM`.

    Returns ``(output, h_n, c_n)``: ``output`` ``(N, L, 2H)``, and ``h_n``, ``c_n`` of
    ``(N, 2H)``: the forward direction's state after the last step beside the reverse
    direction's state after step 0 (the notebook returned ``outputs[-1]``, the last *batch
    element*, and appended a stale global instead of the reverse state).
    """

    def __init__(self, input_size: int, hidden_size: int, **factory) -> None:
        super().__init__()
        self.lstm = LSTM(input_size, hidden_size, batch_first=True, bidirectional=True, **factory)

    def forward(self, input_seq: Tensor, *, lengths=None) -> tuple[Tensor, Tensor, Tensor]:
        output, (h_n, c_n) = self.lstm(input_seq, lengths=lengths)
        return output, torch.cat(tuple(h_n), dim=-1), torch.cat(tuple(c_n), dim=-1)


class DeepLSTM(nn.Module):
    """The notebook's stacked LSTM, fixed: a batch-first ``num_layers`` :class:`LSTM`.

    Returns ``(output, (h_n, c_n))`` with ``output`` ``(N, L, H)`` from the top layer and
    per-layer final states ``(num_layers, N, H)`` (the notebook returned no state, kept its
    state lists on the CPU and sized them by sequence length).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **factory) -> None:
        super().__init__()
        self.lstm = LSTM(input_size, hidden_size, num_layers, batch_first=True, **factory)

    def forward(self, input_seq: Tensor, *, lengths=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self.lstm(input_seq, lengths=lengths)
