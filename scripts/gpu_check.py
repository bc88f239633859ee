"""Everything that needs a GPU, run once: one table of pass / fail rows, each with its figure.

    python scripts/gpu_check.py                # one CUDA GPU, a few minutes (goal: under 8 on an H100 or A100)
    python scripts/gpu_check.py --json         # the rows as JSON
    python scripts/gpu_check.py --dry-run      # CPU, tiny shapes, the same code (tests/test_gpu_check.py runs it)
    python scripts/gpu_check.py --sections 2,3 # only these sections' rows (a rerun after a fix)

Rows (status pass / fail; info: a measurement without a goal; skip-cpu: a GPU-only row whose code ran on
CPU with the math / CPU kernels, so nothing GPU-specific was proven; skip: not run):
1. the flash kernel, forced with sdpa_kernel(FLASH_ATTENTION), runs an unpadded prefill, the vision tower
   and a training step; the memory-efficient kernel a left-padded prefill plus decode;
2. bf16 against HF LlavaForConditionalGeneration (attn_implementation="sdpa") on the same weights: max
   logit difference over the logits' std; greedy tokens of 3 left-padded prompts equal to each run alone;
   the compiled engine equal to eager over calls of batch 3, 1 and 4 with one graph per batch bucket and
   the KV cache allocated once (TORCH_LOGS=recompiles,cudagraphs is switched on for that row);
3. decode speed of a random GeoChat-7B-shaped model in bf16, built on the GPU: tokens/s, GB/s of decoder
   weights read (the KV cache not counted, as gpt-fast) and percent of the card's peak bandwidth, eager
   and compiled (goal: 70%), and HF generate on the same shapes; the same model quantised to int8
   (quant.py, gpt-fast's form fused by torch.compile) against compiled bf16 (gpt-fast: 157 against 105
   tok/s on an A100);
4. one LoRA step of the 7B shape with activation checkpointing and per-block compile: samples/s, MFU
   (train.train_flops_per_token: frozen weights get no weight-gradient matmuls), peak memory; the same
   step with HF + peft; the mixed-precision policy inside forward (q, k, v of every SDPA call in bf16,
   fp32 gradients) on one process and under FSDP2 on a process group of one (NCCL), with a round trip
   of the sharded optimizer checkpoint;
5. loading to CUDA: GPU memory close to the weights, host memory back near its baseline.

transformers and peft are imported only inside the rows that compare against them.
"""

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

import lora  # noqa: E402
import quant  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from geochat import IMAGE_TOKEN_ID, GeoChat, GeoChatConfig  # noqa: E402
from llama import LlamaConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

