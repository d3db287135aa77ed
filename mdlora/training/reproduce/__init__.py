"""Reproduce the papers' MovieLens tables: the grid, the cell runner, the cache and the report.

``mdlora reproduce`` walks a grid of *cells*. A cell is one method trained on one data setting
with one backbone and one seed; its test metrics are cached as JSON under
``results/reproduce/<table>/<cell-id>.json`` and a cached cell is never run again. The report
(``docs/results.md`` and the PNG plots beside it) is rebuilt from the cache alone.

Tables (ALGORITHMS.md):

* ``table1`` -- MoE-MLoRA's Table 1 on MovieLens-1M: splits gender / age / occupation x the
  eight backbones x Base, MLoRA, MoE-MLoRA, WAUC;
* ``figure2`` -- MoE-MLoRA's Figure 2: gender split, k = 1..4 experts per domain;
* ``multilora`` -- MultiLoRA's Tables 3-5 and 7: the MultiLoRA setting (3 age groups, gender
  auxiliary), Single / Mix / Fine-tune / SingleLoRA / MultiLoRA (+ -add, -avg) with the MLP
  backbone, and Mix / Fine-tune / SingleLoRA / MultiLoRA with WDL, DCN and DeepFM;
* ``add_domain`` -- one occupation held out of training, added afterwards through
  ``mdlora.training.add_domain.add_domain`` (what ``mdlora add-domain`` runs), compared with the
  backbone alone and with the full retraining (the ``table1`` occupation cells).

Every cell trains through :func:`mdlora.training.run.run_training`. Cells of one (data, backbone,
seed) *group* share the phases they have in common -- phase 1, the backbone, is the same
computation for every method, and SingleLoRA / MultiLoRA-add / -avg repeat MultiLoRA's LoRA
phases -- by seeding the run's per-phase checkpoints (``resume``) from the run that trained
them first. Each phase reseeds from the config seed, so a seeded run ends with exactly the
weights of an unshared one (``tests/training/test_reproduce.py`` checks this).

The wing, one job a module: ``grid`` (the papers' numbers, cells, settings), ``data`` (ML-1M
loaded once, the held-out occupation), ``runner`` (one cell), ``cache`` (one JSON file a
cell), ``schedule`` (walking the grid, group locks), ``stats`` (means over seeds), ``report``
and ``summary`` (``docs/results.md``; its words are in ``report_template.md``), ``plots`` (its
PNGs), ``run`` (the entry point). This package re-exports their names, so
``from mdlora.training.reproduce import ...`` keeps working.
"""

from __future__ import annotations

from mdlora.training.reproduce.cache import (  # noqa: F401
    _alias,
    load_cache,
    read_cell,
    write_cell,
)
from mdlora.training.reproduce.data import (  # noqa: F401
    DataCache,
    HoldoutData,
    _slice_options,
    holdout_setting,
)
from mdlora.training.reproduce.grid import (  # noqa: F401
    ADAPTER_PREFIXES,
    ADD_DOMAIN_BACKBONES,
    ALL_METHODS,
    BACKBONE_LABELS,
    DATA_ENV,
    DEFAULT_DOCS,
    DEFAULT_RESULTS,
    DEFAULT_WORK,
    FIGURE2_BACKBONES,
    FIGURE2_EXPERTS,
    HOLDOUT_DOMAIN,
    HOLDOUT_NAME,
    LABELS,
    MULTILORA_BACKBONES,
    MULTILORA_METHODS_MLP,
    MULTILORA_METHODS_OTHER,
    MULTILORA_PREFIX,
    MULTILORA_SPLIT,
    PAPER_MULTILORA,
    PAPER_TABLE1_AVG,
    PAPER_TABLE1_CELLS,
    REPO_ROOT,
    SEEDS,
    TABLE1_BACKBONES,
    TABLE1_METHODS,
    TABLE1_SPLITS,
    TABLE7_METHOD,
    TABLES,
    Cell,
    ReproduceError,
    Settings,
    Slice,
    _check_choices,
    _keep,
    _pick,
    build_grid,
    check_data,
    default_data_dir,
)
from mdlora.training.reproduce.plots import (  # noqa: F401
    _plt,
    _save,
    plot_figure2,
    plot_multilora,
    plot_table1,
)
from mdlora.training.reproduce.report import (  # noqa: F401
    _commands,
    _diff,
    _noise_note,
    _not_run_block,
    _param_table,
    _pp,
    _status,
    _time_lines,
    location_options,
    report_add_domain,
    report_figure2,
    report_multilora,
    report_table1,
    write_report,
)
from mdlora.training.reproduce.run import (  # noqa: F401
    reproduce,
    with_slice,
)
from mdlora.training.reproduce.runner import (  # noqa: F401
    _checkpoint_paths,
    _device_name,
    _metrics,
    _param_counts,
    _phase_names,
    _run_add_domain,
    _train_cell,
    run_cell,
    run_method,
    seed_shared_phases,
    shareable_phases,
    train_config,
)
from mdlora.training.reproduce.schedule import (  # noqa: F401
    GroupLock,
    _cell_line,
    _hms,
    estimate_seconds,
    run_grid,
)
from mdlora.training.reproduce.stats import (  # noqa: F401
    Stat,
    _select,
    _wauc_of,
    significant,
    table1_stats,
)
from mdlora.training.reproduce.summary import (  # noqa: F401
    FAST_DROPOUT_SINCE,
    _adapters_never_improved,
    _code_line,
    _discussion,
    _domain_auc,
    _probe_lines,
    _rel,
    _setup_section,
    amazon_section,
    summary_section,
)
