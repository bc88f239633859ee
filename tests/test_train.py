"""Tests for train.py on a tiny GeoChat: 1 vs 2 processes (FSDP2), resume, Ctrl-C mid-save, overfit, options, bad input.

Kills at every step of a save (fault injection) and a real Ctrl-C are in test_train_checkpoint.py.
"""

import argparse
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lora  # noqa: E402
import train  # noqa: E402
from data import TEMPLATES, InstructDataset, Tokenizer, collate  # noqa: E402
from geochat import IGNORE_INDEX, GeoChat, GeoChatConfig  # noqa: E402
from llama import LlamaConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

torch.set_num_threads(2)

ANSWERS = [
    "There are two planes parked at the airport.", "Yes", "No", "urban", "3",
    "<p>two planes</p> {<8><82><16><90>|<69>}", "{<12><34><56><78>|<45>}",
    "The image shows a large parking lot with 25 cars.", "a tennis court", "dense residential",
]
QUESTIONS = [
    "[grounding] Describe the image in detail.", "Is there a building near the road?",
    "[refer] Give me the location of <p> the small white car </p>", "Is it a rural or an urban area?",
    "How many ships are in the harbor?", "What is in the image?",
]


def tiny_config(vocab_size=512) -> GeoChatConfig:
    vision = ViTConfig(image_size=28, patch_size=14, width=32, n_layers=2, n_heads=2, mlp_dim=64)
    llm = LlamaConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, intermediate_size=128, max_seq_len=512)
    return GeoChatConfig(vision=vision, llm=llm, image_size=28)


def write_dataset(folder: Path, n=24, seed=0, extras=True) -> Path:
    """n image records (PNGs of assorted sizes) plus, with extras, a text-only record and a missing image."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"P{i:04d}.png")
        turns = [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                 {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": QUESTIONS[(i + 1) % len(QUESTIONS)]},
                      {"from": "gpt", "value": ANSWERS[(i + 3) % len(ANSWERS)]}]
        records.append({"id": f"P{i:04d}", "image": f" P{i:04d}.png ", "conversations": turns})
    if extras:
        records[5] = {"id": "text", "conversations": [{"from": "human", "value": "Is it a rural or an urban area?"},
                                                      {"from": "gpt", "value": "urban"}]}
        records[9]["image"] = "missing.png"
    path = folder / "instruct.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory, sp_model_path):
    """A tiny native checkpoint (with tokenizer.model) and a synthetic dataset."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = GeoChat(tiny_config())
    with torch.no_grad():  # non-trivial vision embeddings, so that images matter
        model.vision.pos_embed.normal_(0, 0.5)
        model.vision.class_embed.normal_(0, 0.5)
    model.save_pretrained(root / "ckpt", tokenizer_model=sp_model_path)
    (root / "tiny_config.json").write_text(json.dumps(tiny_config().to_dict()))
    data = write_dataset(root)
    return {"root": root, "ckpt": root / "ckpt", "data": data, "images": data.parent / "images",
            "tokenizer": sp_model_path, "config": root / "tiny_config.json"}


