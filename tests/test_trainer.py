"""Trainer: overfitting, checkpoints (atomic, corrupt, missing), exact resume, NaN stop, 2-process DDP/FSDP2.

Runs on CPU with a nano PocketDiT in pixel space at 16x16 and a deterministic fake text encoder. The
file is also the worker script of the distributed tests (`torchrun ... tests/test_trainer.py ddp OUT`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketdit.autoencoder import PixelSpace
from pocketdit.config import load_config
from pocketdit.methods import build_method
from pocketdit.methods.pretrain import FlowMatchingPretrain
from pocketdit.model import PocketDiT
from pocketdit.checkpoint import CheckpointError, load_checkpoint_weights, resolve_checkpoint
from pocketdit.trainer import NonFiniteLossError, Trainer

torch.set_num_threads(1)  # tiny ops: OpenMP threads only add contention on a shared CPU


class FakeText:
    """Deterministic stand-in for a TextConditioner: states depend only on the caption's characters."""

    embed_dims = (32,)
    dropout_probs = [0.2]

    def encode(self, prompts):
        states = torch.stack(
            [torch.randn(6, 32, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        )
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]


def make_dataset(n=32, res=16, seed=0):
    """Smooth images (a colour plus a ramp) so that a few steps visibly fit them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.5, 0.5, res)[None, :, None].expand(3, res, res)
    return [
        {"image": (torch.rand(3, 1, 1, generator=g) * 1.4 - 0.7 + ramp).clamp(-1, 1), "caption": f"caption {i % 5}",
         "meta": {"i": i}}
        for i in range(n)
    ]


def make_config(out, steps, *extra):
    return load_config(None, [
        "--train.output_dir", str(out), "--train.steps", str(steps), "--data.batch_size", "4",
        "--data.resolution", "16", "--train.checkpoint_every", "3", "--train.sample_every", "0",
        "--train.log_every", "1", "--train.progress", "false", "--optim.warmup_steps", "2", "--optim.lr", "2e-3",
        *extra,
    ])


def make_method(cls=FlowMatchingPretrain, model_overrides=None, **kwargs):
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, **(model_overrides or {}))
    return cls(model, FakeText(), PixelSpace(), **kwargs)


def make_elastic_method(**kwargs):
    """nano with 4 KV heads (widths in quarters), a supernet over 0.5 / 0.75 / 1.0."""
    from pocketdit.methods.elastic import ElasticPretrain

    overrides = dict(num_kv_heads=4, elastic_widths=[0.5, 0.75, 1.0])
    kwargs.setdefault("seed", 1)  # draws 0.5, 0.75, 0.75, 0.5 in steps 0-3: both sub-widths within 4 steps
    return make_method(ElasticPretrain, model_overrides=overrides, **kwargs)


def run(out, steps, *extra, method=None, dataset=None):
    cfg = make_config(out, steps, *extra)
    trainer = Trainer(method or make_method(), dataset or make_dataset(), cfg)
    return trainer, trainer.train()


# ----------------------------------------------------------------------------------------------------
def test_losses_decrease_on_tiny_overfit(tmp_path):
    data = make_dataset(n=4)
    cfg = make_config(tmp_path, 40, "--train.checkpoint_every", "1000", "--optim.lr", "3e-3")
    trainer = Trainer(make_method(caption_dropout=0.0), data, cfg)
    losses = list(trainer.train().values())
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    # logs, plot and a final checkpoint exist
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0000040"


def test_lr_schedules(tmp_path):
    def lrs(*extra):
        trainer = Trainer(make_method(), make_dataset(n=4), make_config(tmp_path, 10, *extra))
        return [trainer.lr_at(s) for s in range(10)]

    base = 2e-3
    assert lrs() == pytest.approx([base * 0.5, base] + [base] * 8)
    # wsd: constant until the last decay_steps, then linear to the floor, reached at the last step
    wsd = lrs("--optim.schedule", "wsd", "--optim.decay_steps", "4", "--optim.min_lr_ratio", "0")
    assert wsd == pytest.approx([base * 0.5] + [base] * 5 + [base * 0.75, base * 0.5, base * 0.25, 0.0])
    cos = lrs("--optim.schedule", "cosine")
    assert cos[2] == pytest.approx(base) and cos[-1] > base * 0.1 and all(a >= b for a, b in zip(cos[1:], cos[2:]))
    with pytest.raises(Exception, match="optim.decay_steps"):
        make_config(tmp_path, 10, "--optim.schedule", "wsd")


def test_checkpoint_layout_and_loading(tmp_path):
    trainer, _ = run(tmp_path, 3)
    ckpt = resolve_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-0000003"
    for f in ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "ema/config.json",
              "ema/diffusion_pytorch_model.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json"]:
        assert (ckpt / f).is_file(), f
    # the raw weights are a diffusers model directory
    raw = PocketDiT.from_pretrained(str(ckpt / "transformer"))
    for (n, a), b in zip(raw.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), n
    ema = load_checkpoint_weights(tmp_path, ema=True)
    diff = [not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters())]
    assert any(diff)  # EMA lags the raw weights
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 3 and state["epoch"] == 0


def test_keep_only_last_checkpoints(tmp_path):
    run(tmp_path, 9, "--train.keep_checkpoints", "2")
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-0000006", "checkpoint-0000009"]


class KilledAt(FlowMatchingPretrain):
    """Dies (like a killed process) when asked for the batch of step `kill_at` (1-based)."""

    kill_at = 5

    def step(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        return super().step(batch)


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    # 32 samples / batch 4 = 8 batches an epoch: the 10 steps cross an epoch boundary.
    _, full = run(tmp_path / "full", 10)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", 10, method=make_method(KilledAt))
    assert (tmp_path / "killed" / "latest").read_text().strip() == "checkpoint-0000003"
    trainer, resumed = run(tmp_path / "killed", 10, "--train.resume", "auto")
    assert list(resumed) == list(range(4, 11))
    for step, loss in resumed.items():
        assert loss == full[step], (step, loss, full[step])  # bit-identical
    for a, b in zip(trainer.model.state_dict().values(), load_checkpoint_weights(tmp_path / "full", ema=False).state_dict().values()):
        assert torch.equal(a, b)
    # the log of the killed run was cut back to the checkpoint, then continued: one line per step
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import pocketdit.checkpoint as checkpoint_mod

    real = checkpoint_mod.save_weights_dir
    calls = {"n": 0}

    def flaky(directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second checkpoint, while writing its EMA weights
            (directory).mkdir(parents=True, exist_ok=True)
            (directory / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "save_weights_dir", flaky)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, 6)
    monkeypatch.setattr(checkpoint_mod, "save_weights_dir", real)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0000003"
    assert not (tmp_path / "checkpoint-0000006").exists()
    assert list(tmp_path.glob("checkpoint-0000006.tmp-*"))  # the half-written one never got its final name
    load_checkpoint_weights(tmp_path)  # the previous one is intact
    trainer, resumed = run(tmp_path, 6, "--train.resume", "auto")
    assert list(resumed) == [4, 5, 6]
    assert not list(tmp_path.glob("*.tmp-*"))  # stale temp dirs are cleaned on start


def test_corrupt_and_missing_checkpoints_are_clear_errors(tmp_path):
    run(tmp_path, 3)
    ckpt = tmp_path / "checkpoint-0000003"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_weights(tmp_path / "nothing-here")
    (ckpt / "ema" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint_weights(ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        run(tmp_path, 6, "--train.resume", str(ckpt))


class NaNAt(FlowMatchingPretrain):
    nan_at = 5

    def step(self, batch):
        out = super().step(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.nan_at:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_naming_step_and_batch(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run(tmp_path, 10, method=make_method(NaNAt))
    err = info.value
    assert err.step == 5 and err.batch_index == 4 and err.epoch == 0
    assert "step 5" in str(err) and "batch 4" in str(err) and "checkpoint-0000003" in str(err)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0000003"
    assert not (tmp_path / "checkpoint-0000005").exists()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "error" in last and last["step"] == 5


def test_method_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown training method"):
        build_method("nope")
    model = PocketDiT.from_preset("nano", in_channels=3)
    with pytest.raises(ValueError, match="method.logit_sd"):
        build_method("pretrain", model=model, text_conditioner=FakeText(), autoencoder=PixelSpace(), logit_sd=1.0)


def test_gradient_checkpointing_gives_the_same_losses_and_bf16_runs(tmp_path):
    _, plain = run(tmp_path / "a", 3)
    trainer, ckpt = run(tmp_path / "b", 3, "--train.gradient_checkpointing", "true")
    assert trainer.model.gradient_checkpointing
    assert all(abs(ckpt[k] - plain[k]) < 1e-5 for k in plain)
    trainer, bf16 = run(tmp_path / "c", 3, "--train.mixed_precision", "bf16")
    assert trainer.mixed_precision == "bf16"
    assert all(abs(bf16[k] - plain[k]) < 0.05 * plain[k] for k in plain)  # same maths, bf16 rounding


def test_attention_backend_option_sets_the_kernel_and_is_checked(tmp_path):
    _, plain = run(tmp_path / "a", 2)
    trainer, ref = run(tmp_path / "b", 2, "--train.attention_backend", "reference")
    assert {m.backend for m in trainer.model.modules() if hasattr(m, "backend")} == {"reference"}
    assert all(abs(ref[k] - plain[k]) < 1e-4 * plain[k] for k in plain)
    with pytest.raises(ValueError, match="train.attention_backend"):
        run(tmp_path / "c", 1, "--train.attention_backend", "fast")


def test_text_cache_gives_identical_losses(tmp_path):
    _, plain = run(tmp_path / "a", 4, method=make_method())
    _, cached = run(tmp_path / "b", 4, method=make_method(text_cache_size=3))
    assert plain == cached


# ----------------------------------------------------------------------------------------------------
# Two CPU processes on gloo
# ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,method", [("ddp", "pretrain"), ("fsdp", "pretrain"), ("ddp", "elastic"),
                                             ("fsdp", "elastic")])
def test_two_process_training(tmp_path, strategy, method):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), __file__, strategy, str(tmp_path), method,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    # a crashed rank's own traceback comes first in stderr; the launcher's summary at the end only names it
    first_error = [line for line in proc.stderr.splitlines() if line.startswith("[rank")][:60]
    assert proc.returncode == 0, "\n".join(first_error) + "\n...\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["strategy"] == strategy
    assert result["steps"] == [1, 2, 3, 4]
    assert all(v == v and v < 10 for v in result["losses"])  # finite
    # rank 0 and rank 1 ended with the same full weights, and they are what the checkpoint holds
    ckpt_model = load_checkpoint_weights(tmp_path / "run" / "checkpoint-0000004", ema=False)
    total = sum(p.double().sum().item() for p in ckpt_model.parameters())
    assert result["param_sums"][0] == pytest.approx(total, rel=1e-9)
    assert result["param_sums"][1] == pytest.approx(total, rel=1e-9)
    # resuming under the same strategy continues from step 4
    assert result["resumed_steps"] == [5, 6]
    if method == "elastic":
        # both ranks drew the same sub-width at every step and trained the supernet's private 0.5 tables
        assert result["widths"][0] == result["widths"][1] and len(result["widths"][0]) == 4
        assert len({w for ws in result["widths"][0] for w in ws}) == 2  # both sub-widths were drawn
        assert result["sub_table_moved"]


def _distributed_worker(strategy: str, out: str, method: str = "pretrain"):
    import torch.distributed as dist

    out = Path(out)
    make = make_elastic_method if method == "elastic" else make_method
    cfg = make_config(out / "run", 4, "--train.distributed", strategy, "--data.batch_size", "2",
                      "--train.checkpoint_every", "2")
    trainer = Trainer(make(), make_dataset(), cfg)
    before = make().model.down_blocks[0].scale_shift_tables["0_5"].detach().clone() if method == "elastic" else None
    widths = []
    if method == "elastic":
        original = trainer.method.widths_for_step
        trainer.method.widths_for_step = lambda step: widths.append(original(step)) or widths[-1]
    losses = trainer.train()
    from pocketdit.distributed import full_tensor

    # gathers each FSDP2 shard (collective, same order on every rank); plain tensors under DDP
    mine = sum(full_tensor(p.detach()).double().sum().item() for p in trainer.model.parameters())
    sums = [None, None]
    dist.all_gather_object(sums, mine)
    cfg2 = make_config(out / "run", 6, "--train.distributed", strategy, "--data.batch_size", "2",
                       "--train.checkpoint_every", "2", "--train.resume", "auto")
    moved = None
    if method == "elastic":
        table = full_tensor(trainer.model.down_blocks[0].scale_shift_tables["0_5"].detach())
        moved = not torch.equal(table, before)
    all_widths = [None, None]
    dist.all_gather_object(all_widths, widths)
    resumed = Trainer(make(), make_dataset(), cfg2).train()
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({
            "world_size": dist.get_world_size(), "strategy": trainer.dist.strategy, "steps": list(losses),
            "losses": list(losses.values()), "param_sums": sums, "resumed_steps": list(resumed),
            "widths": all_widths, "sub_table_moved": moved,
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(*sys.argv[1:])


def test_a_fresh_run_refuses_an_existing_run_and_overwrite_starts_clean(tmp_path):
    from pocketdit.checkpoint import RunExistsError

    run(tmp_path, 3)
    assert (tmp_path / "checkpoint-0000003").is_dir()
    with pytest.raises(RunExistsError, match="already holds a run.*--resume auto.*--overwrite"):
        run(tmp_path, 2)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0000003"  # nothing was touched
    run(tmp_path, 2, "--train.overwrite", "true", "--train.checkpoint_every", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000002"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunExistsError, match="is a file"):
        run(tmp_path / "file", 1)


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path):
    run(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.002 -> 0\.001.*--allow-config-change"):
        run(tmp_path, 4, "--train.resume", "auto", "--optim.lr", "1e-3")
    trainer, losses = run(tmp_path, 4, "--train.resume", "auto", "--train.log_every", "2")  # safe keys pass
    assert list(losses) == [4] and not (tmp_path / "config_changes.jsonl").exists()
    trainer, losses = run(tmp_path, 5, "--train.resume", "auto", "--optim.lr", "1e-3",
                          "--train.allow_config_change", "true")
    assert list(losses) == [5]
    record = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert record["changes"] == {"optim.lr": [0.002, 0.001]}
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.001


def test_text_cache_states_do_not_depend_on_the_batch_that_brought_a_caption():
    from pocketdit.text import build_text_conditioner, encode_prompts

    conditioner = build_text_conditioner(["minilm"], max_lengths=[12])
    model = PocketDiT.from_preset("nano", in_channels=3, text_embed_dims=(384,))
    first, second = (FlowMatchingPretrain(model, conditioner, PixelSpace(), text_cache_size=100) for _ in range(2))
    with torch.no_grad():
        a, _ = first._encode_cached(["a red circle", "two blue squares"])
        b, _ = second._encode_cached(["a green triangle", "a red circle"] + [f"{n} circles" for n in range(70)])
        alone, _ = encode_prompts(conditioner, ["a red circle"])
    assert torch.equal(a[0][0], b[0][1])  # same chunk shape, other companions: the same bits
    torch.testing.assert_close(a[0][0], alone[0][0], atol=1e-5, rtol=1e-5)  # another shape: kernel rounding only
    assert len(second._text_cache) == 72
