"""End-to-end training on small generated data: learning, determinism, resume, divergence."""

import json
from pathlib import Path

import pytest
import torch

import ctr.train as train_module
from ctr.checkpoint import CheckpointError, load_checkpoint
from ctr.config import TrainerConfig
from ctr.embedding_config import embedding_config
from ctr.experiment import ExperimentConfig
from ctr.models import model_config
from ctr.train import Trainer, TrainingDiverged
from features.prepare import PrepareResult
from features.schema import DatasetConfig

pytestmark = pytest.mark.slow


def experiment(prepared: PrepareResult, run_dir: Path, model: str = "dnn", **trainer: object) -> Trainer:
    cfg = ExperimentConfig(
        name="t",
        dataset=DatasetConfig(name="test", layout="criteo_tsv", output=str(prepared.output)),
        model=model_config(name=model, hidden=[32, 16], embedding=embedding_config(dim=8),
                           **({"cross_layers": 2} if model == "dcnv2" else {})),
        trainer=TrainerConfig(**{"batch_size": 512, "eval_batch_size": 4096, "epochs": 2, "eval_every_steps": 10,
                                 "progress": False, "threads": 1, "sparse_lr": 0.05, "lr": 3e-3, **trainer}),
    )
    return Trainer(cfg, prepared.feature_map, prepared.output, run_dir)


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_is_deterministic(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    # two threads, the default on this machine: a race in any backward would show up here
    trainer = experiment(prepared_criteo, tmp_path / "a", model="dcnv2", threads=2)
    a = trainer.fit()
    b = experiment(prepared_criteo, tmp_path / "b", model="dcnv2", threads=2).fit()
    assert a["test_auc"] > 0.70  # teacher AUC is ~0.80; random is 0.5
    timing = ("train_seconds", "train_samples_per_s")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    # throughput counts every trained row (batches of 512, each epoch's last one short; early
    # stopping may end the second epoch part-way) over the loop's own time
    rows = prepared_criteo.feature_map.splits["train"].rows
    epochs, extra_steps = divmod(a["steps"], -(-rows // 512))
    assert trainer.loop_samples == epochs * rows + extra_steps * 512
    assert a["train_samples_per_s"] == pytest.approx(trainer.loop_samples / trainer.loop_seconds)
    assert trainer.loop_seconds < a["train_seconds"]  # validation and checkpoints are outside it
    lines = metrics_lines(tmp_path / "a")
    assert [l["event"] for l in lines][-1] == "test" and lines[0]["step"] == 10
    # each validation records the loop seconds so far: a time-to-AUC curve
    loop = [l["loop_seconds"] for l in lines if l["event"] == "valid"]
    assert 0 < loop[0] and loop == sorted(loop) and loop[-1] <= trainer.loop_seconds + 1e-3
    assert {"auc", "logloss", "ne", "calibration"} <= set(lines[0])
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    assert best["loop"]["best_auc"] == a["best_valid_auc"]


def test_resume_after_a_kill_ends_with_the_same_metrics(prepared_criteo: PrepareResult, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    straight = experiment(prepared_criteo, tmp_path / "straight").fit()
    real_step = Trainer._step
    calls = {"n": 0}

    def dies_after_42_steps(self: Trainer, batch: object) -> float:
        calls["n"] += 1
        if calls["n"] > 42:  # mid-epoch, two steps after the checkpoint of step 40
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_step", dies_after_42_steps)
    with pytest.raises(KeyboardInterrupt):
        experiment(prepared_criteo, tmp_path / "killed").fit()
    monkeypatch.setattr(Trainer, "_step", real_step)
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["loop"]["step"] == 40
    resumed = experiment(prepared_criteo, tmp_path / "killed").fit(resume=True)
    for key in ("test_auc", "test_logloss", "best_valid_auc", "best_step", "steps"):
        assert resumed[key] == straight[key], key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared_criteo: PrepareResult, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = train_module.binary_cross_entropy_with_logits
    calls = {"n": 0}

    def nan_at_step_15(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real_loss(logits, labels)
        return loss * float("nan") if calls["n"] == 15 else loss

    monkeypatch.setattr(train_module, "binary_cross_entropy_with_logits", nan_at_step_15)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 0, step 14; training stopped and the last good "
                                               r"checkpoint is .*last\.pt \(lower trainer\.lr"):
        experiment(prepared_criteo, tmp_path / "run").fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["loop"]["step"] == 10
    calls["n"] = 14  # the very first step of a new run: no checkpoint to name
    with pytest.raises(TrainingDiverged, match=r"step 0; training stopped and no checkpoint was written before it"):
        experiment(prepared_criteo, tmp_path / "fresh").fit()
    assert not (tmp_path / "fresh" / "checkpoints" / "last.pt").exists()


def test_early_stopping_and_lr_decay(prepared_criteo: PrepareResult, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_metrics = train_module.classification_metrics
    scripted = iter([0.70, 0.69, 0.68])  # validation AUC falls after the first validation

    def metrics(labels: object, probs: object) -> dict:
        out = real_metrics(labels, probs)
        return {**out, "auc": next(scripted, out["auc"])}

    monkeypatch.setattr(train_module, "classification_metrics", metrics)
    result = experiment(prepared_criteo, tmp_path / "run", patience=2, epochs=3).fit()
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["loop"]
    assert last["stopped"] and last["bad_evals"] == 2 and result["steps"] == 30
    assert last["lr"] == pytest.approx(3e-5) and last["sparse_lr"] == pytest.approx(5e-4)  # x0.1 per plateau
    assert result["best_step"] == 10 and result["best_valid_auc"] == 0.70
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["loop"]["step"] == 10


def test_truncated_checkpoint_fails_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable checkpoint"):
        load_checkpoint(bad)


def test_resume_after_sigkill_of_the_training_process(prepared_criteo: PrepareResult, synthetic_criteo: Path,
                                                      tmp_path: Path) -> None:
    """A real kill -9 of `ctr train` mid-epoch, then `ctr train --resume`: same metrics as a straight run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "exp.yaml"
    config.write_text(f"""
name: killed
dataset: {{name: test, layout: criteo_tsv, raw: [{synthetic_criteo}], output: {prepared_criteo.output},
          min_count: 2, row_group_size: 2048}}
model: {{name: dnn, hidden: [32, 16], embedding: {{dim: 8}}}}
trainer: {{batch_size: 128, eval_batch_size: 4096, epochs: 2, eval_every_steps: 20, progress: false, threads: 1}}
""")
    ctr = [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*ctr, "train", str(config), f"trainer.run_dir={tmp_path / 'straight'}"], check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*ctr, "train", str(config), f"trainer.run_dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "result.json").exists()
    subprocess.run([*ctr, "train", "--resume", str(killed)], check=True, env=env, capture_output=True)
    straight = json.loads((tmp_path / "straight" / "result.json").read_text())
    resumed = json.loads((killed / "result.json").read_text())
    for key in ("test_auc", "test_logloss", "best_valid_auc", "best_step", "steps"):
        assert resumed[key] == straight[key], key
    # every validation appears once, as in the straight run
    assert [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(l)["step"] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_resume_before_the_first_checkpoint_starts_over(prepared_criteo: PrepareResult, tmp_path: Path) -> None:
    straight = experiment(prepared_criteo, tmp_path / "a").fit()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"event": "valid", "epoch": 0, "step": 10, "auc": 0.5}\n')
    resumed = experiment(prepared_criteo, tmp_path / "b").fit(resume=True)
    assert resumed["test_auc"] == straight["test_auc"] and resumed["steps"] == straight["steps"]
    untimed = lambda run: [{k: v for k, v in line.items() if k != "loop_seconds"} for line in metrics_lines(run)]  # noqa: E731
    assert untimed(tmp_path / "b") == untimed(tmp_path / "a")


def test_fused_dense_optimizer_follows_the_plain_one(prepared_criteo: PrepareResult, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's fused Adam (one kernel for all dense parameters) against torch's default Adam: the
    same losses over three steps, within 1e-5."""
    def losses(run_dir: Path) -> list[float]:
        trainer = experiment(prepared_criteo, run_dir, model="dcnv2")
        torch.set_num_threads(1)
        with train_module.local_process_group():
            trainer._build()
            return [trainer._step(batch) for _, batch in zip(range(3), trainer.train_data)]

    fused = losses(tmp_path / "fused")
    plain_adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **kw: plain_adam(*a, **{**kw, "fused": False}))
    plain = losses(tmp_path / "plain")
    assert fused == pytest.approx(plain, abs=1e-5) and fused[0] != fused[2]
