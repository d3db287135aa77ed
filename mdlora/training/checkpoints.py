"""Per-phase checkpoints of a run (``<run>/checkpoints``): what makes a run resumable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mdlora.models.model import MultiDomainModel
from mdlora.training.config import ConfigError
from mdlora.training.loop import Phase, PhaseResult


class Checkpoints:
    """Per-phase weights in ``<run>/checkpoints`` so an interrupted run can resume.

    A phase whose checkpoint exists (and was made under the same config fingerprint) is
    loaded instead of trained; each phase reseeds from the config seed, so a resumed run
    ends with the same weights as an uninterrupted one.
    """

    def __init__(self, directory: Path, fingerprint: str, resume: bool, write: bool) -> None:
        self.dir, self.fingerprint, self.resume, self.write = directory, fingerprint, resume, write

    def paths(self, tag: str, index: int, phase: str) -> tuple[Path, Path]:
        """The weights and metadata files of phase ``index`` (named ``phase``) of ``tag``.

        Public so that a driver running several methods can share a phase (e.g. the
        backbone) between their run folders by copying these two files.
        """
        stem = f"{tag}-{index:02d}-{phase.replace(':', '_')}"
        return self.dir / f"{stem}.safetensors", self.dir / f"{stem}.json"

    def run(
        self, model: MultiDomainModel, tag: str, index: int, phase: Phase,
        train: Callable[[], PhaseResult],
    ) -> PhaseResult:  # fmt: skip
        weights, meta = self.paths(tag, index, phase.name)
        if self.resume and weights.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            if info.get("fingerprint") != self.fingerprint:
                raise ConfigError(
                    f"{meta} was written under a different config; use another out folder "
                    "or remove its checkpoints/ to start over"
                )
            state = load_file(weights, device=str(model.device))
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:  # e.g. other adapter ranks than when it was written
                raise ConfigError(
                    f"{weights} does not fit this run's model ({str(exc).splitlines()[-1]}): "
                    "its settings changed since (ranks, alpha, tower...); use another out "
                    "folder or remove its checkpoints/ to start over"
                ) from None
            model.set_stage(phase.stage, expert=phase.expert, division=phase.division)
            result = PhaseResult(**info["result"])
            print(f"resumed phase {phase.name} from {weights}")
            return result
        result = train()
        if self.write:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_file(state_dict_cpu(model), str(weights))
            meta.write_text(json.dumps({"fingerprint": self.fingerprint,
                                        "result": result.to_dict()}, indent=2))  # fmt: skip
        return result


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
