"""Experiment configs: YAML files, key=value overrides, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdlora.training.config import ConfigError, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.method in path.stem or cfg.method in ("base", "moe", "mlora")


def test_overrides_set_top_level_and_nested_values(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "ml1m-mlora-gender-mlora.yaml",
        ["method=moe", "backbone=dcn", "epochs=2", "tower=[64,32]", "data.options.max_rows=500",
         "amp=true", "lr=3e-4"],
    )  # fmt: skip
    assert (cfg.method, cfg.backbone, cfg.epochs, cfg.tower) == ("moe", "dcn", 2, [64, 32])
    assert cfg.data.options == {"seed": 2024, "max_rows": 500}
    assert cfg.amp is True and cfg.lr == pytest.approx(3e-4)


def test_unknown_override_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        apply_overrides({}, ["epoch=3"])


def test_malformed_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["method"])


def test_bad_method_and_missing_data_path_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\n")
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(bad)
    bad.write_text("data: {source: preset, preset: ml1m-mlora-age}\n")
    with pytest.raises(ConfigError, match="needs data\\.path"):
        load_config(bad)


def test_fingerprint_ignores_outputs_but_not_training_knobs(tmp_path: Path) -> None:
    base = load_config(CONFIGS / "synthetic-quickstart.yaml")
    moved = load_config(CONFIGS / "synthetic-quickstart.yaml", ["out=/elsewhere", "progress=false"])
    other = load_config(CONFIGS / "synthetic-quickstart.yaml", ["lr=0.01"])
    assert base.fingerprint() == moved.fingerprint() != other.fingerprint()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("backbone=deepfn", "did you mean 'deepfm'"),
        ("tower=[]", "tower must be a non-empty list"),
        ("tower=[64,-3]", "tower must be a non-empty list"),
        ("ranks=[4,0]", "ranks must be"),
        ("dropout=1.5", "dropout must be in"),
        ("embed_dim=0", "embed_dim must be"),
        ("threads=0", "threads must be"),
        ("lr=-1e-3", "lr must be > 0"),
        ("l2=-1", "l2 must be >= 0"),
        ("activation=swish", "activation must be one of"),
        ("tower_norm=layer", "tower_norm must be"),
    ],
)
def test_model_settings_out_of_range_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / "synthetic-quickstart.yaml", [override])


def test_the_python_api_spellings_still_load() -> None:
    from mdlora.training.config import config_from_dict

    cfg = config_from_dict({"backbone": "DeepFM", "tower": (64, 32), "ranks": (4, 2),
                            "phase_lr": {"adapters": 0}})  # fmt: skip
    assert (cfg.backbone, cfg.tower, cfg.ranks) == ("deepfm", [64, 32], [4, 2])


@pytest.mark.parametrize(
    ("backbone", "hparams", "alpha", "expected"),
    [
        ("deepfm", "movielens", None, 32.0),  # the published MovieLens value
        ("deepfm", "taobao", None, 256.0),  # Taobao's, not MovieLens's
        ("nfm", "taobao", None, 16.0),
        ("deepfm", "own", None, 16.0),  # own data: the documented default, no dataset's value
        ("deepfm", "taobao", 8.0, 8.0),  # the config wins
    ],
)
def test_the_rank_temperature_comes_from_the_config_then_the_data_setting(
    backbone: str, hparams: str, alpha: float | None, expected: float
) -> None:
    from mdlora.training.config import config_from_dict
    from mdlora.training.data.presets import MLORA_HPARAMS
    from mdlora.training.data.taobao import TAOBAO_HPARAMS
    from mdlora.training.run import resolve_alpha

    hp = {"movielens": MLORA_HPARAMS, "taobao": TAOBAO_HPARAMS, "own": {}}[hparams]
    cfg = config_from_dict({"backbone": backbone, "alpha": alpha})
    assert resolve_alpha(cfg, hp) == expected


def test_every_recipe_names_a_trainer_and_a_model_method() -> None:
    from mdlora.models.methods import REGISTRY
    from mdlora.training.config import RECIPES
    from mdlora.training.run import TRAINERS

    for name, recipe in RECIPES.items():
        assert recipe.trainer in TRAINERS, name
        assert recipe.model_method in REGISTRY, name
        assert not recipe.always_fresh or recipe.fresh, name