def base_args(s, out, *extra):
    return ["--checkpoint", str(s["ckpt"]), "--data", str(s["data"]), "--image-folder", str(s["images"]),
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--seed", "1", *map(str, extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def run_main(args):
    return train.main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------


def read_optimizer_state(ckpt: Path) -> dict:
    """The optimizer state of a checkpoint's optimizer/ (torch.distributed.checkpoint shards) as one plain dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / train.OPTIMIZER_DIR, ckpt.parent / "optimizer.pt")
    return torch.load(ckpt.parent / "optimizer.pt", weights_only=False)["optimizer"]


# (dtype, loss rtol, grad-norm rtol, weight rtol/atol, share of weights within it, exp_avg rtol/atol): bf16 compute
# rounds differently per micro-batch split (1 process: batches of 2; 2 processes: batches of 1); Adam can blow a
# near-zero gradient's rounding up to ~lr on a rare element, while a wrong step would move nearly all of them.
ONE_VS_TWO = [("float32", 1e-4, 1e-3, (1e-4, 1e-5), 1.0, (1e-3, 1e-7)),
              ("bfloat16", 2e-2, 5e-2, (2e-2, 2e-3), 0.97, (1e-1, 1e-4))]


@pytest.mark.parametrize("dtype, loss_rtol, norm_rtol, weight_tol, weight_share, adam_tol", ONE_VS_TWO,
                         ids=[c[0] for c in ONE_VS_TWO])
def test_one_vs_two_processes(setup_dir, tmp_path, dtype, loss_rtol, norm_rtol, weight_tol, weight_share, adam_tol):
    """Same global batches, same losses and weights on 1 process and on 2 (torchrun, gloo, FSDP2), in fp32 and in
    bf16 (one mixed-precision policy); the optimizer state is saved sharded and reads back the same."""
    common = ["--mode", "lora", "--max-steps", 3, "--global-batch", 8, "--batch-size", 2, "--lr", 1e-2,
              "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--warmup-ratio", 0.3, "--dtype", dtype]
    one = tmp_path / "one"
    run_main(base_args(setup_dir, one, *common))
    two = tmp_path / "two"  # micro-batches of 1: the text-only and the missing-image record each fill one alone
    torchrun(base_args(setup_dir, two, *common, "--batch-size", 1))
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=loss_rtol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=norm_rtol)
        assert (a["tokens"], a["skipped"], a["lr"]) == (b["tokens"], b["skipped"], b["lr"])
    assert m1[-1]["skipped"] >= 1  # the record with a missing image
    w1, w2 = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert w1.keys() == w2.keys() and {t.dtype for t in w2.values()} == {torch.float32}  # fp32 masters
    for k in w1:
        same = torch.isclose(w1[k], w2[k], rtol=weight_tol[0], atol=weight_tol[1])
        assert same.float().mean() >= weight_share, (k, same.float().mean(), (w1[k] - w2[k]).abs().max())
    o1, o2 = read_optimizer_state(one / "ckpt"), read_optimizer_state(two / "ckpt")  # o2: written as 2 shards
    assert len(list((two / "ckpt" / train.OPTIMIZER_DIR).glob("*.distcp"))) == 2  # one file per rank, none gathered
    assert "optimizer" not in torch.load(two / "ckpt" / train.TRAIN_STATE, weights_only=False)
    assert o1["state"].keys() == o2["state"].keys() and len(o1["state"]) == len(w1)
    for k in o1["state"]:
        assert o2["state"][k]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(o1["state"][k]["exp_avg"], o2["state"][k]["exp_avg"], rtol=adam_tol[0], atol=adam_tol[1])


def torchrun(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_full_mode_resume_on_two_ranks(setup_dir, tmp_path, monkeypatch):
    """A 1-process full-mode checkpoint resumes on 2 ranks (FSDP2, grad ckpt) and matches a straight 1-process run."""
    common = ["--mode", "full", "--max-steps", 4, "--global-batch", 4, "--batch-size", 2, "--lr", 2e-3,
              "--save-every", 2]
    straight = tmp_path / "straight"
    run_main(base_args(setup_dir, straight, *common))
    resumed = tmp_path / "resumed"

    def stop_after_step_2(path, state):  # a Ctrl-C during the step-4 save
        if state["step"] == 4:
            raise KeyboardInterrupt
        real_write(path, state)

    real_write = train.write_train_state
    monkeypatch.setattr(train, "write_train_state", stop_after_step_2)
    with pytest.raises(SystemExit) as e:
        run_main(base_args(setup_dir, resumed, *common))
    assert e.value.code == 130
    monkeypatch.undo()
    torchrun(base_args(setup_dir, resumed, *common, "--resume", "--grad-ckpt"))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-4)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    GeoChat.from_pretrained(resumed, dtype=torch.float32)  # the FSDP-gathered save is a loadable checkpoint


def test_resume_after_ctrl_c_mid_save_matches_straight_run(setup_dir, tmp_path, monkeypatch, capsys):
    """4 steps straight == 2 steps, a Ctrl-C in the middle of the step-4 save (exit 130), --resume from step 2, 2 more."""
    common = ["--mode", "lora", "--max-steps", 4, "--global-batch", 4, "--batch-size", 2, "--lr", 5e-3,
              "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0.2, "--save-every", 2, "--weight-decay", 0.1]
    straight = tmp_path / "straight"
    run_main(base_args(setup_dir, straight, *common))

    killed = tmp_path / "killed"
    real_write = train.write_train_state

    def dying_write(path, state):
        if state["step"] == 4:  # the adapter is already in ckpt.tmp/: stop before the state and the swap
            assert (path.parent / "adapter.safetensors").exists()
            raise KeyboardInterrupt
        real_write(path, state)

    monkeypatch.setattr(train, "write_train_state", dying_write)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(base_args(setup_dir, killed, *common))
    monkeypatch.undo()
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"train.py: interrupted; --resume continues from {killed / 'ckpt'}"
    assert (killed / "ckpt.tmp").is_dir()
    state = torch.load(killed / "ckpt" / "train_state.pt", weights_only=False)
    assert state["step"] == 2 and len(metrics(killed)) == 4
    kept = load_file(str(killed / "adapter.safetensors"))  # the top-level export is still step 2's
    for k, v in load_file(str(killed / "ckpt" / "adapter.safetensors")).items():
        torch.testing.assert_close(kept[k], v, rtol=0, atol=0)

    with pytest.raises(SystemExit) as e:  # no silent overwrite of a run
        run_main(base_args(setup_dir, killed, *common))
    assert e.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err
    for changed in (["--lora-r", 8], ["--lora-dropout", 0.1], ["--group-by-length"]):  # a resume keeps the run's
        # geometry, LoRA and data order
        with pytest.raises(SystemExit) as e:
            run_main(base_args(setup_dir, killed, *common, "--resume", *changed))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "settings differ" in err[0], err

    run_main(base_args(setup_dir, killed, *common, "--resume"))
    assert not (killed / "ckpt.tmp").exists()
    assert [m["step"] for m in metrics(killed)] == [1, 2, 3, 4]
    assert losses(killed) == pytest.approx(losses(straight), rel=1e-6)
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    s1 = torch.load(straight / "ckpt" / "train_state.pt", weights_only=False)
    s2 = torch.load(killed / "ckpt" / "train_state.pt", weights_only=False)
    assert (s1["step"], s1["epoch"], s1["step_in_epoch"], s1["lr"]) == (s2["step"], s2["epoch"], s2["step_in_epoch"], s2["lr"])
    o1, o2 = read_optimizer_state(straight / "ckpt"), read_optimizer_state(killed / "ckpt")
    for k, v in o1["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(v[name], o2["state"][k][name], rtol=0, atol=0)


def test_adapter_loads_into_fresh_model_and_changes_outputs(setup_dir, tmp_path):
    """--mode lora trains LoRA only (the projector frozen, as in the reference); the adapter loads and changes the logits."""
    out = tmp_path / "lora"
    run_main(base_args(setup_dir, out, "--mode", "lora", "--max-steps", 2, "--global-batch", 4, "--batch-size", 4,
                       "--lr", 5e-2, "--lora-r", 4, "--lora-alpha", 8))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"], config["extra_modules"]) == (4, 8, [])
    tensors = load_file(str(out / "adapter.safetensors"))
    assert len(tensors) == 2 * 2 * 7 and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    optimizer = read_optimizer_state(out / "ckpt")
    assert len(optimizer["state"]) == len(tensors)  # nothing else was trained
    base = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    tuned = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    wrapped = lora.load_adapter(tuned, out)
    assert len(wrapped) == 2 * 7
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in tensors.items())
    ids = torch.tensor([[1, -200, 40, 41, 42, 43]])
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(base(ids, images), tuned.eval()(ids, images), atol=1e-4)


def test_train_projector_option(setup_dir, tmp_path, capsys):
    """--train-projector trains the projector too and saves it in the adapter; it goes with --mode lora only."""
    out = tmp_path / "lora_projector"
    args = base_args(setup_dir, out, "--mode", "lora", "--train-projector", "--max-steps", 2, "--global-batch", 4,
                     "--batch-size", 4, "--lr", 5e-2, "--lora-r", 4, "--lora-alpha", 8)
    run_main(args)
    assert json.loads((out / "adapter_config.json").read_text())["extra_modules"] == ["projector"]
    tensors = load_file(str(out / "adapter.safetensors"))
    base = load_file(str(setup_dir["ckpt"] / "model.safetensors"))
    assert not torch.equal(tensors["projector.fc1.weight"], base["projector.fc1.weight"])
    model = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    lora.load_adapter(model, out)
    torch.testing.assert_close(model.projector.fc1.weight, tensors["projector.fc1.weight"], rtol=0, atol=0)
    with pytest.raises(SystemExit) as e:
        run_main([a if a != "lora" else "full" for a in map(str, args)])
    assert e.value.code == 2 and "--train-projector goes with --mode lora" in capsys.readouterr().err


def test_loss_falls_full_mode_and_checkpoint_loads(setup_dir, tmp_path):
    """Full fine-tuning overfits a tiny set; the output directory loads with GeoChat.from_pretrained."""
    folder = tmp_path / "small"
    data = write_dataset(folder, n=4, seed=3, extras=False)
    out = tmp_path / "full"
    args = ["--checkpoint", str(setup_dir["ckpt"]), "--data", str(data), "--image-folder", str(folder / "images"),
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--mode", "full", "--max-steps", 30,
            "--global-batch", 4, "--batch-size", 2, "--lr", 3e-3, "--warmup-ratio", 0.1]
    result = run_main(args)
    curve = losses(out)
    assert len(curve) == 30 and result["step"] == 30
    assert curve[-1] < 0.3 * curve[0], curve
    model = GeoChat.from_pretrained(out, dtype=torch.float32)
    saved = load_file(str(out / "model.safetensors"))
    assert not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in saved)
    base = load_file(str(setup_dir["ckpt"] / "model.safetensors"))
    torch.testing.assert_close(saved["vision.pos_embed"], base["vision.pos_embed"])  # the vision tower stayed frozen
    assert not torch.equal(saved["llm.layers.0.attn.q_proj.weight"], base["llm.layers.0.attn.q_proj.weight"])
    torch.testing.assert_close(model.llm.lm_head.weight, saved["llm.lm_head.weight"])


def test_projector_mode_and_scratch_config(setup_dir, tmp_path):
    """--mode projector trains and saves only the projector; --config trains from scratch (vision too in full mode)."""
    out = tmp_path / "proj"
    run_main(base_args(setup_dir, out, "--mode", "projector", "--max-steps", 2, "--global-batch", 4, "--batch-size", 4))
    tensors = load_file(str(out / "adapter.safetensors"))
    assert sorted(tensors) == ["projector.fc1.bias", "projector.fc1.weight", "projector.fc2.bias", "projector.fc2.weight"]
    model = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    assert lora.load_adapter(model, out) == []
    torch.testing.assert_close(model.projector.fc2.weight, tensors["projector.fc2.weight"])

    scratch = tmp_path / "scratch"
    run_main(["--config", str(setup_dir["config"]), "--tokenizer", str(setup_dir["tokenizer"]), "--data", str(setup_dir["data"]),
              "--image-folder", str(setup_dir["images"]), "--out", str(scratch), "--device", "cpu", "--mode", "full",
              "--max-steps", 2, "--global-batch", 4, "--batch-size", 2, "--lr", 1e-2, "--dtype", "bfloat16"])
    trained = GeoChat.from_pretrained(scratch, dtype=torch.float32)
    cfg = tiny_config()
    with torch.device("meta"):
        fresh = GeoChat(cfg)
    fresh.to_empty(device="cpu")
    train.init_weights(fresh, 0)
    assert not torch.equal(trained.vision.blocks[0].attn.q_proj.weight, fresh.vision.blocks[0].attn.q_proj.weight)
    saved = load_file(str(scratch / "model.safetensors"))  # trained under bf16 autocast: the fp32 masters are saved
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_train_vision_trains_a_pretrained_tower_in_full_mode(setup_dir, tmp_path):
    """--train-vision: --mode full from a checkpoint also trains the vision tower (which stays frozen without it)."""
    out = tmp_path / "vision"
    run_main(base_args(setup_dir, out, "--mode", "full", "--train-vision", "--max-steps", 2, "--global-batch", 4,
                       "--batch-size", 4, "--lr", 1e-2, "--dtype", "float32"))
    saved = load_file(str(out / "model.safetensors"))
    base = load_file(str(setup_dir["ckpt"] / "model.safetensors"))
    assert not torch.equal(saved["vision.blocks.0.attn.q_proj.weight"], base["vision.blocks.0.attn.q_proj.weight"])
    with pytest.raises(SystemExit) as e:
        run_main(base_args(setup_dir, tmp_path / "lora", "--mode", "lora", "--train-vision", "--max-steps", 1))
    assert e.value.code == 2


def test_scratch_vision_position_rows_start_as_sine_cosine():
    cfg = tiny_config()
    model = GeoChat(cfg)
    train.init_weights(model, 0)
    rows = model.vision.pos_embed.detach()
    assert torch.equal(rows[0], torch.zeros_like(rows[0]))  # the class row
    torch.testing.assert_close(rows[1:], train.sincos_position_rows(model.vision.grid, rows.shape[1]))
    table = train.sincos_position_rows(4, 8)  # row i, column j: sin/cos of i in the first half, of j in the second
    torch.testing.assert_close(table[1 * 4 + 2, :2], torch.tensor([math.sin(1.0), math.sin(1.0 / 100)]))
    torch.testing.assert_close(table[1 * 4 + 2, 4:6], torch.tensor([math.sin(2.0), math.sin(2.0 / 100)]))
    assert len({tuple(r.tolist()) for r in table}) == 16  # every position distinct


def tiny_batch(setup_dir):
    tok = Tokenizer(setup_dir["tokenizer"])
    ds = InstructDataset(setup_dir["data"], setup_dir["images"], tok, image_size=28, n_image_tokens=4)
    return collate([ds[i] for i in (0, 1, 2, 3)], tok.pad_id)


def test_loss_matches_full_logits_and_grad_ckpt_is_exact(setup_dir):
    """CausalLMLoss == CE over model.llm's full logits (guards its decoder loop); grad ckpt changes nothing."""
    batch = tiny_batch(setup_dir)
    model = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    lora.mark_trainable(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.1)
    embeds, _, labels = model.embed_inputs(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
    logits = model.llm(embeds)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        loss = train.CausalLMLoss(model, grad_ckpt=ckpt)(batch["input_ids"], batch["labels"], batch["images"])
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
    assert train.n_labelled(batch) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_box_value_sigma_is_kl_to_a_gaussian_over_the_values_and_plain_ce_as_sigma_goes_to_zero(setup_dir):
    """--box-value-sigma: a box value's target is a Gaussian over the values (KL), every other token plain CE;
    a tiny sigma gives the plain cross entropy, and a near value costs less than a far one."""
    batch = tiny_batch(setup_dir)
    model = GeoChat.from_pretrained(setup_dir["ckpt"], dtype=torch.float32)
    value_ids = list(range(300, 401))  # stand-ins for the pieces "<0>" ... "<100>"
    labels = batch["labels"].clone()
    labelled = (labels != IGNORE_INDEX).nonzero()
    for k, (b, t) in enumerate(labelled[::2].tolist()):  # every other labelled token becomes a box value
        labels[b, t] = value_ids[(7 * k) % 101]
    embeds, _, flat_labels = model.embed_inputs(batch["input_ids"], batch["images"], batch["attention_mask"], labels)
    log_probs = model.llm(embeds)[:, :-1].log_softmax(-1)  # (B, L-1, vocab)
    values = torch.arange(101.0)
    expected = 0.0
    targets = flat_labels[:, 1:]
    for (b, t), target in zip((targets != IGNORE_INDEX).nonzero().tolist(), targets[targets != IGNORE_INDEX].tolist()):
        if target in value_ids:
            q = torch.exp(-0.5 * (values - value_ids.index(target)) ** 2 / 1.5 ** 2)
            q = q / q.sum()
            expected = expected + (torch.special.xlogy(q, q) - q * log_probs[b, t, value_ids]).sum()
        else:
            expected = expected - log_probs[b, t, target]

    def loss_with(sigma):
        with torch.no_grad():
            return train.CausalLMLoss(model, box_value_ids=value_ids, box_value_sigma=sigma)(
                batch["input_ids"], labels, batch["images"])

    soft, sharp, plain = loss_with(1.5), loss_with(0.01), loss_with(0.0)
    torch.testing.assert_close(soft, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sharp, plain, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(soft, plain)
    state = train.CausalLMLoss(model, box_value_ids=value_ids, box_value_sigma=1.0).state_dict()
    assert not any(k.startswith(("box_value", "value_of", "soft")) for k in state)  # nothing enters a checkpoint
    # one logit vector that puts all its mass on value 50: a target of 51 costs less than 60
    loss = train.CausalLMLoss(model, box_value_ids=value_ids, box_value_sigma=1.5)
    log_p = torch.full((1, 512), -30.0)
    log_p[0, value_ids[50]] = 0.0
    log_p = log_p.log_softmax(-1)
    kl = [float(loss.soft_neg_entropy[v] - (loss.soft_targets[v] * log_p[0, value_ids]).sum()) for v in (50, 51, 60)]
    assert kl[0] < kl[1] < kl[2]


def test_mfu_flops_count_no_weight_gradients_for_frozen_weights():
    """7B shape: full training is 6 FLOPs per decoder weight per token; LoRA ~4 (frozen weights get no weight grads)."""
    with torch.device("meta"):
        model = GeoChat(GeoChatConfig.from_name("geochat-7b"))
    n = sum(p.numel() for name, p in model.llm.named_parameters() if p.ndim == 2 and "embed_tokens" not in name)
    assert 6.5e9 < n < 6.7e9
    assert train.train_flops_per_token(model) == 6 * n  # every parameter trains
    lora.apply_lora(model, r=64, alpha=16)
    lora.mark_trainable(model, [])
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert train.train_flops_per_token(model) == 4 * (n + n_lora) + 2 * n_lora


def test_dummy_rows():
    """Micro-batches without images get an unlabelled dummy row with an image (every FSDP unit runs on every rank)."""
    dummy = train.with_image(None, 1, 0, 28)
    assert dummy["images"].shape == (1, 3, 28, 28) and (dummy["labels"] == IGNORE_INDEX).all()
    text = {"input_ids": torch.tensor([[1, 5, 6]]), "labels": torch.tensor([[-100, 5, 6]]), "images": None}
    padded = train.with_image(text, 1, 0, 28)
    assert padded["input_ids"].tolist() == [[1, 5, 6], [1, -200, 0]]
    assert padded["labels"].tolist() == [[-100, 5, 6], [-100] * 3] and train.n_labelled(padded) == 2


@pytest.mark.parametrize("total, warmup", [(100, 3), (10, 0), (7, 7), (1, 1), (5000, 150), (9, 4)])
def test_lr_schedule_equals_transformers(total, warmup):
    """lr_at(step) is the lr transformers' get_cosine_schedule_with_warmup gives optimizer step `step`, exactly."""
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        assert train.lr_at(step, total, warmup, 2e-4) == optimizer.param_groups[0]["lr"], step
        optimizer.step()
        schedule.step()


def test_max_length_counts_text_ids_with_the_placeholder_once(setup_dir, tmp_path):
    """--max-length truncates the text ids (the <image> placeholder one id), as the reference's model_max_length."""
    tokenizer = Tokenizer(setup_dir["tokenizer"])
    whole = InstructDataset(setup_dir["data"], setup_dir["images"], tokenizer, image_size=28, max_length=10**6)[0]
    n_text = len(whole["input_ids"])
    for max_length in (n_text, n_text - 1):
        args = train.parse_args(base_args(setup_dir, tmp_path / "out", "--max-length", max_length, "--global-batch", 4))
        dataset = train.setup(args, 0, 1, torch.device("cpu"))[-1]
        item = dataset[0]  # the tiny model splices 4 image features on top
        assert item["image"] is not None
        assert item["input_ids"].tolist() == whole["input_ids"][:max_length].tolist()


def test_template_picks_the_training_prompts_system_line(setup_dir, tmp_path):
    """--template: vicuna_v1 ("curious user", the reference's training template) by default; llava_v1 ("curious human",
    what sample.py and eval.py ask with) on request, so a model trained from scratch sees the words it is asked with."""
    tokenizer = Tokenizer(setup_dir["tokenizer"])
    seen = {}
    for extra in ((), ("--template", "llava_v1")):
        args = train.parse_args(base_args(setup_dir, tmp_path / f"out{len(extra)}", "--global-batch", 4, *extra))
        item = train.setup(args, 0, 1, torch.device("cpu"))[-1][0]
        text = tokenizer.decode([i for i in item["input_ids"].tolist() if i >= 0])
        seen[args.template] = text
        assert text.startswith(TEMPLATES[args.template].split(".")[0]), text[:80]
    assert set(seen) == {"vicuna_v1", "llava_v1"} and "human" in seen["llava_v1"] and "human" not in seen["vicuna_v1"]


def test_options_have_help_and_defaults_shown():
    """Every option has a help text; --help shows the defaults."""
    parser = train.build_parser()
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    assert all(action.help for action in parser._actions), [a.option_strings for a in parser._actions if not a.help]
    text = " ".join(parser.format_help().split())
    for shown in ("(default: 2048)", "(default: auto)", "(default: lora)", "(default: 0.0002)", "(default: 500)"):
        assert shown in text


@pytest.mark.parametrize("device, avx512_bf16, amx, expected", [
    ("cpu", False, False, "float32"), ("cpu", True, False, "bfloat16"), ("cpu", False, True, "bfloat16"),
    ("cuda", False, False, "bfloat16"),
])
def test_default_dtype_follows_the_device(monkeypatch, capsys, device, avx512_bf16, amx, expected):
    """--dtype auto: bfloat16 on cuda and on CPUs with native bf16, else float32; no warning."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train.resolve_dtype("auto", device) == expected
    assert capsys.readouterr().err == ""


def test_explicit_bfloat16_on_a_cpu_without_native_bf16_warns(monkeypatch, capsys):
    """--dtype bfloat16 is kept on any CPU, with a one-line warning where it runs emulated."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: warning: "), err
    assert train.resolve_dtype("float32", "cpu") == "float32" and capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.resolve_dtype("bfloat16", "cpu") == "bfloat16" and capsys.readouterr().err == ""


def test_compile_and_grad_ckpt_step(setup_dir, tmp_path):
    """--compile --grad-ckpt runs a step and gives the eager loss; state-dict names stay clean."""
    common = ["--mode", "lora", "--max-steps", 1, "--global-batch", 2, "--batch-size", 2, "--lora-r", 4, "--lora-dropout", 0]
    run_main(base_args(setup_dir, tmp_path / "eager", *common))
    run_main(base_args(setup_dir, tmp_path / "compiled", *common, "--compile", "--grad-ckpt"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    names = load_file(str(tmp_path / "compiled" / "adapter.safetensors")).keys()
    assert names == load_file(str(tmp_path / "eager" / "adapter.safetensors")).keys()


@pytest.mark.filterwarnings("error:skipping record:UserWarning")
def test_skips_are_counted_per_reason(tmp_path, setup_dir, capsys):
    """Skipped samples: no warning per record; a warning line after a first step with >10% skipped, counts at the end."""
    data = write_dataset(tmp_path, n=8, extras=False)
    records = json.loads(data.read_text())
    for record in records[:3]:
        record["image"] = "missing.png"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    run_main(["--checkpoint", str(setup_dir["ckpt"]), "--data", str(data), "--image-folder", str(tmp_path / "images"),
              "--out", str(out), "--device", "cpu", "--dtype", "float32", "--max-steps", 1, "--global-batch", 8,
              "--batch-size", 4, "--lora-r", 4])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "train.py: warning: 3 of the 8 samples of step 1 skipped: missing_image 3"
    assert "skipped samples 3 (missing_image 3)" in captured.out.splitlines()[-1]
    assert metrics(out)[-1]["skipped"] == 3
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)
    assert state["skipped_by_reason"] == {"missing_image": 3}


BAD_FLAGS = {"nan lr": ["--lr", "nan"], "inf lr": ["--lr", "inf"], "nan warmup": ["--warmup-ratio", "nan"],
             "nan weight decay": ["--weight-decay", "nan"], "inf lora alpha": ["--lora-alpha", "inf"],
             "nan lora dropout": ["--lora-dropout", "nan"], "lora dropout 1": ["--lora-dropout", 1],
             "negative box value sigma": ["--box-value-sigma", -1], "no box pieces": ["--box-value-sigma", 1]}


@pytest.mark.filterwarnings("error:skipping record:UserWarning")
@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "checkpoint directory .*nowhere not found"),
    ("missing data", "data file .*nope.json not found"),
    ("missing image folder", "image folder .*noimages not found"),
    ("empty dataset", "the dataset is empty"),
    ("not divisible", "--global-batch 6 is not divisible by --batch-size 4 x world size 1"),
    ("config without tokenizer", "--config .* needs --tokenizer"),
    ("unknown config", "--config 'nonsense' is neither a known config"),
    ("no conversations", "record 0 .*no 'conversations'"),
    ("not alternating", "turn 1 is from 'human', expected 'gpt'"),
    ("image outside folder", "points outside the image folder"),
    ("too few samples", "has 24 samples, fewer than one global batch \\(48\\)"),
    ("bad number", "--batch-size must be >= 1"),
    ("resume without checkpoint", "--resume: .*out holds no checkpoint"),
    ("metrics without checkpoint", "metrics.jsonl is from a run that saved no checkpoint"),
    ("nan lr", "--lr must be a finite number, got nan"),
    ("inf lr", "--lr must be a finite number, got inf"),
    ("nan warmup", "--warmup-ratio must be a finite number"),
    ("nan weight decay", "--weight-decay must be a finite number"),
    ("inf lora alpha", "--lora-alpha must be a finite number"),
    ("nan lora dropout", "--lora-dropout must be a finite number"),
    ("lora dropout 1", "--lora-dropout must be in \\[0, 1\\), got 1.0"),
    ("negative box value sigma", "--box-value-sigma must be >= 0, got -1.0"),
    ("no box pieces", "--box-value-sigma: tokenizer .*tokenizer.model has no single piece for the box value <0>"),
    ("out under a file", "--out .*file/out is not a writable directory"),
    ("read-only out", "--out .*readonly/out is not a writable directory"),
    ("all images missing", "bad.json: no trainable sample in the 4 samples of step 1: skipped missing_image 4 "),
    ("all cut by max length", "instruct.json: no trainable sample in the 4 samples of step 1: skipped "
                              "image_cut_by_max_length \\d"),
])
def test_bad_input(setup_dir, tmp_path, capsys, case, message):
    s = dict(setup_dir)
    out = tmp_path / "out"
    extra = ["--global-batch", 4, "--batch-size", 4]
    bad = tmp_path / "bad.json"
    convo = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "urban"}]
    if case == "missing checkpoint":
        s["ckpt"] = tmp_path / "nowhere"
    elif case == "missing data":
        s["data"] = tmp_path / "nope.json"
    elif case == "missing image folder":
        s["images"] = tmp_path / "noimages"
    elif case == "empty dataset":
        bad.write_text("[]")
        s["data"] = bad
    elif case == "not divisible":
        extra = ["--global-batch", 6, "--batch-size", 4]
    elif case == "no conversations":
        bad.write_text(json.dumps([{"id": 1, "image": "P0000.png"}]))
        s["data"] = bad
    elif case == "not alternating":
        bad.write_text(json.dumps([{"id": 1, "image": "P0000.png", "conversations": [convo[0], convo[0]]}]))
        s["data"] = bad
    elif case == "image outside folder":
        bad.write_text(json.dumps([{"id": 1, "image": "../../etc/passwd", "conversations": convo}]))
        s["data"] = bad
    elif case == "too few samples":
        extra = ["--global-batch", 48, "--batch-size", 4]
    elif case == "bad number":
        extra = ["--batch-size", 0]
    elif case == "resume without checkpoint":
        extra += ["--resume"]
    elif case == "metrics without checkpoint":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    elif case in BAD_FLAGS:
        extra += BAD_FLAGS[case]
    elif case == "out under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "read-only out":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "readonly").mkdir(mode=0o555)
        out = tmp_path / "readonly" / "out"
    elif case == "all images missing":
        bad.write_text(json.dumps([{"id": i, "image": "missing.png", "conversations": convo} for i in range(4)]))
        s["data"] = bad
    elif case == "all cut by max length":
        extra += ["--max-length", 3]
    args = base_args(s, out, *extra)
    if case in ("config without tokenizer", "unknown config"):
        i = args.index("--checkpoint")
        args[i:i + 2] = ["--config", str(s["config"]) if case == "config without tokenizer" else "nonsense"]
        if case == "unknown config":
            args += ["--tokenizer", str(s["tokenizer"])]
    with pytest.raises(SystemExit) as e:
        run_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert __import__("re").search(message, err[0]), err[0]
    assert not (out / "ckpt").exists() and not (out / "adapter.safetensors").exists()
    if case != "metrics without checkpoint":
        assert not (out / "metrics.jsonl").exists()
    if case == "metrics without checkpoint":
        assert (tmp_path / "out" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # kept
