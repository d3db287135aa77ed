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
    assert (cfg.method, cfg.backbone, cfg.epochs) == ("moe", "dcn", 2)
    assert cfg.model["tower"] == [64, 32]
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
        ("model.fusion=concat", "fusion must be one of"),
        ("model.gate_dim=0", "gate_dim must be"),
        ("model.alpha=0", "alpha must be > 0"),
        ("model.backbone_options={cross_layer: 2}", "bad options for backbone"),
        ("model.method=moe", "unknown model setting"),
        ("model.towr=[8]", "did you mean 'tower'"),
    ],
)
def test_model_settings_out_of_range_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / "synthetic-quickstart.yaml", [override])


def test_the_python_api_spellings_still_load() -> None:
    from mdlora.training.config import config_from_dict

    cfg = config_from_dict({"backbone": "DeepFM", "tower": (64, 32), "ranks": (4, 2),
                            "phase_lr": {"adapters": 0}})  # fmt: skip
    assert cfg.model == {"backbone": "deepfm", "tower": [64, 32], "ranks": [4, 2]}


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


def test_a_model_block_and_top_level_model_keys_are_one_config(tmp_path: Path) -> None:
    """A config written before the ``model:`` block (model settings at the top level) loads
    into the block, and trains (fingerprints, hence resumes) as the same run."""
    from mdlora.training.config import config_from_dict

    block = config_from_dict({"method": "moe", "model": {"backbone": "dcn", "tower": [32, 16],
                                                         "experts_per_domain": 2}})  # fmt: skip
    flat = config_from_dict({"method": "moe", "backbone": "dcn", "tower": [32, 16],
                             "experts_per_domain": 2})  # fmt: skip
    assert flat.model == block.model == {"backbone": "dcn", "tower": [32, 16],
                                         "experts_per_domain": 2}  # fmt: skip
    assert flat.fingerprint() == block.fingerprint()
    # written back, the config reads as the same run
    from mdlora.training.config import save_config

    save_config(block, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").fingerprint() == block.fingerprint()
    with pytest.raises(ConfigError, match="set twice"):
        config_from_dict({"backbone": "dcn", "model": {"backbone": "deepfm"}})


def test_the_fingerprint_of_a_run_made_before_the_model_block_is_unchanged() -> None:
    """Run folders resume only when the fingerprint is the one their checkpoints carry: these
    values were computed by the config code before the ``model:`` block existed."""
    from mdlora.training.config import config_from_dict

    assert load_config(CONFIGS / "synthetic-quickstart.yaml").fingerprint() == "7b733514f939ed30"
    everything = config_from_dict({
        "method": "moe", "backbone": "dcn", "tower": [64, 32], "ranks": [4, 2],
        "experts_per_domain": 2, "fusion": "add", "alpha": 8, "dropout": 0.1, "embed_dim": 4,
        "gate_dim": 3, "fusion_rank": 2, "activation": "tanh", "tower_norm": "batch",
        "backbone_options": {"cross_layers": 2},
    })  # fmt: skip
    assert everything.fingerprint() == "b07531ab4223bbfb"


def test_an_override_of_a_model_setting_replaces_the_files_value() -> None:
    cfg = load_config(CONFIGS / "user-table.yaml", ["backbone=deepfm", "model.dropout=0.1"])
    assert (cfg.model["backbone"], cfg.model["dropout"], cfg.model["tower"]) == (
        "deepfm", 0.1, [256, 128, 64]
    )


def test_the_model_settings_are_the_core_models(tmp_path: Path) -> None:
    """Every setting of the ``model:`` block reaches the trained model's ``ModelConfig``;
    one left out takes the data setting's value, then the core's default."""
    from mdlora.models.model import SETTINGS
    from mdlora.training.run import build_model, resolve_hparams
    from tests.training.helpers import tiny_config, tiny_prepared

    cfg = tiny_config(tmp_path, method="moe", tower=[16, 8], ranks=[2, 1], dropout=0.1,
                      activation="tanh", experts_per_domain=2, gate_dim=3)  # fmt: skip
    prepared = tiny_prepared()
    model = build_model(cfg, prepared, resolve_hparams(cfg, prepared))
    mc = model.config
    for name in SETTINGS:
        value = getattr(mc, name)
        if name in cfg.model:
            given = cfg.model[name]
            assert (list(value) if isinstance(value, tuple) else value) == given, name
    assert (mc.embed_dim, mc.fusion, mc.tower_norm) == (4, "attention", "none")


def test_an_empty_model_block_and_numpy_numbers_are_taken(tmp_path: Path) -> None:
    import numpy as np

    from mdlora.training.config import config_from_dict
    from tests.models.helpers import make_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic}\nmethod: mlora\nmodel:\n")  # the block left empty
    assert load_config(path).model == {}
    # the Python API may hand the core numpy numbers
    cfg = make_config("deepfm", "moe2", gate_dim=np.int64(3), dropout=np.float32(0.1))
    assert cfg.gate_dim == 3
    with pytest.raises(ConfigError, match="model: "):  # the backbone refuses, as a config error
        config_from_dict({"backbone": "fibinet", "backbone_options": {"reduction": 0}})
