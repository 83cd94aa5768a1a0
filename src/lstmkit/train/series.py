"""Series for the forecasting task, and the two baselines its LSTM is measured against.

A series is a 1-D float64 tensor of evenly spaced values. A forecast is made at an *origin*
``o``: everything before index ``o`` is known, and values ``o`` to ``o + horizon - 1`` are
forecast. Forecasts for many origins are ``(origins, horizon)`` tensors.

- :func:`co2_weekly`: statsmodels' bundled weekly CO2 concentration at Mauna Loa (ppm, March
  1958 to December 2001, 2284 weeks), its 59 missing weeks filled linearly between their
  neighbours.
- :func:`read_column`: one numeric column of a user's CSV file.
- :func:`seasonal_naive`: each value forecast as the one a season earlier (the last known one
  for horizons beyond a season, a whole number of seasons earlier).
- :func:`holt_winters`: additive Holt-Winters exponential smoothing (statsmodels), fitted on
  the training part only, then run over the series with those parameters so that each
  origin's forecast uses what is known there and nothing after.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lstmkit.train.config import TrainError, require


def co2_weekly() -> Tensor:
    """The weekly Mauna Loa CO2 series (ppm), gaps interpolated."""
    datasets = require("statsmodels.datasets")
    frame = datasets.co2.load_pandas().data
    return torch.tensor(frame["co2"].interpolate().to_numpy(), dtype=torch.float64)


def read_column(path: str, column: str) -> Tensor:
    """Column ``column`` of the CSV file ``path`` (a header row, then one row a time step).

    Raises:
        TrainError: the file is missing or unreadable, has no such column, or a value of the
            column is empty, not a number or not finite.
    """
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"data file {path!r} does not exist or is not a file")
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TrainError(f"cannot read data file {path!r} as CSV: {error}") from None
    if not rows:
        raise TrainError(f"data file {path!r} is empty; expected a header row naming columns")
    header = [name.strip() for name in rows[0]]
    if column not in header:
        raise TrainError(
            f"--column {column!r} is not a column of {path!r}; its columns: {', '.join(header)}"
        )
    index = header.index(column)
    values = []
    for line, row in enumerate(rows[1:], start=2):
        text = row[index].strip() if index < len(row) else ""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise TrainError(
                f"column {column!r} of {path!r} holds {text!r} at line {line}; expected a "
                "finite number on every row"
            )
        values.append(value)
    return torch.tensor(values, dtype=torch.float64)


def _steps(horizon: int) -> Tensor:
    return torch.arange(1, horizon + 1)


def _a_season_before(origins: Tensor, horizon: int, season: int) -> Tensor:
    """``(origins, horizon)`` indices: for step ``h`` from origin ``o`` (value ``o + h - 1``),
    the index a whole number of seasons earlier, the fewest that reach back before ``o``."""
    steps = _steps(horizon)
    back = season * torch.div(steps + season - 1, season, rounding_mode="floor")
    return origins[:, None] + steps - 1 - back


def seasonal_naive(series: Tensor, origins: Tensor, horizon: int, season: int) -> Tensor:
    """Each origin's forecast: the value a whole number of seasons before each step, the
    fewest seasons that reach back before the origin (``season`` 1 repeats the last value)."""
    return series[_a_season_before(origins, horizon, season)]


def holt_winters(
    series: Tensor, train_end: int, origins: Tensor, horizon: int, season: int
) -> Tensor:
    """Each origin's forecast by additive Holt-Winters (additive trend; additive seasonality
    of period ``season`` unless it is 1), its smoothing parameters and initial state fitted by
    statsmodels on ``series[:train_end]``.

    The model, with those parameters fixed, is run over the whole series once; its level,
    trend and seasonal states after ``origin - 1`` give that origin's forecast (the recursion
    is causal, so a state never depends on a later value).
    """
    smoothing = require("statsmodels.tsa.holtwinters")
    seasonal = {"seasonal": "add", "seasonal_periods": season} if season > 1 else {}
    values = series.numpy()
    with warnings.catch_warnings():  # statsmodels warns of convergence and of index types
        warnings.simplefilter("ignore")
        fitted = smoothing.ExponentialSmoothing(
            values[:train_end], trend="add", initialization_method="estimated", **seasonal
        ).fit()
        params = fitted.params
        known = {
            "initial_level": params["initial_level"],
            "initial_trend": params["initial_trend"],
        }
        if season > 1:
            known["initial_seasonal"] = params["initial_seasons"]
        run = smoothing.ExponentialSmoothing(
            values, trend="add", initialization_method="known", **known, **seasonal
        ).fit(
            smoothing_level=params["smoothing_level"],
            smoothing_trend=params["smoothing_trend"],
            smoothing_seasonal=params["smoothing_seasonal"] if season > 1 else None,
            optimized=False,
        )
    now = origins[:, None] - 1  # the last known index
    steps = _steps(horizon)
    level = torch.from_numpy(run.level)[now]
    trend = torch.from_numpy(run.trend)[now]
    forecast = level + steps * trend
    if season > 1:
        forecast = (
            forecast + torch.from_numpy(run.season)[_a_season_before(origins, horizon, season)]
        )
    return forecast


def errors(forecast: Tensor, truth: Tensor) -> dict[str, float]:
    """Mean absolute and root-mean-square error over every origin and step."""
    difference = forecast - truth
    return {
        "mae": difference.abs().mean().item(),
        "rmse": difference.square().mean().sqrt().item(),
    }
