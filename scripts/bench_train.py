"""One LoRA training step, ours (train.py) against HF transformers LlavaForConditionalGeneration + peft.

Same weights (a random llava-hf checkpoint that both load), same batch (batch x (image + text
tokens), the last --answer-tokens of each row labelled), same recipe (LoRA r=64 alpha=16 dropout
0.05 on q,k,v,o,gate,up,down of the decoder, projector trained, vision frozen, AdamW, grad-norm
clip 1.0), same dtype. Each measurement runs in its own subprocess; peak memory is that process's
VmHWM from /proc/self/status (ru_maxrss would carry the parent's peak across exec). Prints a
markdown table:

    python scripts/bench_train.py                       # tiny and small (~120M) configs, fp32, CPU
    python scripts/bench_train.py --configs small --steps 10 --dtype bfloat16 --compile
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

IMAGE_TOKEN_HF = 250  # llava-hf's image token id (< vocab)
CONFIGS = {
    # name: vision (width, layers, heads, mlp, image, patch), llama (dim, layers, heads, mlp, vocab)
    "tiny": dict(vision=(48, 3, 4, 96, 56, 14), llm=(64, 2, 4, 136, 256)),
    "small": dict(vision=(384, 6, 6, 1536, 224, 14), llm=(768, 8, 12, 2048, 32000)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB (VmRSS now, VmHWM peak of this process)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def write_checkpoint(name: str, out: Path) -> int:
    """A random llava-hf checkpoint of config `name` in out; returns its parameter count."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    (vw, vl, vh, vm, image, patch), (dim, layers, heads, mlp, vocab) = CONFIGS[name]["vision"], CONFIGS[name]["llm"]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, intermediate_size=vm,
                                       image_size=image, patch_size=patch, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=mlp, max_position_embeddings=2048),
        image_token_index=IMAGE_TOKEN_HF, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_batch(name: str, batch: int, text_tokens: int, answer_tokens: int):
    """(ids with one -200 placeholder per row, labels, images): BOS, placeholder, text; the last answer_tokens labelled."""
    (_, _, _, _, image, patch), (*_, vocab) = CONFIGS[name]["vision"], CONFIGS[name]["llm"]
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, min(vocab, IMAGE_TOKEN_HF), (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), -200), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    images = torch.randn(batch, 3, image, image, generator=g)
    return ids, labels, images, (image // patch) ** 2


def run_ours(ckpt: Path, args) -> dict:
    """train.py's model setup and step on one process."""
    import contextlib

    import train
    from geochat import GeoChat

    dtype = getattr(torch, args.dtype)
    model = GeoChat.from_pretrained(ckpt, dtype=dtype).train()
    ns = argparse.Namespace(mode="lora", lora_r=64, lora_alpha=16, lora_dropout=0.05, train_projector=True, config=None,
                            lr=2e-4, weight_decay=0.0)
    train.setup_trainable(model, ns, dtype)
    if args.compile:  # as train.py --compile: each decoder block, names unchanged
        for layer in model.llm.layers:
            layer.compile()
    loss_model = train.CausalLMLoss(model, grad_ckpt=args.grad_ckpt, compute_dtype=dtype)
    trainable = [p for p in loss_model.parameters() if p.requires_grad]
    optimizer = train.adamw(trainable, ns, torch.device("cpu"))
    ids, labels, images, _ = make_batch(args.config, args.batch, args.text_tokens, args.answer_tokens)
    batch = {"input_ids": ids, "labels": labels, "images": images}
    n_target = train.n_labelled(batch)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        loss = train.forward_backward(loss_model, batch, 1.0 / n_target, torch.device("cpu"), autocast) / n_target
        train.optimizer_step(trainable, optimizer)
        return float(loss)

    return time_steps(step, args)


def run_hf(ckpt: Path, args) -> dict:
    """LlavaForConditionalGeneration + peft LoRA doing the same step."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, modules_to_save=["multi_modal_projector"],
                        target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")")
    model = get_peft_model(model, config)
    for p in model.parameters():  # fp32 masters for the trainable params, as ours
        if p.requires_grad:
            p.data = p.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    ids, labels, images, n_patches = make_batch(args.config, args.batch, args.text_tokens, args.answer_tokens)
    rows = [torch.cat([r[:1], torch.full((n_patches,), IMAGE_TOKEN_HF), r[2:]]) for r in ids]
    hf_ids = torch.stack(rows)
    hf_labels = torch.stack([torch.cat([r[:1], torch.full((n_patches,), -100), r[2:]]) for r in labels])
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(input_ids=hf_ids, pixel_values=images.to(dtype), labels=hf_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return time_steps(step, args)


def time_steps(step, args) -> dict:
    """Warm up, then time args.steps steps (median step time); memory from /proc/self/status."""
    rss_before = status_mb("VmRSS")
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # the median: robust to other load on a shared machine
    return {"samples_per_s": args.batch / step_s, "step_s": step_s,
            "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before, "first_loss": first_loss}


def worker(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = (run_ours if args.worker == "ours" else run_hf)(Path(args.ckpt), args)
    print("RESULT " + json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time ours with train.py --compile (torch.compile per block)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    passthrough = ["--batch", args.batch, "--text-tokens", args.text_tokens, "--answer-tokens", args.answer_tokens,
                   "--steps", args.steps, "--warmup", args.warmup, "--dtype", args.dtype, "--threads", args.threads]
    passthrough += ["--grad-ckpt"] if args.grad_ckpt else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            ckpt = Path(tmp) / name
            n_params = write_checkpoint(name, ckpt)
            results = {}
            for impl in ("ours", "hf") + (("ours-compile",) if args.compile else ()):
                cmd = [sys.executable, __file__, "--worker", impl.removesuffix("-compile"), "--config", name, "--ckpt", str(ckpt),
                       *map(str, passthrough), *(["--compile"] if impl.endswith("-compile") else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{impl} {name} failed:\n{proc.stderr[-3000:]}")
                results[impl] = json.loads(line[len("RESULT "):])
            rows.append((name, n_params, results))
    _, _, _, _, image, patch = CONFIGS[rows[0][0]]["vision"]
    print(f"\nLoRA step (r 64, batch {args.batch}, image tokens + {args.text_tokens + 2} text tokens, "
          f"{args.dtype}, {args.threads} threads{', grad ckpt' if args.grad_ckpt else ''}):\n")
    print("| config | params | impl | samples/s | step (s) | peak RSS (MB) | RSS before step (MB) | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n_params, results in rows:
        labels = {"ours": "ours", "hf": "HF + peft", "ours-compile": "ours --compile"}
        for impl, r in results.items():
            print(f"| {name} | {n_params / 1e6:.1f}M | {labels[impl]} | {r['samples_per_s']:.2f} | "
                  f"{r['step_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['first_loss']:.4f} |")
        h = results["hf"]
        for impl in [i for i in results if i != "hf"]:
            o = results[impl]
            print(f"| {name} | | **{labels[impl]} / HF** | **{o['samples_per_s'] / h['samples_per_s']:.2f}x** | | "
                  f"**{o['peak_rss_mb'] / h['peak_rss_mb']:.2f}x** | | |")


if __name__ == "__main__":
    main()