DECODE_BANDWIDTH_GOAL = 0.70  # share of the card's peak memory bandwidth a compiled decode step should reach
ACCURACY_MARGIN = 1.25  # in bf16, ours may be this much further than HF from the fp32 logits (max |diff| / std)
# Peak memory bandwidth in bytes/s, matched by substring of torch.cuda.get_device_name() (first match wins).
PEAK_BANDWIDTH = [
    ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("GH200", 4.0e12), ("H200", 4.8e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("A800", 2.039e12),
    ("L40S", 0.864e12), ("L40", 0.864e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("L4", 0.3e12),
]
NO_STOP = SimpleNamespace(eos_id=-1, pad_id=0, decode=lambda ids: "")  # a tokenizer that never stops: full budgets


@dataclass
class Shapes:
    """The sizes of one run: real ones on a GPU, tiny ones for --dry-run."""
    name: str  # of the big model's shape
    big: GeoChatConfig  # the GeoChat-7B-shaped model (decode speed, training step, flash rows)
    ref: dict  # hf_ref.tiny_llava arguments of the HF comparison model
    policy: GeoChatConfig  # the small model of the mixed-precision rows
    new_tokens: int
    text_tokens: int  # per training sample, after the image
    train_batch: int
    load_gigabytes: float
    warmup: int  # untimed training steps (they compile)
    steps: int  # timed training steps (median)


def shapes_for(dry_run: bool) -> Shapes:
    """GeoChat-7B shapes on a GPU; a few-layer model of the same structure for the dry run."""
    if not dry_run:
        small = GeoChatConfig(vision=ViTConfig(width=256, n_layers=3, n_heads=4, mlp_dim=512), image_size=336,
                              llm=LlamaConfig(vocab_size=32000, dim=512, n_layers=4, n_heads=8, intermediate_size=1376))
        return Shapes(name="7B shape", big=GeoChatConfig.from_name("geochat-7b"), policy=small,
                      ref=dict(vocab_size=32000, dim=512, n_layers=4), new_tokens=128, text_tokens=256, train_batch=2,
                      load_gigabytes=2.0, warmup=2, steps=3)
    tiny = GeoChatConfig(vision=ViTConfig(image_size=56, width=64, n_layers=3, n_heads=4, mlp_dim=128), image_size=56,
                         llm=LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128,
                                         max_seq_len=1024))
    return Shapes(name="tiny shape", big=tiny, ref=dict(vocab_size=512), policy=tiny, new_tokens=16, text_tokens=24,
                  train_batch=2, load_gigabytes=0.01, warmup=1, steps=1)


@dataclass
class Row:
    section: str
    check: str
    status: str  # pass, fail, info, skip-cpu, skip
    figure: str
    seconds: float


class Report:
    """Runs each check, catching its failure, and collects the rows."""

    def __init__(self, device: torch.device, compile_rows: bool, sections: set | None = None):
        self.device, self.compile_rows, self.rows = device, compile_rows, []
        self.on_gpu = device.type == "cuda"
        self.sections = sections  # section numbers ("1".."5") to run; None: all

    def wants(self, *sections: str) -> bool:
        """Whether any of these sections (their names, e.g. "3 decode") is selected."""
        return self.sections is None or any(name.split()[0] in self.sections for name in sections)

    def run(self, section: str, check: str, fn, gpu_only: bool = False, compiles: bool = False):
        """Run fn() -> (ok: True / False / None for info, figure) into a row; an exception is a failed row."""
        if not self.wants(section):
            return
        t0 = time.perf_counter()
        if compiles and not self.compile_rows:
            status, figure = "skip", "compiled rows are left out of a dry run without --compile"
        else:
            try:
                ok, figure = fn()
                status = "info" if ok is None else "fail" if not ok else "skip-cpu" if gpu_only and not self.on_gpu else "pass"
            except Exception as e:  # noqa: BLE001 (a failed check is a row, the next one still runs)
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                status, figure = "fail", f"{type(e).__name__}: {first_line}"
        self.rows.append(Row(section, check, status, figure, round(time.perf_counter() - t0, 1)))
        print(f"[{status}] {section}: {check}: {self.rows[-1].figure}", file=sys.stderr, flush=True)
        free_memory()

    def table(self) -> str:
        """The rows as a markdown table."""
        lines = ["| section | check | status | figure | s |", "|---|---|---|---|---|"]
        rows = sorted(self.rows, key=lambda r: r.section)  # run in the order that holds one big model at a time
        lines += [f"| {r.section} | {r.check} | {r.status} | {r.figure} | {r.seconds} |" for r in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers


def free_memory():
    """Drop compiled graphs (and their CUDA-graph pools), collect garbage, return cached GPU blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rss_mb() -> float:
    """Resident memory of this process now (VmRSS), MB."""
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flash_or_math(device) -> SDPBackend:
    """The flash kernel on CUDA; on CPU the math kernel (the same code path, nothing GPU-specific proven)."""
    return SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH


def efficient_or_math(device) -> SDPBackend:
    return SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH


@torch.no_grad()
def random_model(cfg: GeoChatConfig, device, dtype, seed: int = 0) -> GeoChat:
    """A GeoChat with random weights built directly on `device` in `dtype` (no fp32 copy, no download)."""
    with torch.device("meta"):
        model = GeoChat(cfg)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 or name.endswith("class_embed"):
            p.normal_(0.0, 0.02)
        elif name.endswith(".bias"):
            p.zero_()
        else:  # LayerNorm / RMSNorm weights
            p.fill_(1.0)
    return model.eval()


def prompt(n_text: int, vocab: int, seed: int) -> list:
    """Token ids: BOS, the image placeholder, n_text random ids."""
    g = torch.Generator().manual_seed(seed)
    return [1, IMAGE_TOKEN_ID] + torch.randint(3, vocab - 2, (n_text,), generator=g).tolist()


def images(cfg: GeoChatConfig, n: int, device, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)


def train_batch(cfg: GeoChatConfig, batch: int, n_text: int, device, dtype) -> dict:
    """A right-padded-free training batch: BOS, image, text; the last half of the text labelled."""
    ids = torch.tensor([prompt(n_text, cfg.llm.vocab_size, seed=b) for b in range(batch)])
    labels = torch.full_like(ids, train.IGNORE_INDEX)
    labels[:, -n_text // 2:] = ids[:, -n_text // 2:]
    return {"input_ids": ids, "labels": labels, "images": images(cfg, batch, device, dtype).float()}


class SDPADtypes(TorchFunctionMode):
    """Records the dtypes of (q, k, v) of every F.scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen.add(tuple(str(t.dtype).removeprefix("torch.") for t in args[:3]))
        return func(*args, **(kwargs or {}))


def lora_training_setup(model: GeoChat, dtype, grad_ckpt: bool, compile_blocks: bool):
    """train.py's LoRA setup (fp32 masters, frozen weights in dtype) -> (loss model, trainable params, AdamW)."""
    args = SimpleNamespace(mode="lora", lora_r=64, lora_alpha=16, lora_dropout=0.05, train_projector=False,
                           config=None, lr=2e-4, weight_decay=0.0)
    train.setup_trainable(model.train(), args, dtype)
    if compile_blocks:
        for layer in model.llm.layers:
            layer.compile()
    loss_model = train.CausalLMLoss(model, grad_ckpt=grad_ckpt, compute_dtype=dtype)
    trainable = [p for p in loss_model.parameters() if p.requires_grad]
    return loss_model, trainable, args


def autocast_for(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# 1. kernels


def check_flash_prefill(model, device):
    """Forced flash over an unpadded first prefill into the KV cache (mask-free path)."""
    engine = sample.Engine(model, NO_STOP)
    ids = prompt(16, model.cfg.llm.vocab_size, seed=0)
    embeds, mask = engine.embed_prompts([ids], images(model.cfg, 1, device, model.llm.embed_tokens.weight.dtype))
    session = engine.new_session(1, embeds.shape[1], 4)
    with torch.inference_mode(), sdpa_kernel(flash_or_math(device)):
        logits = session.prefill(embeds, mask)
    return bool(torch.isfinite(logits).all()), f"{embeds.shape[1]} positions, {flash_or_math(device).name}"


def check_flash_vision(model, device):
    with torch.inference_mode(), sdpa_kernel(flash_or_math(device)):
        feats = model.encode_images(images(model.cfg, 2, device, model.llm.embed_tokens.weight.dtype))
    return bool(torch.isfinite(feats).all()), f"2 images -> {tuple(feats.shape)}, {flash_or_math(device).name}"


def check_flash_training(model, device, dtype, shapes: Shapes):
    """Forward + backward of the training loss with only the flash kernel allowed."""
    loss_model, trainable, _ = lora_training_setup(model, dtype, grad_ckpt=True, compile_blocks=False)
    batch = train_batch(model.cfg, 1, shapes.text_tokens, device, dtype)
    with sdpa_kernel(flash_or_math(device)):
        loss = train.forward_backward(loss_model, batch, 1.0, device, autocast_for(device, dtype))
    grads = [p.grad for p in trainable if p.grad is not None]
    ok = math.isfinite(float(loss)) and len(grads) == len(trainable) and all(torch.isfinite(g).all() for g in grads)
    for p in trainable:
        p.grad = None
    lora.merge_lora(model)  # back to plain linears for the next rows (B = 0: nothing changes)
    model.eval().requires_grad_(False)
    return ok, f"loss {float(loss):.3f}, {len(grads)} LoRA grads, {flash_or_math(device).name}"


def check_efficient_padded(model, device):
    """Forced memory-efficient kernel over a left-padded prefill and the decode steps (both take a mask)."""
    engine = sample.Engine(model, NO_STOP)
    vocab = model.cfg.llm.vocab_size
    with sdpa_kernel(efficient_or_math(device)):
        out = engine.generate([prompt(8, vocab, 1), prompt(20, vocab, 2)], images(model.cfg, 2, device,
                              model.llm.embed_tokens.weight.dtype), max_new_tokens=4)
    return all(len(g.token_ids) == 4 for g in out), f"batch 2 left-padded, 4 tokens each, {efficient_or_math(device).name}"


# ---------------------------------------------------------------------------------------------
# 2. against HF, bf16


def hf_pair(shapes: Shapes, device, dtype, workdir: Path):
    """A random HF LlavaForConditionalGeneration (sdpa) and our GeoChat loaded from its saved weights, both in dtype."""
    import hf_ref

    ref = hf_ref.tiny_llava(seed=3, **shapes.ref)
    ref.save_pretrained(workdir / "hf")
    ours = GeoChat.from_pretrained(workdir / "hf", dtype=dtype, device=device)
    ref = ref.to(device, dtype)
    ref.set_attn_implementation("sdpa")
    return ref.eval(), ours.eval()


def check_hf_logits(ref, ours, device, dtype, shapes: Shapes, workdir: Path):
    """Max abs(ours - HF) over std(HF) in dtype; passes when ours is as close to the fp32 logits as HF is (bf16
    rounding alone moves a random model's logits by a model-dependent amount, so no fixed limit)."""
    import hf_ref

    ids = torch.tensor([prompt(12, ours.cfg.llm.vocab_size, seed=4)]).to(device)
    image = images(ours.cfg, 1, device, torch.float32, seed=4)
    exact = hf_ref.hf_logits(hf_ref.tiny_llava(seed=3, **shapes.ref).to(device), ids, image).float()  # fp32 reference
    theirs = hf_ref.hf_logits(ref, ids, image.to(dtype)).float()
    with torch.inference_mode():
        mine = ours(ids, image.to(dtype)).float()
    std = theirs.std()
    between, our_error, their_error = (float((a - b).abs().max() / std) for a, b in
                                       ((mine, theirs), (mine, exact), (theirs, exact)))
    ok = our_error <= ACCURACY_MARGIN * their_error + 1e-3
    return ok, (f"max abs(ours - HF) / std = {between:.4f}; off fp32: ours {our_error:.4f}, HF {their_error:.4f} "
                f"(pass: ours <= {ACCURACY_MARGIN} x HF), {str(dtype)[6:]}")


def check_batch_equals_alone(workdir: Path, device):
    """Greedy tokens of 3 left-padded rows equal each row run alone, in fp32 (TF32 off, torch's default): in bf16 the
    GEMMs of batch 3 and batch 1 round differently (cuBLAS picks kernels by shape, HF's too), which flips near-tied
    greedy tokens of a random model; the masking and positions under test are the same in any dtype."""
    dtype = torch.float32
    ours = GeoChat.from_pretrained(workdir / "hf", dtype=dtype, device=device).eval()
    engine = sample.Engine(ours, NO_STOP)
    vocab = ours.cfg.llm.vocab_size
    prompts = [prompt(n, vocab, seed=10 + n) for n in (5, 17, 11)]
    imgs = images(ours.cfg, 3, device, dtype, seed=5)
    batch = [g.token_ids for g in engine.generate(prompts, imgs, max_new_tokens=12)]
    alone = [engine.generate([p], imgs[i:i + 1], max_new_tokens=12)[0].token_ids for i, p in enumerate(prompts)]
    same = sum(a == b for a, b in zip(batch, alone))
    return same == 3, f"{same} of 3 left-padded rows give their tokens alone, {str(dtype)[6:]}"


def check_compiled_engine(workdir: Path, device):
    """Compiled = eager over batches of 3, 1 and 4: one graph per batch bucket (4, 1), the KV cache allocated once.

    In fp32: in bf16 inductor keeps fused intermediates in fp32 where eager rounds each op, which flips greedy
    tokens of a random model whose logits are nearly tied (the decode-speed rows run the compiled step in bf16).
    """
    dtype = torch.float32
    ours = GeoChat.from_pretrained(workdir / "hf", dtype=dtype, device=device).eval()
    if device.type == "cuda":
        torch._logging.set_logs(recompiles=True, cudagraphs=True)  # TORCH_LOGS=recompiles,cudagraphs
    try:
        eager, compiled = sample.Engine(ours, NO_STOP), sample.Engine(ours, NO_STOP, compile=True)
        vocab = ours.cfg.llm.vocab_size
        prompts = [prompt(n, vocab, seed=20 + n) for n in (5, 17, 11, 8)]
        imgs = images(ours.cfg, 4, device, dtype, seed=6)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        same, pointers = 0, set()
        for rows in (3, 1, 4, 3):
            want = [g.token_ids for g in eager.generate(prompts[:rows], imgs[:rows], max_new_tokens=10)]
            got = [g.token_ids for g in compiled.generate(prompts[:rows], imgs[:rows], max_new_tokens=10)]
            same += want == got
            pointers.add((ours.llm.layers[0].attn.kv_cache.k.data_ptr(), ours.llm.rope_cos.data_ptr()))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    finally:
        torch._logging.set_logs()
    ok = same == 4 and graphs == 2 and len(pointers) == 1 and skips == 0
    return ok, (f"{same}/4 calls equal eager; {graphs} graphs (expected 2); cache addresses {len(pointers)}; "
                f"cudagraph skips {skips}")


# ---------------------------------------------------------------------------------------------
# 3. decode speed


def peak_bandwidth(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def decoder_weight_bytes(model: GeoChat) -> int:
    """Bytes one decode step reads: every decoder weight (int8 ones and their scales too) but the embedding table (one
    row of it is gathered); the state dict holds no KV cache or rope tables (non-persistent buffers)."""
    return sum(t.numel() * t.element_size() for name, t in model.llm.state_dict().items() if "embed_tokens" not in name)


def bandwidth_figure(tokens_per_s: float, model: GeoChat, device):
    """(share of peak or None, 'N tok/s, X GB/s, Y% of peak')."""
    gbs = tokens_per_s * decoder_weight_bytes(model) / 1e9
    peak = peak_bandwidth(device)
    share = gbs * 1e9 / peak if peak else None
    return share, f"{tokens_per_s:.1f} tok/s, {gbs:.3g} GB/s" + (f", {100 * share:.0f}% of peak" if share else
                                                                   ", peak unknown")


def decode_rate(model, device, shapes: Shapes, compiled: bool) -> float:
    """Best decode tokens/s of two greedy runs of one image prompt, after a warm-up run (which compiles)."""
    engine = sample.Engine(model, NO_STOP, compile=compiled)
    ids = prompt(32, model.cfg.llm.vocab_size, seed=7)
    image = images(model.cfg, 1, device, model.llm.embed_tokens.weight.dtype)
    engine.generate([ids], image, max_new_tokens=shapes.new_tokens)  # warm-up (compiles)
    return max(engine.generate([ids], image, max_new_tokens=shapes.new_tokens)[0].decode_tokens_per_s for _ in range(2))


def check_decode_ours(model, device, shapes: Shapes, compiled: bool, result: dict):
    rate = decode_rate(model, device, shapes, compiled)
    result["compiled" if compiled else "eager"] = rate
    share, figure = bandwidth_figure(rate, model, device)
    if not compiled or share is None:
        return None, figure
    return share >= DECODE_BANDWIDTH_GOAL, figure + f" (goal {100 * DECODE_BANDWIDTH_GOAL:.0f}%)"


def check_decode_int8(model, device, shapes: Shapes, bf16: dict):
    """The bf16 model quantised to int8 in place (quant.quantize_model), compiled decode: tokens/s over compiled bf16."""
    quant.quantize_model(model, "int8")
    rate = decode_rate(model, device, shapes, compiled=True)
    _, figure = bandwidth_figure(rate, model, device)
    if "compiled" not in bf16:
        return None, figure + " (no compiled bf16 rate to compare)"
    ratio = rate / bf16["compiled"]
    return ratio > 1.0, figure + f"; int8 / bf16 = {ratio:.2f}x (pass: > 1; gpt-fast A100: 157 / 105 = 1.50x)"


def hf_twin(cfg: GeoChatConfig, device, dtype):
    """An HF LlavaForConditionalGeneration of the same shapes as cfg, random, built on device in dtype."""
    from transformers import CLIPVisionConfig, LlamaConfig as HFLlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v, t = cfg.vision, cfg.llm
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.n_layers,
                                       num_attention_heads=v.n_heads, image_size=cfg.image_size, patch_size=v.patch_size,
                                       hidden_act="quick_gelu"),
        text_config=HFLlamaConfig(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=t.intermediate_size,
                                  num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                                  num_key_value_heads=t.n_kv_heads, max_position_embeddings=t.max_seq_len),
        image_token_index=t.vocab_size - 1, vision_feature_layer=-2, projector_hidden_act="gelu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    return model.eval()


def check_decode_hf(hf, cfg: GeoChatConfig, device, dtype, shapes: Shapes, ours_bytes: int):
    import hf_ref

    ids, mask = hf_ref.hf_inputs(hf, torch.tensor([prompt(32, cfg.llm.vocab_size - 1, seed=7)]))
    ids, mask, image = ids.to(device), mask.to(device), images(cfg, 1, device, dtype)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, pixel_values=image, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    run(2)
    rate = (shapes.new_tokens - 1) / (min(run(shapes.new_tokens) for _ in range(2)) - min(run(1) for _ in range(2)))
    gbs = rate * ours_bytes / 1e9
    peak = peak_bandwidth(device)
    return None, f"{rate:.1f} tok/s, {gbs:.3g} GB/s" + (f", {100 * gbs * 1e9 / peak:.0f}% of peak" if peak else "")


# ---------------------------------------------------------------------------------------------
# 4. training


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Median seconds of `steps` calls of step() after `warmup` (which compile)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_train_ours(model, device, dtype, shapes: Shapes, compiled: bool, result: dict):
    loss_model, trainable, args = lora_training_setup(model, dtype, grad_ckpt=True, compile_blocks=compiled)
    optimizer = train.adamw(trainable, args, device)
    batch = train_batch(model.cfg, shapes.train_batch, shapes.text_tokens, device, dtype)
    n_target = train.n_labelled(batch)
    autocast = autocast_for(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        train.forward_backward(loss_model, batch, 1.0 / n_target, device, autocast)
        train.optimizer_step(trainable, optimizer)

    seconds = time_steps(step, device, shapes.warmup, shapes.steps)
    tokens = shapes.train_batch * (1 + model.cfg.n_image_tokens + shapes.text_tokens)  # BOS, image, text
    peak = train.peak_flops(device)
    mfu = train.train_flops_per_token(model) * tokens / seconds / peak if peak else None
    memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    result["samples_per_s"] = shapes.train_batch / seconds
    figure = f"{result['samples_per_s']:.2f} samples/s" + (f", MFU {100 * mfu:.1f}%" if mfu
                                                           else ", MFU n/a (no known peak FLOP/s)")
    return None, figure + memory + (", compiled" if compiled else ", eager")


def check_train_hf(hf, cfg: GeoChatConfig, device, dtype, shapes: Shapes, ours: dict):
    """The same LoRA step with HF + peft (gradient checkpointing, fp32 masters), and our speed over it."""
    import hf_ref
    from peft import LoraConfig, get_peft_model

    hf.train()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.enable_input_require_grads()
    targets = "|".join(lora.DEFAULT_TARGETS)
    model = get_peft_model(hf, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                          target_modules=rf".*language_model.*\.({targets})"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=device.type in ("cuda", "cpu"))
    batch = train_batch(cfg, shapes.train_batch, shapes.text_tokens, device, dtype)
    ids, _ = hf_ref.hf_inputs(hf, batch["input_ids"])  # the placeholder expanded to the image tokens
    labels, _ = hf_ref.hf_inputs(hf, batch["labels"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID))
    labels = labels.masked_fill(labels == hf.config.image_token_index, train.IGNORE_INDEX)
    ids, labels, pixels = ids.to(device), labels.to(device), batch["images"].to(device, dtype)

    def step():
        with autocast_for(device, dtype):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(step, device, shapes.warmup, shapes.steps)
    rate = shapes.train_batch / seconds
    ratio = f", ours / HF = {ours['samples_per_s'] / rate:.2f}x" if "samples_per_s" in ours else ""
    return None, f"{rate:.2f} samples/s{ratio}"


def check_policy_one_process(cfg, device, dtype, shapes: Shapes):
    """One process: bf16 autocast over fp32 masters gives SDPA q, k, v in bf16 and fp32 gradients."""
    model = random_model(cfg, device, dtype)
    loss_model, trainable, _ = lora_training_setup(model, dtype, grad_ckpt=True, compile_blocks=False)
    batch = train_batch(cfg, 2, shapes.text_tokens, device, dtype)
    with SDPADtypes() as seen:
        train.forward_backward(loss_model, batch, 1.0, device, autocast_for(device, dtype))
    grads = {str(p.grad.dtype).removeprefix("torch.") for p in trainable}
    want = str(dtype).removeprefix("torch.")
    ok = seen.seen == {(want,) * 3} and grads == {"float32"}
    return ok, f"SDPA (q, k, v) dtypes {sorted(seen.seen)}, grads {sorted(grads)}"


def check_policy_fsdp(cfg, device, dtype, shapes: Shapes, workdir: Path):
    """FSDP2 on a process group of one (NCCL on CUDA, gloo on CPU): the same dtypes inside forward, fp32 grads,
    and the sharded optimizer checkpoint read back equal."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(workdir / "store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    try:
        model = random_model(cfg, device, dtype)
        loss_model, trainable, args = lora_training_setup(model, dtype, grad_ckpt=True, compile_blocks=False)
        train.apply_fsdp(loss_model, 1, device, dtype)
        trainable = [p for p in loss_model.parameters() if p.requires_grad]
        optimizer = train.adamw(trainable, args, device)
        batch = train_batch(cfg, 2, shapes.text_tokens, device, dtype)
        with SDPADtypes() as seen:
            train.forward_backward(loss_model, batch, 1.0, device, autocast_for(device, dtype))
        grads = {str(p.grad.dtype).removeprefix("torch.") for p in trainable}
        train.optimizer_step(trainable, optimizer)
        train.save_optimizer(loss_model, optimizer, workdir / "optimizer")
        fresh = train.adamw(trainable, args, device)
        train.load_optimizer(loss_model, fresh, workdir / "optimizer")
        saved, loaded = optimizer.state_dict()["state"], fresh.state_dict()["state"]
        same = saved.keys() == loaded.keys() and all(
            torch.equal(saved[k][n].full_tensor() if hasattr(saved[k][n], "full_tensor") else saved[k][n],
                        loaded[k][n].full_tensor() if hasattr(loaded[k][n], "full_tensor") else loaded[k][n])
            for k in saved for n in ("exp_avg", "exp_avg_sq"))
    finally:
        if created:
            dist.destroy_process_group()
    want = str(dtype).removeprefix("torch.")
    ok = seen.seen == {(want,) * 3} and grads == {"float32"} and same
    return ok, (f"{'nccl' if device.type == 'cuda' else 'gloo'}: SDPA (q, k, v) dtypes {sorted(seen.seen)}, grads "
                f"{sorted(grads)}, optimizer checkpoint round trip {'equal' if same else 'DIFFERS'}")


# ---------------------------------------------------------------------------------------------
# 5. loading


def check_load(device, shapes: Shapes, workdir: Path):
    """from_pretrained of an fp16 safetensors checkpoint onto device: device memory ~ the weights, host RSS back."""
    import bench_load

    ckpt = workdir / "load"
    bench_load.write_checkpoint(ckpt, shapes.load_gigabytes, "safetensors")
    free_memory()
    rss_before = rss_mb()
    gpu_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = GeoChat.from_pretrained(ckpt, dtype=torch.float16, device=device)
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    free_memory()
    host_mb = rss_mb() - rss_before
    if device.type != "cuda":
        return True, f"{weights_mb:.0f} MB of weights loaded to cpu (mapped), host +{host_mb:.0f} MB"
    gpu_mb = (torch.cuda.memory_allocated(device) - gpu_before) / 2**20
    ok = gpu_mb <= 1.05 * weights_mb and host_mb <= 0.25 * weights_mb
    return ok, f"weights {weights_mb:.0f} MB: GPU +{gpu_mb:.0f} MB, host RSS +{host_mb:.0f} MB after load"


# ---------------------------------------------------------------------------------------------


def big_model_rows(report: Report, shapes: Shapes) -> int:
    """Kernel and decode rows on one random 7B-shaped model; returns its decoder's weight bytes."""
    device, dtype = report.device, torch.bfloat16
    if not report.wants("1 kernels", "3 decode"):
        return 0
    big, bf16_rates = random_model(shapes.big, device, dtype), {}
    report.run("1 kernels", "flash: unpadded prefill", lambda: check_flash_prefill(big, device), gpu_only=True)
    report.run("1 kernels", "flash: vision tower", lambda: check_flash_vision(big, device), gpu_only=True)
    report.run("1 kernels", "efficient: left-padded prefill + decode", lambda: check_efficient_padded(big, device),
               gpu_only=True)
    report.run("3 decode", f"ours eager, {shapes.name}",
               lambda: check_decode_ours(big, device, shapes, False, bf16_rates), gpu_only=True)
    report.run("3 decode", f"ours compiled, {shapes.name}",
               lambda: check_decode_ours(big, device, shapes, True, bf16_rates), gpu_only=True, compiles=True)
    for layer in big.llm.layers:  # drop the decode rows' KV cache before training
        layer.attn.kv_cache = None
    report.run("1 kernels", "flash: training step (LoRA, grad ckpt)",
               lambda: check_flash_training(big, device, dtype, shapes), gpu_only=True)
    weight_bytes = decoder_weight_bytes(big)  # in bf16, before the int8 row quantises the model
    report.run("3 decode", f"ours compiled int8, {shapes.name}",
               lambda: check_decode_int8(big, device, shapes, bf16_rates), gpu_only=True, compiles=True)
    return weight_bytes


def training_row(report: Report, shapes: Shapes) -> dict:
    """Our LoRA step on a fresh 7B-shaped model; returns its samples/s for the HF ratio."""
    device, dtype = report.device, torch.bfloat16
    if not report.wants("4 training"):
        return {}
    model, result = random_model(shapes.big, device, dtype), {}
    report.run("4 training", f"ours: LoRA step, {shapes.name}, --grad-ckpt --compile",
               lambda: check_train_ours(model, device, dtype, shapes, report.compile_rows, result), gpu_only=True)
    return result


def hf_twin_rows(report: Report, shapes: Shapes, weight_bytes: int, ours_train: dict):
    """HF generate and HF + peft on an HF model of the same shapes."""
    device, dtype = report.device, torch.bfloat16
    if not report.wants("3 decode", "4 training"):
        return
    try:
        hf, error = hf_twin(shapes.big, device, dtype), None
    except Exception as e:  # noqa: BLE001 (both rows then fail with the reason)
        hf, error = None, f"{type(e).__name__}: {e}"

    def decode():
        return check_decode_hf(hf, shapes.big, device, dtype, shapes, weight_bytes) if hf is not None else (False, error)

    def step():
        return check_train_hf(hf, shapes.big, device, dtype, shapes, ours_train) if hf is not None else (False, error)

    report.run("3 decode", f"HF generate, {shapes.name}", decode, gpu_only=True)
    report.run("4 training", "HF + peft: the same LoRA step", step, gpu_only=True)


def hf_pair_rows(report: Report, shapes: Shapes, workdir: Path):
    """Ours against HF on the same weights."""
    device, dtype = report.device, torch.bfloat16
    if not report.wants("2 vs HF"):
        return
    ref, ours = hf_pair(shapes, device, dtype, workdir)
    report.run("2 vs HF", "bf16 logits, same weights", lambda: check_hf_logits(ref, ours, device, dtype, shapes, workdir),
               gpu_only=True)
    report.run("2 vs HF", "greedy: 3 left-padded rows = each alone (fp32)",
               lambda: check_batch_equals_alone(workdir, device), gpu_only=True)
    report.run("2 vs HF", "compiled = eager (fp32), batches 3, 1, 4, 3", lambda: check_compiled_engine(workdir, device),
               gpu_only=True, compiles=True)


def run_checks(report: Report, shapes: Shapes, workdir: Path):
    """Every row; each phase holds its own model, so at most one big model is alive at a time."""
    device, dtype = report.device, torch.bfloat16
    weight_bytes = big_model_rows(report, shapes)
    free_memory()
    ours_train = training_row(report, shapes)
    free_memory()
    hf_twin_rows(report, shapes, weight_bytes, ours_train)
    free_memory()
    report.run("4 training", "policy, one process: dtypes in forward, grads",
               lambda: check_policy_one_process(shapes.policy, device, dtype, shapes))
    report.run("4 training", "policy, FSDP2 group of one: dtypes, grads, checkpoint",
               lambda: check_policy_fsdp(shapes.policy, device, dtype, shapes, workdir), gpu_only=True)
    hf_pair_rows(report, shapes, workdir)
    free_memory()
    report.run("5 loading", f"{shapes.load_gigabytes} GB fp16 checkpoint to {device.type}",
               lambda: check_load(device, shapes, workdir), gpu_only=True)


def main(argv=None) -> int:
    """Run the checks; print the table (or JSON); exit 1 when a row failed, 2 on bad usage."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code, GPU-only rows marked skip-cpu")
    p.add_argument("--compile", action="store_true", help="--dry-run: also run the compiled rows (slow on CPU)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--sections", default=None, help="comma-separated section numbers to run (1-5), e.g. 2,3; default all")
    args = p.parse_args(argv)
    sections = None if args.sections is None else set(args.sections.replace(" ", "").split(","))
    if sections is not None and not sections <= {"1", "2", "3", "4", "5"}:
        print(f"gpu_check.py: error: --sections {args.sections!r}: expected numbers from 1 to 5, e.g. 2,3", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device; run with --dry-run to check the code on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    report = Report(device, compile_rows=not args.dry_run or args.compile, sections=sections)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_checks(report, shapes_for(args.dry_run), Path(tmp))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    if args.json:
        print(json.dumps({"device": card, "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
                          "rows": [asdict(r) for r in report.rows]}))
    else:
        print(f"{card}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n")
        print(report.table())
    return 1 if any(r.status == "fail" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
