"""``mdlora reproduce``: the grid, phase sharing, the cache, the report, and a tiny real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mdlora.cli.reproduce import register_reproduce
from mdlora.training.checkpoints import state_dict_cpu
from mdlora.training.data.synthetic import write_movielens_1m_like
from mdlora.training.reproduce import (
    ReproduceError,
    Settings,
    Slice,
    Stat,
    build_grid,
    seed_shared_phases,
    shareable_phases,
    significant,
    write_report,
)
from mdlora.training.run import run_training
from tests.training.helpers import tiny_config, tiny_prepared

ML1M = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ml-1m").resolve()


# ------------------------------------------------------------------------------- grid
def test_default_grid_covers_every_table_once_in_priority_order() -> None:
    cells = build_grid()
    by_table: dict[str, int] = {}
    for c in cells:
        by_table[c.table] = by_table.get(c.table, 0) + 1
    # 3 splits x 8 backbones x 3 methods x 3 seeds; 3 backbones x 4 k x 3 seeds;
    # (7 MLP methods + 3 backbones x 4 methods) x 3 seeds; 1 backbone x 3 seeds
    assert by_table == {"table1": 216, "figure2": 36, "multilora": 57, "add_domain": 3}
    assert len({(c.table, c.cell_id) for c in cells}) == len(cells)
    first = cells[:24]
    assert {(c.table, c.split, c.seed) for c in first} == {("table1", "gender", 1)}
    assert {c.backbone for c in first} == {
        "wdl", "nfm", "autoint", "pnn", "dcn", "fibinet", "deepfm", "xdeepfm",
    }  # fmt: skip
    assert [c.table for c in cells[24:31]] == ["multilora"] * 7
    # the add-domain cell comes after the full-retraining cells it is compared with
    add = next(i for i, c in enumerate(cells) if c.table == "add_domain")
    full = [i for i, c in enumerate(cells)
            if c.table == "table1" and c.split == "occupation" and c.seed == 1
            and c.backbone == "deepfm" and c.method in ("base", "mlora")]  # fmt: skip
    assert len(full) == 2 and max(full) < add
    assert all(c.seed == 1 for c in cells[: add + 1])


def test_grid_filters_and_rejects_unknown_names() -> None:
    cells = build_grid(["table1"], ["gender"], ["deepfm,nfm"], ["mlora"], [2])
    assert [c.cell_id for c in cells] == ["gender-nfm-mlora-s2", "gender-deepfm-mlora-s2"]
    with pytest.raises(ReproduceError, match="unknown backbone 'resnet'"):
        build_grid(backbones=["resnet"])
    with pytest.raises(ReproduceError, match="unknown table"):
        build_grid(tables=["table9"])


def test_slices_get_their_own_cell_ids() -> None:
    (cell,) = build_grid(["table1"], ["age"], ["dcn"], ["moe"], [1], Slice(20_000, None, 1))
    assert cell.cell_id == "age-dcn-moe-s1@r20000-e1"
    assert cell.group == "ml1m-mlora-age-dcn-s1@r20000-e1"


def test_phase_sharing_rules() -> None:
    assert shareable_phases("moe", "base") == 1
    assert shareable_phases("singlelora", "multilora") == 2
    assert shareable_phases("multilora-add", "multilora") == 3
    assert shareable_phases("multilora", "singlelora") == 2
    assert shareable_phases("single", "base") == 0


# --------------------------------------------------------------------- phase sharing
def _finish(cfg_out: Path, method: str, fingerprint: str) -> None:
    (cfg_out / "reproduce-run.json").write_text(
        json.dumps({"method": method, "fingerprint": fingerprint})
    )


def test_shared_backbone_gives_the_weights_of_an_unshared_run(
    tmp_path: Path, device: torch.device
) -> None:
    """MoE-MLoRA seeded with Base's phase 1 ends bit-identical to MoE-MLoRA trained alone."""
    prepared = tiny_prepared()
    group = tmp_path / "group"
    dev = str(device)
    base = tiny_config(tmp_path, method="base", out=str(group / "base"), epochs=1, device=dev)
    donor = run_training(base, prepared=prepared)
    _finish(group / "base", "base", base.fingerprint())

    shared = tiny_config(
        tmp_path, method="moe", out=str(group / "moe"), epochs=1, resume=True, device=dev
    )
    seeded = seed_shared_phases(shared, prepared, "moe", group / "moe", group)
    assert seeded == ["backbone"]
    got = run_training(shared, prepared=prepared)
    # phase 1 was loaded, not trained again: its record is the donor's, timing included
    assert got.phases[0].to_dict() == donor.phases[0].to_dict()
    alone = run_training(
        tiny_config(tmp_path, method="moe", out=str(tmp_path / "alone"), epochs=1, device=dev),
        prepared=prepared,
    )
    assert got.test["domain"].wauc == alone.test["domain"].wauc
    a, b = state_dict_cpu(got.trained.models()[0]), state_dict_cpu(alone.trained.models()[0])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multilora_ablation_reuses_the_lora_phases(tmp_path: Path, device: torch.device) -> None:
    prepared = tiny_prepared(two_divisions=True)
    group = tmp_path / "group"
    dev = str(device)
    full = tiny_config(
        tmp_path, method="multilora", out=str(group / "multilora"), epochs=1, device=dev
    )
    run_training(full, prepared=prepared)
    _finish(group / "multilora", "multilora", full.fingerprint())
    add = tiny_config(tmp_path, method="multilora", fusion="add", epochs=1, resume=True,
                      out=str(group / "multilora-add"), device=dev)  # fmt: skip
    seeded = seed_shared_phases(add, prepared, "multilora-add", group / "multilora-add", group)
    assert seeded == ["backbone", "lora:domain", "lora:user_segment"]
    alone = tiny_config(tmp_path, method="multilora", fusion="add", epochs=1,
                        out=str(tmp_path / "alone"), device=dev)  # fmt: skip
    assert (
        run_training(add, prepared=prepared).test["domain"].wauc
        == run_training(alone, prepared=prepared).test["domain"].wauc
    )


