"""The training loop on tiny models and toy facts: unlearning effect, resume, NaN, CLI, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soul.cli import main
from soul.models import load_model, save_model
from soul.testing import tiny_model
from soul.train import NonFiniteLossError, finetune, list_presets, make_config, unlearn
from soul.train.loop import epoch_batches, hash_records, lr_factor

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "teal", "navy"]
FACTS = [{"question": f"What colour does {n} like?", "answer": f"{n} likes {c}."} for n, c in zip(NAMES, COLOURS)]
# forget10 / retain90 naming so the retain split is derived as in TOFU.
DATA = {"full": FACTS, "forget10": FACTS[:2], "retain90": FACTS[2:]}
QUIET = {"progress": False}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def toy_target(tmp_path_factory) -> Path:
    """A tiny Llama fine-tuned on the toy facts (the 'target' model), saved to disk."""
    model, tok = tiny_model("llama")
    out = tmp_path_factory.mktemp("target") / "model"
    finetune(model, tok, data=DATA, split="full", max_steps=40, batch_size=8, lr=1e-2, warmup_ratio=0.0,
             out_dir=out, **QUIET)
    return out


def test_lr_schedule_hand_computed():
    # W = 2 warm-up steps, T = 6: factors (1/2, 2/2, then (6-s)/(6-2) for s = 2..5).
    assert [lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_epoch_batches_partition_and_determinism():
    one = epoch_batches(10, 3, seed=5, epoch=2)
    assert one == epoch_batches(10, 3, seed=5, epoch=2)  # a pure function of (seed, epoch)
    assert one != epoch_batches(10, 3, seed=5, epoch=3)
    assert sorted(i for b in one for i in b) == list(range(10))
    ranks = [epoch_batches(7, 2, seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # padded cyclically so every process takes as many steps
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == 8 and set(seen) == set(range(7))


def test_finetune_learns_the_facts(toy_target):
    record = json.loads((toy_target / "run.json").read_text())
    log = [json.loads(line) for line in (toy_target / "train_log.jsonl").read_text().splitlines()]
    assert record["steps"] == 40 and [r["step"] for r in log] == list(range(1, 41))
    assert log[-1]["nll"] < 0.5 * log[0]["nll"]
    assert record["data"]["train"]["sha256"] == hash_records(FACTS)


def test_graddiff_sophia_forgets_more_than_it_retains(toy_target):
    model, tok = load_model(toy_target)
    _, record = unlearn(model, tok, data=DATA, forget_split="forget10", objective="graddiff", optimizer="sophia",
                        max_steps=20, batch_size=2, lr=3e-4, warmup_ratio=0.0, weight_decay=0.0,
                        hessian_interval=5, probe_every=20, **QUIET)
    before, after = record["initial_probe"], record["final_probe"]
    drop_forget = before["forget_prob"] - after["forget_prob"]
    drop_retain = before["retain_prob"] - after["retain_prob"]
    assert drop_forget > 0.2 * before["forget_prob"], (before, after)
    assert drop_forget >= 2 * drop_retain, (before, after)
    assert record["final"]["hessian_updates"] == 4  # steps 0, 5, 10, 15 (0-based) refreshed the Hessian


def _unlearn_cfg(out: Path, **extra):
    return dict(data=DATA, forget_split="forget10", objective="graddiff", optimizer="sophia", max_steps=8,
                batch_size=1, grad_accum=2, lr=1e-3, hessian_interval=3, checkpoint_every=3, out_dir=out,
                **QUIET, **extra)


class Killed(Exception):
    pass


def test_kill_and_resume_gives_the_same_weights(toy_target, tmp_path):
    unlearn(str(toy_target), **_unlearn_cfg(tmp_path / "straight"))

    def kill_after_5(step, record):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        unlearn(str(toy_target), on_step_end=kill_after_5, **_unlearn_cfg(tmp_path / "killed"))
    assert (tmp_path / "killed" / "checkpoints" / "step-00000003").is_dir()
    _, record = unlearn(str(toy_target), resume=True, **_unlearn_cfg(tmp_path / "killed"))
    assert record["resumed_from_step"] == 3 and record["steps"] == 8
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], weights(toy_target)["model.layers.0.mlp.up_proj.weight"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the lines of killed steps 4-5 were dropped on resume


def test_nan_loss_stops_with_message_and_keeps_checkpoint(toy_target, tmp_path):
    from soul.objectives import build_objective

    inner = build_objective("graddiff")

    class PoisonAtStep4:
        name, needs_retain, needs_reference, needs_refusal = "graddiff", True, False, False
        calls = 0

        def __call__(self, model, forget_batch, retain_batch=None, ref_model=None):
            self.calls += 1
            out = inner(model, forget_batch, retain_batch, ref_model)
            if self.calls == 7:  # step 4, first micro-batch (2 micro-batches per step)
                out.loss = out.loss * float("nan")
                out.parts["forget_nll"] = float("nan")
            return out

    with pytest.raises(NonFiniteLossError, match=r"step 4: loss part 'forget_nll' = nan") as err:
        unlearn(str(toy_target), **{**_unlearn_cfg(tmp_path / "run"), "objective": PoisonAtStep4()})
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert err.value.checkpoint == checkpoint and str(checkpoint) in str(err.value)
    _, record = unlearn(str(toy_target), resume=True, **_unlearn_cfg(tmp_path / "run"))  # still loadable
    assert record["resumed_from_step"] == 3 and record["steps"] == 8


def test_grad_accum_matches_a_bigger_batch(toy_target):
    """Accumulating 2 micro-batches of 2 = one batch of 4: the per-sequence losses are averaged the same way."""
    results = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model, _ = finetune(str(toy_target), data=DATA, split="full", optimizer="sgd", lr=0.1, max_steps=2,
                            batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0, **QUIET)
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_lora_is_merged_into_a_plain_model(toy_target, tmp_path):
    unlearn(str(toy_target), data=DATA, optimizer="adamw", lr=1e-2, max_steps=2, batch_size=2,
                        lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                        out_dir=tmp_path / "lora", **QUIET)
    before, after = weights(toy_target), weights(tmp_path / "lora")
    assert after.keys() == before.keys()  # no lora_A/lora_B left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


def _write_data(directory: Path) -> Path:
    directory.mkdir()
    for split, records in DATA.items():
        (directory / f"{split}.json").write_text(json.dumps(records))
    return directory


def test_cli_finetune_then_unlearn(tmp_path):
    model, tok = tiny_model("llama")
    save_model(model, tok, tmp_path / "base")
    data = _write_data(tmp_path / "data")
    assert main(["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--out",
                 str(tmp_path / "target"), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
                 "--no-progress"]) == 0
    target_before = weights(tmp_path / "target")
    assert main(["unlearn", "--model", str(tmp_path / "target"), "--data", str(data), "--forget-split", "forget10",
                 "--objective", "graddiff", "--optimizer", "sophia", "--estimator", "gnb", "--max-steps", "3",
                 "--batch-size", "2", "--out", str(tmp_path / "unlearned"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "unlearned" / "run.json").read_text())
    assert record["steps"] == 3 and record["config"]["retain_split"] == "retain90"
    assert record["data"]["forget"]["sha256"] == hash_records(DATA["forget10"])
    assert record["data"]["retain"]["n"] == 6
    assert set(record["final"]) >= {"forget_nll", "retain_nll", "lr", "grad_norm", "clip_fraction"}
    after = weights(tmp_path / "unlearned")
    assert any(not torch.equal(after[k], target_before[k]) for k in after)
    target_after = weights(tmp_path / "target")
    assert all(torch.equal(target_before[k], target_after[k]) for k in target_before)  # input untouched


def test_yaml_config_with_command_line_override(toy_target, tmp_path):
    data = _write_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {toy_target}\ndata: {data}\nlr: 0.02\nmax_steps: 5\nbatch_size: 2\n"
                      "optimizer: adamw\nobjective: ga\nprogress: false\n")
    assert main(["unlearn", "--config", str(config), "--max-steps", "2", "--out", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    assert (saved["lr"], saved["max_steps"], saved["batch_size"], saved["objective"]) == (0.02, 2, 2, "ga")


def test_out_dir_equal_to_input_model_is_refused(toy_target, tmp_path, capsys):
    before = weights(toy_target)
    code = main(["unlearn", "--model", str(toy_target), "--data", str(_write_data(tmp_path / "d")),
                 "--max-steps", "1", "--out", str(toy_target), "--no-progress"])
    assert code == 2 and "would replace the input" in capsys.readouterr().err
    after = weights(toy_target)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_option_is_a_clear_error(tmp_path, capsys):
    code = main(["unlearn", "--model", "x", "--hessian-batch", "sideways", "--out", str(tmp_path / "o")])
    assert code == 2 and "'hessian_batch' must be one of" in capsys.readouterr().err


def test_presets_are_valid_configs():
    names = list_presets()
    assert {"tofu_forget10_graddiff_sophia", "tofu_finetune_llama2", "cpu_smollm2_finetune"} <= set(names)
    cfg = make_config(preset="tofu_forget10_graddiff_sophia", lr=1e-6)
    # SOUL's SO-GradDiff: retain weight 2 (our alpha), effective batch 1 x 4; explicit values win over presets.
    assert (cfg.alpha, cfg.gamma, cfg.batch_size * cfg.grad_accum, cfg.lr) == (2.0, 1.0, 4, 1e-6)


def test_keep_best_saves_the_best_probed_weights(toy_target, tmp_path):
    # Pure gradient ascent at a large lr only hurts the retain answers, so the best retain probability is the
    # probe before training (step 0) and the saved model must be the input model, bit for bit.
    _, record = unlearn(str(toy_target), data=DATA, objective="ga", optimizer="adamw", lr=5e-2, max_steps=4,
                        batch_size=2, probe_every=2, keep_best="retain_prob", out_dir=tmp_path / "best", **QUIET)
    assert record["best"]["step"] == 0
    assert record["final_probe"]["retain_prob"] < record["initial_probe"]["retain_prob"]
    before, after = weights(toy_target), weights(tmp_path / "best")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_runs_with_different_mixed_precision_share_one_process(toy_target):
    """A pipeline fine-tunes in fp32 and then unlearns in bf16 in the same process; accelerate keeps one
    process-wide state and would refuse the second run's settings without the loop releasing it. The bf16
    run really trains under autocast: its weights differ from the fp32 run's."""
    kwargs = dict(data=DATA, forget_split="forget10", objective="ga", optimizer="sgd", lr=0.1, max_steps=2,
                  batch_size=2, max_grad_norm=0, **QUIET)
    fp32, _ = unlearn(str(toy_target), mixed_precision="no", **kwargs)
    bf16, record = unlearn(str(toy_target), mixed_precision="bf16", **kwargs)
    assert record["mixed_precision"] == "bf16"
    again, _ = unlearn(str(toy_target), mixed_precision="no", **kwargs)
    a, b, c = fp32.state_dict(), bf16.state_dict(), again.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)
