"""The forecasting task: its series, its split and scaling, its two baselines against their
definitions and statsmodels, its summary against a recomputation, and its input errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lstmkit.__main__ import main
from lstmkit.train import checkpoint, loop, metrics, series
from lstmkit.train.config import from_mapping
from lstmkit.train.tasks import Forecast, ForecastConfig

SMALL = [
    "--steps", "20", "--time-budget", "0", "--batch-size", "16", "--window", "24",
    "--horizon", "6", "--season", "12", "--hidden-size", "16", "--eval-every", "10",
    "--log-every", "5", "--lr", "0.01",
]  # fmt: skip


def cli(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def monthly(n: int = 240, seed: int = 0) -> np.ndarray:
    """A monthly series: a trend, a yearly cycle and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 10 + 0.05 * t + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.3, n)


@pytest.fixture
def csv_file(tmp_path) -> Path:
    path = tmp_path / "series.csv"
    rows = [f"2000-{i},{float(v)!r},x" for i, v in enumerate(monthly())]
    path.write_text("date,sales,note\n" + "\n".join(rows) + "\n")
    return path


def task_of(**settings) -> Forecast:
    task = Forecast(from_mapping(ForecastConfig, settings))
    task.prepare()
    return task


def test_seasonal_naive_repeats_the_last_known_season():
    values = torch.arange(100, dtype=torch.float64)
    origins = torch.tensor([40, 57])
    got = series.seasonal_naive(values, origins, horizon=10, season=4)
    # step h (1-based) from origin o: the value at o + h - 1 - 4 * ceil(h / 4)
    expected = [[o + h - 1 - 4 * math.ceil(h / 4) for h in range(1, 11)] for o in (40, 57)]
    assert got.tolist() == expected
    assert series.seasonal_naive(values, origins, 3, 1).tolist() == [[39] * 3, [56] * 3]


@pytest.mark.parametrize("season", [12, 1])
def test_holt_winters_matches_statsmodels_refitted_at_each_origin(season):
    """One pass over the series with the training part's parameters gives, at each origin,
    the forecast of statsmodels' own model of the values before it with those parameters."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    values = monthly()
    train_end, horizon = 150, 15
    origins = torch.tensor([150, 171, 225])
    got = series.holt_winters(torch.from_numpy(values), train_end, origins, horizon, season)
    seasonal = {"seasonal": "add", "seasonal_periods": season} if season > 1 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = (
            ExponentialSmoothing(
                values[:train_end], trend="add", initialization_method="estimated", **seasonal
            )
            .fit()
            .params
        )
        known = {"initial_level": params["initial_level"], "initial_trend": params["initial_trend"]}
        if season > 1:
            known["initial_seasonal"] = params["initial_seasons"]
        for row, origin in enumerate(origins.tolist()):
            model = ExponentialSmoothing(
                values[:origin], trend="add", initialization_method="known", **known, **seasonal
            )
            fitted = model.fit(
                smoothing_level=params["smoothing_level"],
                smoothing_trend=params["smoothing_trend"],
                smoothing_seasonal=params["smoothing_seasonal"] if season > 1 else None,
                optimized=False,
            )
            np.testing.assert_allclose(got[row].numpy(), fitted.forecast(horizon), rtol=1e-12)


def test_errors_are_mean_absolute_and_root_mean_square():
    forecast, truth = torch.tensor([[1.0, 2.0], [3.0, 7.0]]), torch.tensor([[1.0, 4.0], [0.0, 7.0]])
    assert series.errors(forecast, truth) == pytest.approx({"mae": 5 / 4, "rmse": (13 / 4) ** 0.5})


def test_the_builtin_series_is_weekly_co2_without_gaps():
    co2 = series.co2_weekly()
    assert len(co2) == 2284 and torch.isfinite(co2).all()
    assert 310 < co2[0] < 320 and 365 < co2[-1] < 375  # ppm, 1958 and 2001


def test_read_column_reads_one_column_of_numbers(csv_file):
    np.testing.assert_array_equal(series.read_column(str(csv_file), "sales").numpy(), monthly())


def test_split_is_chronological_and_scaling_sees_the_training_part_only():
    """Values after the training part changed wildly: the scale and every training batch are
    the same; validation and test origins forecast values of their own part only."""
    task = task_of(window=24, horizon=6, season=12)
    n = len(task.series)
    assert (task.val_start, task.test_start) == (n - 2 * int(n * 0.15), n - int(n * 0.15))
    scale = task.scale
    assert scale == pytest.approx(task.series[: task.val_start].std().item(), rel=1e-12)
    batches = [task.batch(torch.Generator().manual_seed(3), slice(None)) for _ in range(2)]
    task.series[task.val_start :] = 1e6
    assert task.scale == scale
    again = task.batch(torch.Generator().manual_seed(3), slice(None))
    assert torch.equal(again[0], batches[0][0]) and torch.equal(again[1], batches[0][1])
    val = task.origins(task.val_start, task.test_start)
    assert val[0] == task.val_start and val[-1] + task.config.horizon == task.test_start


def test_inputs_and_targets_are_relative_to_the_last_known_value():
    task = task_of(window=5, horizon=3, season=4)
    inputs, targets, last = task.examples(torch.tensor([10]))
    values = task.series
    np.testing.assert_allclose(last.numpy(), [[values[9].item()]])
    np.testing.assert_allclose(
        inputs[0, :, 0].numpy(), ((values[5:10] - values[9]) / task.scale).numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        targets[0].numpy(), ((values[10:13] - values[9]) / task.scale).numpy(), rtol=1e-6
    )


def test_a_run_on_a_csv_writes_the_test_table_plot_and_metrics(csv_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "forecast", "--data", csv_file, "--column", "sales"]
    assert cli(*argv, "--run-dir", run, "--quiet", *SMALL) == 0
    out = capsys.readouterr().out
    assert "test part, 31 origins x 6 steps ahead:" in out and "seasonal naive" in out
    result = json.loads((run / "forecast.json").read_text())
    assert (result["values"], result["test_start"], result["origins"]) == (240, 204, 31)
    assert (run / "forecast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval_mae" in metrics.read(run)[-1]
    # the table, recomputed: the model from the checkpoint, the baselines from their functions
    saved = checkpoint.load(run)
    task = Forecast(from_mapping(ForecastConfig, saved.config))
    task.prepare()
    model = loop.build_model(task, torch.device("cpu"))
    checkpoint.load_into(model, saved)
    origins = torch.arange(204, 235)
    predicted, truth = task.forecast(model, origins)
    assert torch.equal(truth, task.series[origins[:, None] + torch.arange(6)])
    naive = series.seasonal_naive(task.series, origins, 6, 12)
    winters = series.holt_winters(task.series, task.val_start, origins, 6, 12)
    for name, forecast in (
        ("LSTM", predicted),
        ("seasonal naive", naive),
        ("Holt-Winters", winters),
    ):
        assert result["test"][name] == pytest.approx(series.errors(forecast, truth), rel=1e-6)


def test_the_default_series_lstm_beats_seasonal_naive_after_a_short_run(tmp_path, capsys):
    """The issue's target on the default series, in a run of 300 steps (about 3 s)."""
    run = tmp_path / "run"
    argv = ["train", "--task", "forecast", "--run-dir", run, "--quiet", "--steps", "300"]
    assert cli(*argv, "--time-budget", "0") == 0
    test = json.loads((run / "forecast.json").read_text())["test"]
    assert test["LSTM"]["mae"] < 0.8 * test["seasonal naive"]["mae"], test
    assert test["LSTM"]["rmse"] < 0.8 * test["seasonal naive"]["rmse"], test