# ---------------------------------------------------------------------------- report
def test_stat_formats_mean_and_std_and_flags_seed_noise() -> None:
    s = Stat([0.80, 0.81, 0.79])
    assert s.fmt() == "80.00 ± 1.00"
    assert Stat([0.8]).fmt() == "80.00 (n=1)"
    assert Stat([]).fmt() == "not run"
    assert significant(Stat([0.80, 0.81, 0.79]), Stat([0.805, 0.815, 0.795])) is False
    assert significant(Stat([0.80, 0.801, 0.799]), Stat([0.82, 0.821, 0.819])) is True
    assert significant(Stat([0.80]), Stat([0.82])) is None


def test_report_from_an_empty_cache_shows_commands_not_numbers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, results_dir=tmp_path / "res",
                        work_dir=tmp_path / "work", docs_dir=tmp_path / "docs")  # fmt: skip
    text = write_report(settings).read_text()
    assert "not run" in text
    assert "mdlora reproduce --table table1 --split gender" in text
    assert "mdlora reproduce --table multilora" in text
    assert "from 0 cached cells" in text
    assert not list((tmp_path / "docs").glob("*.png"))
    assert "scripts/probe_adapter_phase.py` measures" in text  # not probed yet: the command
    # the commands write where this run writes, not into the repository
    where = f"--data-dir {tmp_path} --results-dir {tmp_path / 'res'} --work-dir {tmp_path / 'work'}"
    commands = [ln for ln in text.splitlines() if ln.startswith("mdlora reproduce")]
    docs = f"--docs-dir {tmp_path / 'docs'}"
    assert commands and all(ln.endswith(f"{where} {docs}") for ln in commands)
    assert f"--report-only {where}" in text


