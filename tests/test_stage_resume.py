"""Every stage's training phases resume the same way (``ctr.compress.stage.train_phase``): a stage
killed in a phase resumes at that phase's last checkpoint, not at its start, and ends with the same
checkpoint as a run that was never killed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctr.checkpoint import load_checkpoint
from ctr.compress.recipe import run_recipe
from ctr.config import AFMConfig, AFMStep, CompressStep, OptEmbedConfig, OptEmbedStep, OptFSConfig, OptFSStep, RankRule
from ctr.experiment import ExperimentConfig
from ctr.run_dir import RunDir
from ctr.train import Trainer
from features.prepare import PrepareResult

from conftest import copy_run, recipe_experiment

EVERY = 3  # checkpoint steps of the test phases
OPTFS = OptFSStep(optfs=OptFSConfig(search_epochs=2, rewind_epoch=1, retrain_epochs=1, final_temp=50.0, penalty=1e-4,
                                    field_p=1.0))
CASES = {  # the phase killed, in which stage, after how many of its steps
    "optfs search": (OPTFS, "search", 10),  # in its second epoch, after the rewind weights were saved
    "optfs retrain": (OPTFS, "retrain", 7),
    "optembed supernet": (OptEmbedStep(optembed=OptEmbedConfig(supernet_epochs=2, search_rows=2000, population=4, parents=2,
                                                              generations=1, retrain_epochs=1)), "supernet", 11),
    "afm fine-tune": (AFMStep(afm=AFMConfig(layer_rank=RankRule(fixed=4), embedding_rank=RankRule(fixed=4),
                                            finetune_epochs=1)), "finetune", 5),
}


def experiment(prepared: PrepareResult, run_dir: Path, step: CompressStep) -> ExperimentConfig:
    base = recipe_experiment(prepared, run_dir, "dnn", [])
    return ExperimentConfig(name="t", dataset=base.dataset, model=base.model, compress=[step],
                            trainer=base.trainer.model_copy(update={"checkpoint_every_steps": EVERY}))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_stage_killed_in_a_phase_resumes_there_and_ends_as_if_never_killed(
        baselines: dict[str, Path], prepared_criteo: PrepareResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        case: str) -> None:
    step, phase, kill_after = CASES[case]
    fmap, data = prepared_criteo.feature_map, prepared_criteo.output
    real_step = Trainer._step
    steps: dict[str, int] = {}

    def counted(self: Trainer, batch: object) -> float:
        steps[self.run_dir.name] = steps.get(self.run_dir.name, 0) + 1
        if self.run_dir.name == phase and steps[phase] > kill_after >= 0:
            raise KeyboardInterrupt  # a kill, mid-phase
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_step", counted)
    straight = copy_run(baselines, "dnn", tmp_path / "straight")
    kill_after = -1  # read by counted(): never kill
    run_recipe(experiment(prepared_criteo, straight, step), fmap, data, straight)
    total, earlier = steps[phase], list(steps)[:list(steps).index(phase)]
    assert total > CASES[case][2] + EVERY, "the kill must fall inside the phase, after a checkpoint"

    killed = copy_run(baselines, "dnn", tmp_path / "killed")
    cfg = experiment(prepared_criteo, killed, step)
    steps.clear()
    kill_after = CASES[case][2]
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg, fmap, data, killed)
    stage = RunDir(killed).stage(1, step.stage[0])
    saved = load_checkpoint(stage.phase(phase).last)["loop"]["step"]
    assert saved == kill_after - kill_after % EVERY
    steps.clear()
    kill_after = -1
    run_recipe(cfg, fmap, data, killed)
    assert steps[phase] == total - saved  # resumed at the checkpoint, not at the phase's start
    assert not set(earlier) & set(steps)  # the phases done before the kill are not trained again
    final = load_checkpoint(stage.checkpoint)["model"]
    expected = load_checkpoint(RunDir(straight).stage(1, step.stage[0]).checkpoint)["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final), case