BAD = {
    "a column it does not have": (
        ["--column", "price"],
        "--column 'price' is not a column of {csv!r}; its columns: date, sales, note",
    ),
    "a column of words": (
        ["--column", "note"],
        "column 'note' of {csv!r} holds 'x' at line 2; expected a finite number on every row",
    ),
    "too few rows": (
        ["--column", "sales", "--window", "200"],
        "column 'sales' of {csv!r} has 240 values: too few for window=200, horizon=6",
    ),
    "a horizon longer than the test part": (
        ["--column", "sales", "--horizon", "40"],
        "need 64 in the training part and 40 in each of the others",
    ),
    "--data without --column": ([], "--data FILE.csv and --column NAME go together"),
    "a missing file": (["--column", "sales", "--data", "nowhere.csv"], "'nowhere.csv' does not"),
    "season 0": (["--column", "sales", "--season", "0"], "season must be a positive int, got 0"),
    "test_fraction 0.5": (
        ["--column", "sales", "--test-fraction", "0.5"],
        "test_fraction must be in (0, 0.5), got 0.5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_and_writes_nothing(case, csv_file, tmp_path, capsys):
    options, message = BAD[case]
    run = tmp_path / "run"
    argv = ["train", "--task", "forecast", "--run-dir", run, *SMALL, "--data", csv_file, *options]
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message.format(csv=str(csv_file)) in err, err
    assert not run.exists()


@pytest.mark.parametrize("value", ["", "nan"])
def test_a_bad_value_names_its_line(value, csv_file, tmp_path, capsys):
    lines = csv_file.read_text().splitlines()
    lines[7] = f"2000-6,{value},x"  # an empty cell, or a number that is no value
    csv_file.write_text("\n".join(lines))
    argv = ["train", "--task", "forecast", "--data", csv_file, "--column", "sales"]
    assert cli(*argv, "--run-dir", tmp_path / "run") == 2
    assert f"holds {value!r} at line 8" in capsys.readouterr().err