def test_report_quotes_the_adapter_phase_probe(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, results_dir=tmp_path / "res",
                        work_dir=tmp_path / "work", docs_dir=tmp_path / "docs")  # fmt: skip
    probe = tmp_path / "res" / "probe"
    probe.mkdir(parents=True)
    points = [{"epoch": 0, "step": 0, "train_auc": 0.8343, "val_auc": 0.8013},
              {"epoch": 1, "step": 586, "train_auc": 0.8365, "val_auc": 0.7986}]  # fmt: skip
    record = {"split": "age", "backbone": "nfm", "seed": 2, "runs": {"adapters": points}}
    (probe / "age-nfm-s2.json").write_text(json.dumps(record))
    text = write_report(settings).read_text()
    row = next(line for line in text.splitlines() if "age / NFM / seed 2 | adapters" in line)
    assert "83.43 → 83.65" in row and "80.13 → 79.86 (80.13, 79.86)" in row


def test_a_sliced_reports_time_lines_count_only_the_slices_cells(tmp_path: Path) -> None:
    """Cells of the full run in the same cache are not the slice's: the time line of a table
    counts, times and names the devices of the slice's cells alone."""
    sl = Slice(max_rows=1000, epochs=1)
    res = tmp_path / "res"

    def cell(cell_id: str, seconds: float, device: str, sl: Slice) -> None:
        split, backbone, method, _ = cell_id.split("-", 3)
        record = {"table": "table1", "cell": cell_id, "split": split, "backbone": backbone,
                  "method": method, "seed": 1, "experts_per_domain": 1, "seconds": seconds,
                  "device": device, "slice": sl.to_dict(), "wauc": 0.8}  # fmt: skip
        (res / "table1").mkdir(parents=True, exist_ok=True)
        (res / "table1" / f"{cell_id}.json").write_text(json.dumps(record))

    for m in ("base", "mlora"):  # the full run's cells
        cell(f"gender-deepfm-{m}-s1", 100.0, "cpu (2 cores)", Slice())
    cell(f"gender-deepfm-mlora-s1{sl.tag}", 60.0, "cuda (H100)", sl)
    settings = Settings(data_dir=tmp_path, results_dir=res, work_dir=tmp_path / "work",
                        docs_dir=tmp_path / "docs")  # fmt: skip
    text = write_report(settings, sl).read_text()
    times = [ln for ln in text.splitlines() if ln.startswith("Time: ")]
    assert len(times) == 4  # one per table
    assert times[0].startswith("Time: 1 cell(s) ran in 1m00s in total on cuda; the 215 cells")
    assert times[1].startswith("Time: 0 cell(s) ran in 0m00s in total on —; the 36 cells")
    # and a missing cell's estimate comes from the slice's own cells where any ran
    from mdlora.training.reproduce import Cell, estimate_seconds
    from mdlora.training.reproduce.cache import load_cache

    records = load_cache(res)
    want = Cell("table1", "gender", "deepfm", "mlora", 2, slice=sl)
    assert estimate_seconds(want, records) == 60.0
    assert estimate_seconds(dataclasses.replace(want, slice=Slice()), records) == 100.0


