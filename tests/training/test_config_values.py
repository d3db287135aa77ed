"""Config values of the wrong kind are refused with one clear ConfigError, never truncated
and never left to fail later as a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mdlora.training.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICK = CONFIGS / "synthetic-quickstart.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=abc", "epochs must be an integer >= 1, got 'abc'"),
        ("patience=abc", "patience must be an integer >= 1, got 'abc'"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("epochs=2.5", "epochs must be an integer >= 1, got 2.5"),
        ("epochs=true", "epochs must be an integer >= 1, got True"),
        ("patience=1.9", "patience must be an integer >= 1, got 1.9"),
        ("batch_size=1.5", "batch_size must be an integer >= 1, got 1.5"),
        ("batch_size=false", "batch_size must be an integer >= 1, got False"),
        ("eval_batch_size=0.5", "eval_batch_size must be an integer >= 1, got 0.5"),
        ("eval_every=2.5", "eval_every must be an integer >= 1 (steps)"),
        ("threads=true", "threads must be an integer >= 1, got True"),
        ("seed=1.5", "seed must be an integer, got 1.5"),
        ("seed=null", "seed must be an integer, got None"),
        ("phase_epochs.gate=1.5", "phase_epochs.gate must be an integer >= 0, got 1.5"),
        ("phase_epochs=3", "phase_epochs must be a mapping"),
        ("phase_lr=[1]", "phase_lr must be a mapping"),
        ("epochs=0", "epochs must be an integer >= 1, got 0"),
        ("lr=true", "lr must be a number, got True"),
    ],
)
def test_integer_settings_refuse_text_fractions_and_booleans(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_integer_settings_in_a_file_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(QUICK.read_text().replace("epochs: 6", "epochs: 2.5"))
    with pytest.raises(ConfigError, match=r"epochs must be an integer >= 1, got 2\.5"):
        load_config(path)


def test_whole_floats_and_numpy_integers_are_taken_as_ints() -> None:
    cfg = load_config(QUICK, ["epochs=2.0", "batch_size=256.0", "patience=1", "seed=7"])
    assert (cfg.epochs, cfg.batch_size, cfg.patience, cfg.seed) == (2, 256, 1, 7)
    assert all(type(v) is int for v in (cfg.epochs, cfg.batch_size, cfg.patience, cfg.seed))
    cfg = config_from_dict({"epochs": np.int64(3), "threads": np.int32(2)})
    assert (cfg.epochs, cfg.threads) == (3, 2) and type(cfg.epochs) is int
    # the shipped config keeps its fingerprint (its integers stay what they were)
    assert load_config(QUICK).fingerprint() == "7b733514f939ed30"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.options.n_rows=abc", "data.options.n_rows must be an integer >= 1, got 'abc'"),
        ("data.options.max_rows=abc", "data.options.max_rows must be an integer >= 1, got 'abc'"),
        ("data.options.max_rows=2.5", "data.options.max_rows must be an integer >= 1, got 2.5"),
        ("data.options.n_domains=true", "data.options.n_domains must be an integer >= 1"),
        ("data.options.seed=-1", "data.options.seed must be an integer >= 0, got -1"),
        ("data.options.sample_frac=2", "data.options.sample_frac must be a number in (0, 1]"),
        ("data.options.sample_frac=abc", "data.options.sample_frac must be a number, got 'abc'"),
        ("data.options=3", "data.options must be a mapping"),
    ],
)
def test_data_option_counts_are_checked_with_the_config(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_data_options_that_fit_are_kept(tmp_path: Path) -> None:
    cfg = load_config(QUICK, ["data.options.max_rows=500.0", "data.options.sample_frac=0.5"])
    assert cfg.data.options["max_rows"] == 500 and type(cfg.data.options["max_rows"]) is int
    assert cfg.data.options["sample_frac"] == 0.5 and cfg.data.options["n_rows"] == 40000
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: synthetic\n  options:\n")  # the block left empty
    assert load_config(path).data.options == {}


def test_an_unknown_preset_is_a_config_error_naming_the_presets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{source: preset, preset: ml1m-mlora-gendre, path: {tmp_path}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (
        "data.preset 'ml1m-mlora-gendre' (did you mean 'ml1m-mlora-gender'?) is not a "
        "preset; use one of [" in str(err.value)
    )


def test_an_option_a_preset_does_not_take_is_a_config_error(tmp_path: Path) -> None:
    from mdlora.training.run import load_data

    cfg = config_from_dict(
        {
            "data": {
                "source": "preset",
                "preset": "ml1m-mlora-gender",
                "path": str(tmp_path),
                "options": {"n_rows": 10},
            }
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"data\.options of preset 'ml1m-mlora-gender': .*"
        r"unexpected keyword argument 'n_rows'; drop it",
    ):
        load_data(cfg)


@pytest.mark.parametrize(
    "text",
    ["", "method: moe\n", "data:\n", "data: {options: {max_rows: 10}}\n", "data: {path: x.csv}\n"],
    ids=["empty", "no-data", "empty-data", "options-only", "path-only"],
)
def test_a_config_file_without_a_data_source_is_refused(text: str, tmp_path: Path) -> None:
    """No silent training on generated rows: the README documents no synthetic default."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "does not say which rows to train on: set data.source" in str(err.value)
    assert "synthetic for generated rows" in str(err.value) and "\n" not in str(err.value)
    # asked for, generated rows are fine (in the file or as an override)
    assert load_config(path, ["data.source=synthetic"]).data.source == "synthetic"