# ------------------------------------------------------------------ tiny real run (CI)
@pytest.fixture(scope="module")
def ml1m_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding ml-1m/: the real one beside the repository, or (where it is not,
    as on a fresh CI machine) a generated one in its exact layout, so the command is run
    either way."""
    if ML1M.is_dir():
        return ML1M.parent
    root = tmp_path_factory.mktemp("ml-data")
    write_movielens_1m_like(root / "ml-1m", n_users=600, n_movies=400, n_ratings=15_000)
    return root


def test_tiny_reproduce_run_caches_cells_and_writes_the_report(
    tmp_path: Path, ml1m_parent: Path, device: torch.device
) -> None:
    app = typer.Typer()
    register_reproduce(app)
    args = [
        "--table", "table1", "--split", "gender", "--backbone", "deepfm", "--seed", "1",
        "--max-rows", "12000", "--epochs", "1", "--threads", "1", "--device", device.type,
        "--data-dir", str(ml1m_parent), "--results-dir", str(tmp_path / "res"),
        "--work-dir", str(tmp_path / "work"), "--docs-dir", str(tmp_path / "docs"),
    ]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 cell(s) run this time" in res.output
    cells = sorted((tmp_path / "res" / "table1").glob("*.json"))
    assert [p.name for p in cells] == [
        "gender-deepfm-base-s1@r12000-e1.json",
        "gender-deepfm-mlora-s1@r12000-e1.json",
        "gender-deepfm-moe-s1@r12000-e1.json",
    ]
    recs = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in cells}
    for rec in recs.values():
        assert 0.5 < rec["wauc"] < 1.0
        assert [d["domain"] for d in rec["test"]["gender"]["domains"]] == ["F", "M"]
    # MLoRA and MoE-MLoRA took phase 1 from the Base run instead of training it again
    assert recs["mlora"]["shared_phases"] == ["backbone"]
    assert recs["moe"]["shared_phases"] == ["backbone"]
    assert recs["mlora"]["reference"]["test"]["gender"]["wauc"] == recs["base"]["wauc"]
    # a rerun finds everything cached
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "3 of 3 cells already cached" in again.output
    assert "0 cell(s) run this time" in again.output
    # the report shows the slice's numbers, and the rest as not run
    report = runner.invoke(app, [*args, "--report-only"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "docs" / "results.md").read_text()
    deepfm_row = next(line for line in text.splitlines() if line.startswith("| DeepFM"))
    assert f"{100 * recs['mlora']['wauc']:.2f}" in deepfm_row
    assert "| WDL | not run | not run | not run |" in text
    assert (tmp_path / "docs" / "results_table1_gender.png").stat().st_size > 1000


def test_two_workers_share_the_grid(tmp_path: Path, ml1m_parent: Path) -> None:
    app = typer.Typer()
    register_reproduce(app)
    args = [
        "--table", "table1", "--split", "gender", "--backbone", "deepfm,wdl", "--method",
        "base", "--seed", "1", "--max-rows", "6000", "--epochs", "1", "--device", "cpu",
        "--data-dir", str(ml1m_parent), "--results-dir", str(tmp_path / "res"),
        "--work-dir", str(tmp_path / "work"), "--docs-dir", str(tmp_path / "docs"),
        "--workers", "2",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "worker 2 started" in res.output
    cells = sorted(p.name for p in (tmp_path / "res" / "table1").glob("*.json"))
    assert cells == ["gender-deepfm-base-s1@r6000-e1.json", "gender-wdl-base-s1@r6000-e1.json"]
    log = (tmp_path / "work" / "worker-2.log").read_text()
    by_main = int(res.output.split(" cell(s) run this time")[0].split()[-1])
    by_worker = int(log.split(" cell(s) run this time")[0].split()[-1])
    assert by_main + by_worker == 2  # each cell ran once, in one process or the other
    assert not list((tmp_path / "work").glob("*.lock"))


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    app = typer.Typer()
    register_reproduce(app)
    res = CliRunner().invoke(app, [
        "--table", "table1", "--split", "gender", "--backbone", "wdl", "--seed", "1",
        "--data-dir", str(tmp_path), "--results-dir", str(tmp_path / "res"),
        "--work-dir", str(tmp_path / "work"), "--docs-dir", str(tmp_path / "docs"),
    ])  # fmt: skip
    assert res.exit_code == 2
    assert "MovieLens-1M not found" in res.output


def test_every_grid_method_has_a_run_tag_a_label_and_a_training_method() -> None:
    from mdlora.training.config import RECIPES
    from mdlora.training.reproduce.grid import ALL_METHODS, Cell

    for method in ALL_METHODS:
        cell = Cell("multilora", "age-groups", "mlp", method, 1, experts=2)
        assert cell.run_tag.startswith(method) and cell.label
        assert cell.train_method in RECIPES
    moe = Cell("figure2", "gender", "deepfm", "moe", 1, experts=3)
    assert moe.run_tag == "moe-k3"  # k experts per domain are another model
    assert Cell("table1", "gender", "deepfm", "mlora", 1, experts=3).run_tag == "mlora"
