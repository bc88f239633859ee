"""Fine-tune GeoChat (LoRA, projector-only or full), on one process or many with FSDP2.

    python train.py --checkpoint CKPT --data GeoChat_Instruct.json --image-folder IMAGES --out runs/lora
    torchrun --nproc_per_node=8 train.py --checkpoint CKPT --data ... --image-folder ... --out ... --grad-ckpt

Defaults follow the paper and the reference script: LoRA r=64 alpha=16 dropout 0.05 on every decoder linear
except lm_head, the projector and the vision tower frozen (--train-projector trains the projector too);
global batch 144, AdamW lr 2e-4, cosine with 3% linear warmup (transformers'
get_cosine_schedule_with_warmup, step by step), weight decay 0, bf16 (on cuda and on CPUs with native
bf16), text truncated at 2048 ids (the <image> placeholder counted as one; its features come on top), 1 epoch.

Mixed precision, one policy for one process and for N: bf16 compute (every matmul and attention, q, k and v
all bf16, the residual stream and the RoPE tables bf16, norms and the loss in fp32), fp32 master weights for
what trains, fp32 gradients and fp32 gradient reductions. One process: bf16 autocast over the fp32 masters
and the decoder input cast to bf16; N processes: FSDP2 casts the parameters to bf16 when it gathers them
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)) under the same autocast. With gradient
accumulation, FSDP2 reduce-scatters LoRA / projector gradients once, after the last micro-batch
(set_requires_gradient_sync); --mode full reduces after every micro-batch, so that no rank holds the
whole model's unsharded fp32 gradients.

Model setup (torchtitan order): build (from_pretrained, or on meta + init for --config) -> LoRA and
trainable flags per --mode -> fp32 master copies of the trainable params -> per-block torch.compile
(`Module.compile`, names stay clean) -> FSDP2 `fully_shard` per decoder block, then the root, when
world_size > 1 (a frozen vision tower stays whole on every rank). Activation checkpointing runs
`torch.utils.checkpoint` around each decoder block inside `CausalLMLoss.forward`, so no wrapper
modules enter the state-dict names.

Data order does not depend on the world size: ShardedSampler(seed, epoch) permutes the dataset; the
global batch of step k is the permutation's slice [k*G, (k+1)*G) (G = --global-batch; the epoch's
tail that does not fill a global batch is dropped). Rank r of W holds that permutation's entries
r, r+W, r+2W, ... (ShardedSampler's rank slice), so its samples of step k are the global batch's
entries r::W, cut into micro-batches of --batch-size. The loss is the sum of the token losses over
the global batch divided by its number of labelled tokens (counted across ranks before the
forward), so 1 process and N processes compute the same loss and gradients.

Output directory (--out):
  ckpt/                 the latest complete checkpoint: the trainable weights (adapter.safetensors +
                        adapter_config.json for lora/projector; config.json + model.safetensors +
                        tokenizer.model for full), optimizer/ (the optimizer state, sharded: every rank
                        writes its own shards with torch.distributed.checkpoint, as torchtitan; nothing
                        is gathered) and train_state.pt (step, epoch, data position, the lr schedule,
                        the RNG state of every rank). Written and fsynced as ckpt.tmp/, then swapped in by renames
                        (ckpt -> ckpt.old, ckpt.tmp -> ckpt, ckpt.old removed; ckpt.old is only ever
                        removed while a complete ckpt/ exists), so a run killed at any point of a save
                        keeps a complete checkpoint (--resume falls back to ckpt.old if the kill hit
                        between the two renames).
  adapter.safetensors, adapter_config.json (lora/projector) or config.json, model.safetensors,
  tokenizer.model (full): hard links (or copies) of ckpt/'s weights, each replaced atomically, so
                        `sample.py --lora OUT` / `GeoChat.from_pretrained(OUT)` read OUT directly.
  metrics.jsonl         one line per step (rank 0), never deleted: a resume drops only the lines past
                        its checkpoint's step; a new run refuses an --out whose metrics.jsonl has no
                        checkpoint beside it. args.json, the command line's settings.

--resume (an error when --out holds no checkpoint) reloads ckpt/: base weights from --checkpoint (or
--config init), the trainable weights, the optimizer state (torch.distributed.checkpoint reshards it, so
any world size can resume any other's; a train_state.pt of older runs that holds the whole optimizer state
is read by rank 0 and broadcast), the step and data position (the sampler restarts
at that position of the same permutation) and each rank's RNG state (same world size; else every rank
is reseeded from seed, rank and step). The lr is a pure function of the step. Settings that change the
run's data order or shapes (mode, trained modules, global batch, seed, dataset size, total steps, LoRA
r/alpha/dropout) must match. Ctrl-C stops with exit code 130, keeping the last complete checkpoint.

Unlike model.llm(embeds), CausalLMLoss runs lm_head only at labelled positions (no (B, L, vocab)
logits) and checkpoints blocks without wrapper modules; tests check it against model.llm's logits.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lora
from boxes import BOX_VALUE_PIECES
from data import SKIP_REASONS, TEMPLATES, InstructDataset, ShardedSampler, Tokenizer, collate
from geochat import DTYPES, GEOCHAT_CONFIGS, IGNORE_INDEX, IMAGE_TOKEN_ID, NATIVE_FORMAT, GeoChat, GeoChatConfig, load_vision_tower

MODES = ("lora", "projector", "full")
CKPT, CKPT_TMP, CKPT_OLD = "ckpt", "ckpt.tmp", "ckpt.old"
TRAIN_STATE = "train_state.pt"
OPTIMIZER_DIR = "optimizer"  # in a checkpoint: the torch.distributed.checkpoint directory of the optimizer state
METRICS = "metrics.jsonl"
LENGTH_GROUP_BATCHES = 50  # --group-by-length: global batches per sorted run (transformers' megabatch_mult)
# The reasons data.InstructDataset counts in its `skipped` Counter.
# Fault injection for tests only: GEOCHAT_TEST_KILL_AT="<save step>:<train step>" makes the save of that
# train step os._exit(KILL_EXIT_CODE) right after that save step.
KILL_AT_ENV = "GEOCHAT_TEST_KILL_AT"
KILL_EXIT_CODE = 86
SAVE_STEPS = ("tmp-cleared", "weights-written", "state-written", "old-cleared", "ckpt-moved-to-old",
              "tmp-moved-to-ckpt", "old-removed", "weights-exported")
# Dense bf16 peak FLOP/s per GPU, matched by substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 125e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]


class UsageError(Exception):
    """A bad command line or input file: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description="Fine-tune GeoChat (LoRA / projector / full), single process or torchrun + FSDP2.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory to fine-tune (any layout GeoChat.from_pretrained reads)")
    src.add_argument("--config", help=f"train from scratch: a config name ({', '.join(GEOCHAT_CONFIGS)}) or our config.json")
    p.add_argument("--vision-tower", help="CLIP directory: the tower of a release checkpoint that lacks its weights; with "
                   "--config, a pretrained tower to start from (frozen, like the reference's CLIP, unless --train-vision)")
    p.add_argument("--tokenizer", help="tokenizer.model; None: the checkpoint's (required with --config)")
    p.add_argument("--data", required=True, help="GeoChat_Instruct-style json")
    p.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--mode", choices=MODES, default="lora",
                   help="lora: LoRA on the decoder, the projector frozen (see --train-projector); projector: the "
                        "projector only; full: everything but a pretrained vision tower")
    p.add_argument("--train-projector", action="store_true",
                   help="--mode lora: also train the projector fully and save it in the adapter (the reference keeps "
                        "it frozen)")
    p.add_argument("--train-vision", action="store_true",
                   help="--mode full: also train a pretrained vision tower (from --checkpoint or --vision-tower; a "
                        "scratch tower, --config alone, always trains)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps to run (overrides --epochs)")
    length.add_argument("--epochs", type=int, default=1, help="passes over the dataset")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per device")
    p.add_argument("--global-batch", type=int, default=144, help="samples per optimizer step over all ranks")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="linear warmup over ceil(ratio x steps) steps, then cosine to 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of matrices (not biases, norms)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="vicuna_v1",
                   help="conversation template of the training prompts: vicuna_v1 (\"curious user\") as the reference "
                        "trains; llava_v1 (\"curious human\") is what sample.py and eval.py ask with, for a model "
                        "trained from scratch that has never seen the word \"human\" (Baby GeoChat)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="text ids kept per sample (the reference's model_max_length), the <image> placeholder counted "
                        "as one; the image features come on top")
    p.add_argument("--group-by-length", action="store_true",
                   help=f"batches of records of similar length (each run of {LENGTH_GROUP_BATCHES} global batches of "
                        "the shuffled order sorted longest first, as transformers' group_by_length): less padding, "
                        "but records of one task often share a length, so a batch may hold one task")
    p.add_argument("--box-value-sigma", type=float, default=0.0,
                   help="> 0: a box value's token (a tokenizer with one piece per value, `synthetic/prepare.py tokenizer "
                        "--box-pieces`) is trained towards a Gaussian of this many values around the true one (KL "
                        "divergence) instead of the one true piece, so that a near value costs less than a far one "
                        "(Baby GeoChat); 0: plain cross entropy, as the reference")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder block")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="compute dtype of the frozen weights and autocast; auto: bfloat16 on cuda and on CPUs with "
                        "native bf16 (AVX512-BF16 or AMX), else float32")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end); 0: end only")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (an error when none is there)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train")
    p.add_argument("--seed", type=int, default=0, help="data order, LoRA init and dropout seed")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per rank; None: 4 on cuda, 0 on cpu")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    return build_parser().parse_args(argv)


def check_args(args):
    """Argument errors that need no file access."""
    positive = {"--batch-size": args.batch_size, "--global-batch": args.global_batch, "--max-length": args.max_length,
                "--lora-r": args.lora_r}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    floats = {"--lr": args.lr, "--warmup-ratio": args.warmup_ratio, "--weight-decay": args.weight_decay,
              "--lora-alpha": args.lora_alpha, "--lora-dropout": args.lora_dropout,
              "--box-value-sigma": args.box_value_sigma}
    for flag, value in floats.items():
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if not 0 <= args.warmup_ratio <= 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.box_value_sigma < 0:
        raise UsageError(f"--box-value-sigma must be >= 0, got {args.box_value_sigma}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {args.save_every}")
    if args.train_projector and args.mode != "lora":
        raise UsageError(f"--train-projector goes with --mode lora (--mode {args.mode} trains the projector anyway)")
    if args.train_vision and args.mode != "full":
        raise UsageError(f"--train-vision goes with --mode full, not --mode {args.mode}")
    if args.config is not None and args.tokenizer is None:
        raise UsageError("--config (training from scratch) needs --tokenizer PATH (a SentencePiece tokenizer.model)")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory {args.checkpoint} not found")
    if args.vision_tower is not None and not (Path(args.vision_tower) / "config.json").is_file():
        raise UsageError(f"--vision-tower {args.vision_tower}: not a CLIP directory (no config.json)")
    if not Path(args.data).is_file():
        raise UsageError(f"data file {args.data} not found")
    if not Path(args.image_folder).is_dir():
        raise UsageError(f"image folder {args.image_folder} not found")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX); torch's get_cpu_capability() does not say."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(requested: str, device_type: str) -> str:
    """--dtype's name: auto -> bfloat16 on cuda or a CPU with native bf16, else float32; warns of emulated bf16."""
    native_bf16 = device_type == "cuda" or cpu_has_native_bf16()
    if requested == "auto":
        return "bfloat16" if native_bf16 else "float32"
    if requested == "bfloat16" and not native_bf16:
        print("train.py: warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 runs emulated, "
              "slower than --dtype float32", file=sys.stderr)
    return requested


# ---------------------------------------------------------------------------------------------
# distributed


def init_distributed(device_type: str):
    """(rank, world_size, device); a process group (gloo on CPU, NCCL on CUDA) only under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over ranks (a no-op on one process)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def barrier(world: int):
    """Wait for every rank (a no-op on one process)."""
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# model


class CausalLMLoss(nn.Module):
    """GeoChat plus its training loss (the FSDP root): forward -> sum of the token cross entropies (box values:
    KL to a Gaussian over the values with box_value_sigma > 0)."""

    def __init__(self, model: GeoChat, grad_ckpt: bool = False, compute_dtype: torch.dtype = torch.float32,
                 box_value_ids: list[int] | None = None, box_value_sigma: float = 0.0):
        super().__init__()
        self.model = model
        self.grad_ckpt = grad_ckpt
        self.compute_dtype = compute_dtype  # the decoder's input: the residual stream and RoPE in this dtype
        self.box_value_sigma = box_value_sigma
        if box_value_sigma > 0:  # --box-value-sigma: buffers kept out of the state dict (nothing enters a checkpoint)
            ids = torch.tensor(box_value_ids)  # (V,) the token id of each box value 0..V-1
            value_of_token = torch.full((model.cfg.llm.vocab_size,), -1, dtype=torch.long)
            value_of_token[ids] = torch.arange(len(ids))
            values = torch.arange(len(ids), dtype=torch.float64)
            soft = torch.exp(-0.5 * ((values[None, :] - values[:, None]) / box_value_sigma) ** 2)  # (V, V)
            soft = soft / soft.sum(-1, keepdim=True)
            self.register_buffer("box_value_ids", ids, persistent=False)
            self.register_buffer("value_of_token", value_of_token, persistent=False)
            self.register_buffer("soft_targets", soft.float(), persistent=False)
            self.register_buffer("soft_neg_entropy", (soft * soft.clamp_min(1e-300).log()).sum(-1).float(),
                                 persistent=False)  # (V,) sum q log q

    def forward(self, input_ids, labels, images=None):
        """Sum of CE(logits[t], labels[t+1]) (or the box-value KL) over labelled positions of a right-padded batch."""
        embeds, _, labels = self.model.embed_inputs(input_ids, images, None, labels)  # (B, L, D), (B, L)
        embeds = embeds.to(self.compute_dtype)  # fp32 token embeddings (full mode's masters) would promote q, k
        llm = self.model.llm
        # Right padding: pads come after every real token, so plain causal attention (no mask, the
        # flash path) is exact at every labelled position; lm_head runs only where a label is.
        hidden = llm.hidden_states(embeds, checkpoint_blocks=self.grad_ckpt)  # (B, L, D)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, L-1)
        logits = llm.lm_head(hidden[:, :-1][keep]).float()  # (n_labelled, vocab)
        targets = targets[keep]  # (n_labelled,)
        if self.box_value_sigma == 0:
            return F.cross_entropy(logits, targets, reduction="sum")
        # A box value's token: KL(q || p) with q a Gaussian over the box values around the true one (the plain
        # cross entropy as sigma -> 0), so that a value one off costs less than one far off.
        log_probs = logits.log_softmax(-1)  # (n, vocab)
        loss = -log_probs.gather(1, targets[:, None]).squeeze(1)  # (n,)
        value = self.value_of_token[targets]  # (n,) the target's box value, -1 for any other token
        on = value >= 0
        soft = self.soft_targets[value[on]]  # (m, V)
        kl = self.soft_neg_entropy[value[on]] - (soft * log_probs[on][:, self.box_value_ids]).sum(-1)  # (m,)
        return loss.index_put((on,), kl).sum()


def load_config(name_or_path: str) -> GeoChatConfig:
    """A named config or our config.json."""
    if name_or_path in GEOCHAT_CONFIGS:
        return GeoChatConfig.from_name(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise UsageError(f"--config {name_or_path!r} is neither a known config ({', '.join(GEOCHAT_CONFIGS)}) nor a file")
    try:
        return GeoChatConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a GeoChat config.json ({type(e).__name__}: {e})") from None


def sincos_position_rows(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) fixed 2-D sine-cosine position rows (MAE's): half the channels code the row, half the column."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (quarter,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    angles = [pos.reshape(-1, 1) * freqs for pos in (rows, cols)]  # 2 x (grid*grid, quarter)
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (grid*grid, 4*quarter)
    return torch.nn.functional.pad(table, (0, width - 4 * quarter)).float()


@torch.no_grad()
def init_weights(model: nn.Module, seed: int):
    """Deterministic init from seed (same on every rank and device): N(0, 0.02) matrices, 0 biases, 1 norms.

    A GeoChat's vision position embeddings start as 2-D sine-cosine rows (the class row at 0), so
    that a tower trained from scratch knows where each patch is from the first step.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 or name.endswith("class_embed"):
            value = torch.randn(p.shape, generator=g) * 0.02
        elif name.endswith(".bias"):
            value = torch.zeros(p.shape)
        else:  # LayerNorm / RMSNorm weights
            value = torch.ones(p.shape)
        p.copy_(value)
    if isinstance(model, GeoChat):
        tower = model.vision
        tower.pos_embed[0].zero_()
        tower.pos_embed[1:].copy_(sincos_position_rows(tower.grid, tower.pos_embed.shape[1]))


def build_model(args, dtype, device) -> GeoChat:
    """The base model: from --checkpoint in `dtype`, or built on meta and initialised for --config."""
    if args.checkpoint is not None:
        return GeoChat.from_pretrained(args.checkpoint, dtype=dtype, device=device, vision_tower=args.vision_tower).train()
    cfg = load_config(args.config)
    with torch.device("meta"):
        model = GeoChat(cfg)
    model.to_empty(device=device)
    init_weights(model, args.seed)
    if args.vision_tower is not None:  # a pretrained tower (synthetic/pretrain_tower.py writes one for the baby)
        try:
            load_vision_tower(model, args.vision_tower)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    return model.to(dtype).train()


def train_modules(args) -> list[str]:
    """The modules trained fully besides LoRA (lora: none, the reference's frozen projector, unless --train-projector)."""
    if args.mode == "lora":
        return ["projector"] if args.train_projector else []
    if args.mode == "projector":
        return ["projector"]
    # a scratch tower learns too; a pretrained one (--checkpoint, or --config with --vision-tower) stays frozen
    vision = (args.config is not None and args.vision_tower is None) or args.train_vision
    return ["projector", "llm"] + (["vision"] if vision else [])


def setup_trainable(model: GeoChat, args, dtype):
    """LoRA and requires_grad per --mode; trainable params become fp32 masters, frozen ones `dtype`."""
    if args.mode == "lora":
        lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    lora.mark_trainable(model, train_modules(args))
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def apply_fsdp(loss_model: CausalLMLoss, world: int, device, dtype):
    """FSDP2: fully_shard each decoder block (and trainable vision block), then the root; frozen vision whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model = loss_model.model
    vision_trains = any(p.requires_grad for p in model.vision.parameters())
    if vision_trains:
        for block in model.vision.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    for i, block in enumerate(model.llm.layers):
        # the last block's params are needed again first thing in backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.llm.layers) - 1)
    ignored = None if vision_trains else set(model.vision.parameters())
    fully_shard(loss_model, mesh=mesh, mp_policy=mp, ignored_params=ignored, reshard_after_forward=False)


def adamw(params, args, device) -> torch.optim.AdamW:
    """AdamW over the trainable params; no weight decay on 1-d params (biases, norms), like HF Trainer."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999),
                             fused=device.type in ("cuda", "cpu"))  # one kernel for all params (FSDP2 DTensors too)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """The lr of optimizer step `step` (0-based), as transformers' get_cosine_schedule_with_warmup gives it."""
    if step < warmup:
        return peak * (step / max(1, warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def forward_backward(loss_model, batch, scale: float, device, autocast) -> torch.Tensor:
    """Backward of scale * (sum of token losses) of one micro-batch; returns the detached sum (float64)."""
    images = batch["images"].to(device, non_blocking=True) if batch["images"] is not None else None
    with autocast:
        token_loss = loss_model(batch["input_ids"].to(device), batch["labels"].to(device), images)
    (token_loss * scale).backward()
    return token_loss.detach().double()


def optimizer_step(trainable, optimizer) -> float:
    """Clip the gradient norm to 1, step, zero the grads; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_flops_per_token(model: GeoChat) -> float:
    """Matmul FLOPs per decoder token of a training step, for MFU: each decoder weight 2 forward + 2 for the input
    gradient, + 2 for its own gradient only when it trains (LoRA: ~4N, full: 6N); no embeddings, attention scores
    or vision tower, lm_head counted at every token."""
    weights = [p for name, p in model.llm.named_parameters() if p.ndim == 2 and "embed_tokens" not in name]
    return 4 * sum(p.numel() for p in weights) + 2 * sum(p.numel() for p in weights if p.requires_grad)


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU, None when unknown or on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# data


def collate_counting(items, pad_id, dataset):
    """(collated batch or None, samples asked for, skips per reason) of one micro-batch; drains dataset.skipped."""
    # runs where the items were just loaded (DataLoader worker or main process): that Counter holds their skips only
    skips = Counter(dataset.skipped)
    dataset.skipped.clear()
    return collate(items, pad_id), len(items), skips


def micro_batches(dataset, args, rank, world, epoch, step_in_epoch, steps_per_epoch, pad_id):
    """This rank's micro-batches from (epoch, step_in_epoch) on, epoch after epoch (see module docstring)."""
    per_rank = args.global_batch // world
    workers = args.num_workers if args.num_workers is not None else (4 if args.device == "cuda" else 0)
    lengths = dataset.text_lengths() if args.group_by_length else None
    sampler = ShardedSampler(len(dataset), rank, world, args.seed, shuffle=True, lengths=lengths,
                             group_size=LENGTH_GROUP_BATCHES * args.global_batch)
    while True:
        sampler.set_epoch(epoch, start_index=step_in_epoch * per_rank)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=partial(collate_counting, pad_id=pad_id, dataset=dataset),
            generator=torch.Generator().manual_seed(args.seed),
            persistent_workers=False, pin_memory=args.device == "cuda")
        n_micro = (steps_per_epoch - step_in_epoch) * per_rank // args.batch_size
        for i, micro in enumerate(loader):
            if i == n_micro:
                break
            yield micro
        epoch, step_in_epoch = epoch + 1, 0


def next_global_batch(batches, accum: int, args, world: int, device, step: int):
    """(micro-batches of this rank, labelled tokens and skips per reason of the global batch); exit 2 if none trains."""
    micro = [next(batches) for _ in range(accum)]
    counts = [sum(n_labelled(b) for b, _, _ in micro), *(sum(s[r] for _, _, s in micro) for r in SKIP_REASONS)]
    counts = torch.tensor(counts, dtype=torch.float64, device=device)
    counts = all_reduce_sum(counts, world).cpu().tolist()
    skips = Counter({reason: int(n) for reason, n in zip(SKIP_REASONS, counts[1:]) if n})
    if counts[0] == 0:
        fail(f"{args.data}: no trainable sample in the {args.global_batch} samples of step {step + 1}: skipped "
             f"{format_skips(skips)} (check --image-folder and --max-length)")
    return micro, counts[0], skips


def format_skips(skips: Counter) -> str:
    """'reason count, ...' of a skip Counter, 'none' when empty."""
    return ", ".join(f"{reason} {n}" for reason, n in sorted(skips.items())) or "none"


def n_labelled(batch) -> int:
    """Labelled (shifted) target positions of a collated batch."""
    return 0 if batch is None else int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def n_tokens(batch, n_image_tokens: int) -> int:
    """Real tokens the decoder sees (text + spliced image features) in a collated batch."""
    if batch is None:
        return 0
    n_images = 0 if batch["images"] is None else batch["images"].shape[0]
    return int(batch["attention_mask"].sum()) + n_images * (n_image_tokens - 1)


def with_image(batch, bos_id: int, pad_id: int, image_size: int):
    """The batch plus an unlabelled dummy row with an image when it has none (so every rank runs every FSDP unit)."""
    dummy_image = torch.zeros(1, 3, image_size, image_size)
    if batch is None:
        return dict(input_ids=torch.tensor([[bos_id, IMAGE_TOKEN_ID]]), labels=torch.full((1, 2), IGNORE_INDEX),
                    images=dummy_image)
    if batch["images"] is not None:
        return batch
    T = max(2, batch["input_ids"].shape[1])
    ids = torch.full((batch["input_ids"].shape[0] + 1, T), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    ids[:-1, :batch["input_ids"].shape[1]] = batch["input_ids"]
    labels[:-1, :batch["labels"].shape[1]] = batch["labels"]
    ids[-1, :2] = torch.tensor([bos_id, IMAGE_TOKEN_ID])
    return dict(input_ids=ids, labels=labels, images=dummy_image)


# ---------------------------------------------------------------------------------------------
# checkpoints


def find_checkpoint(out: Path) -> Path | None:
    """The latest complete checkpoint directory under out (ckpt, else ckpt.old left by a kill mid-swap)."""
    for name in (CKPT, CKPT_OLD):
        if (out / name / TRAIN_STATE).is_file():
            return out / name
    return None


def gather_full_state(model: nn.Module, rank: int) -> dict:
    """The model's state dict, DTensor shards gathered (collective), on CPU on rank 0 ({} elsewhere)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if rank == 0:
            state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_weights(model: GeoChat, directory: Path, args, tokenizer_path, rank, world):
    """The trainable weights: an adapter (lora/projector) or the whole model in our layout (full)."""
    if args.mode != "full":
        lora.save_adapter(model, directory, extra_modules=train_modules(args))  # collective; rank 0 writes
        return
    if world == 1:
        model.save_pretrained(directory, tokenizer_model=tokenizer_path)
        return
    from safetensors.torch import save_file

    state = gather_full_state(model, rank)
    if rank == 0:  # the files model.save_pretrained writes
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": NATIVE_FORMAT})
        (directory / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, directory / "tokenizer.model")


@contextlib.contextmanager
def sigint_held_back():
    """Deliver a Ctrl-C (SIGINT) that arrives inside the block only when it ends: torch.distributed.checkpoint
    would catch the KeyboardInterrupt and raise its own CheckpointException instead (a traceback, not exit 130)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # now, to the previous handler (KeyboardInterrupt by default)


def save_optimizer(loss_model, optimizer, directory: Path):
    """Write the optimizer state with torch.distributed.checkpoint, FQN-keyed; each rank its own shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with sigint_held_back(), warnings.catch_warnings():  # one process: DCP warns of no process group, as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(loss_model, optimizer)}, checkpoint_id=directory,
                 no_dist=not dist.is_initialized())


def load_optimizer(loss_model, optimizer, directory: Path):
    """Read save_optimizer's directory into this run's sharding (any world size; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(loss_model, optimizer)}  # this run's shapes and shards, filled in
    with sigint_held_back(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(loss_model, optimizer, state["optimizer"])


def load_optimizer_state(loss_model, optimizer, state: dict, world):
    """Load a full optimizer state from an older checkpoint's train_state.pt (rank 0's copy broadcast under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_optimizer_state_dict(loss_model, optimizer, state, options=options)


def rng_state(device) -> dict:
    """This process's torch RNG states."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    """Restore rng_state()'s result."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_train_state(path: Path, state: dict):
    """torch.save to a temp file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fsync_path(path: Path):
    """Flush a file's or a directory's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path):
    """fsync every file and directory under directory (the optimizer/ shards included), then the directory itself."""
    for f in directory.iterdir():
        if f.is_dir():
            fsync_tree(f)
        else:
            fsync_path(f)
    fsync_path(directory)


def fault_point(save_step: str, step: int):
    """Tests only: os._exit(KILL_EXIT_CODE) when GEOCHAT_TEST_KILL_AT is "<save_step>:<step>"."""
    if os.environ.get(KILL_AT_ENV) == f"{save_step}:{step}":
        os._exit(KILL_EXIT_CODE)


def read_train_state(ckpt: Path, rank: int, world: int) -> dict:
    """train_state.pt: read by rank 0 (memory-mapped), everything but the optimizer state broadcast to the others."""
    state = torch.load(ckpt / TRAIN_STATE, map_location="cpu", mmap=True, weights_only=True) if rank == 0 else None
    if world > 1:
        box = [{k: v for k, v in state.items() if k != "optimizer"} if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        state = state if rank == 0 else box[0]
    return state


def export_weights(ckpt: Path, out: Path):
    """Put ckpt's weight files at the top of out (hard link, else copy), each swapped in atomically."""
    for f in sorted(ckpt.iterdir()):
        if f.name == TRAIN_STATE or not f.is_file():
            continue
        tmp = out / f".{f.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copyfile(f, tmp)
        os.replace(tmp, out / f.name)
    fsync_path(out)


def save_checkpoint(out: Path, model, loss_model, optimizer, args, tokenizer_path, train_state: dict, rank, world, device):
    """Write ckpt.tmp/ and fsync it, then swap it in for ckpt/: a complete checkpoint stands at every point (all ranks)."""
    step = train_state["step"]
    tmp, current, old = out / CKPT_TMP, out / CKPT, out / CKPT_OLD
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        fault_point("tmp-cleared", step)
    barrier(world)
    save_weights(model, tmp, args, tokenizer_path, rank, world)
    save_optimizer(loss_model, optimizer, tmp / OPTIMIZER_DIR)  # every rank writes its own shards
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state(device))
    else:
        rngs[0] = rng_state(device)
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
        fault_point("weights-written", step)
        write_train_state(tmp / TRAIN_STATE, {**train_state, "rng": rngs, "world_size": world})
        fsync_tree(tmp)
        fault_point("state-written", step)
        rotate = current.exists()  # ckpt.old may go only while a complete ckpt/ stands (not after a resume from it)
        if rotate and old.exists():
            shutil.rmtree(old)
        fault_point("old-cleared", step)
        if rotate:
            os.replace(current, old)
            fsync_path(out)
        fault_point("ckpt-moved-to-old", step)
        os.replace(tmp, current)
        fsync_path(out)
        fault_point("tmp-moved-to-ckpt", step)
        if old.exists():
            shutil.rmtree(old)
            fsync_path(out)
        fault_point("old-removed", step)
        export_weights(current, out)
        fault_point("weights-exported", step)
    barrier(world)


def load_trainable(model: GeoChat, ckpt: Path, args):
    """Load the checkpoint's trainable weights into the (not yet sharded) model."""
    if args.mode != "full":
        lora.load_adapter(model, ckpt)
        return
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(model.llm.embed_tokens.weight.device)))


# ---------------------------------------------------------------------------------------------
# main


def setup(args, rank, world, device):
    """Tokenizer, dataset, model and run geometry; every input error raised here is a UsageError-like one."""
    out = Path(args.out)
    if args.global_batch % (args.batch_size * world):
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by --batch-size {args.batch_size} "
                         f"x world size {world}")
    ckpt = find_checkpoint(out)
    if ckpt is not None and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint ({ckpt}); pass --resume to continue it or pick another --out")
    if ckpt is None and args.resume:
        raise UsageError(f"--resume: {out} holds no checkpoint ({CKPT}/ or {CKPT_OLD}/ with {TRAIN_STATE})")
    if ckpt is None and (out / METRICS).exists():
        raise UsageError(f"{out / METRICS} is from a run that saved no checkpoint; move it away or pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out {out} is not a writable directory ({e.strerror or e})") from None
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint) / "tokenizer.model"
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise UsageError(f"tokenizer {tokenizer_path} not found" + ("" if args.tokenizer else " (pass --tokenizer PATH)"))
    tokenizer = Tokenizer(tokenizer_path)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)  # identical LoRA init on every rank
    model = build_model(args, dtype, device)
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {cfg.llm.vocab_size}")
    if args.box_value_sigma > 0:
        box_value_ids(tokenizer, tokenizer_path)  # raises if a value is not one piece
    # the reference truncates the text ids (the placeholder one id) at model_max_length; the image features come on top
    dataset = InstructDataset(args.data, args.image_folder, tokenizer, image_size=cfg.image_size,
                              max_length=args.max_length, n_image_tokens=1, template=args.template)
    if len(dataset) < args.global_batch:
        raise UsageError(f"{args.data} has {len(dataset)} samples, fewer than one global batch ({args.global_batch})")
    return out, ckpt, tokenizer, tokenizer_path, model, dataset


def box_value_ids(tokenizer: Tokenizer, path) -> list[int]:
    """The token id of each box value "<0>" ... "<100>"; UsageError when one is not a single piece."""
    ids = [tokenizer.sp.piece_to_id(piece) for piece in BOX_VALUE_PIECES]
    missing = [piece for piece, i in zip(BOX_VALUE_PIECES, ids) if i == tokenizer.unk_id]
    if missing:
        raise UsageError(f"--box-value-sigma: tokenizer {path} has no single piece for the box value {missing[0]} "
                         f"({len(missing)} of {len(ids)} missing; `synthetic/prepare.py tokenizer --box-pieces` makes one)")
    return ids


def fail(message: str):
    """Print one error line and exit with code 2."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def exit_interrupted(out: Path, rank: int):
    """Ctrl-C: one line on stderr (rank 0) naming the checkpoint kept, exit code 130."""
    if rank == 0:
        ckpt = find_checkpoint(out)
        kept = f"--resume continues from {ckpt}" if ckpt is not None else "no checkpoint was saved"
        print(f"train.py: interrupted; {kept}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def main(argv=None) -> dict:
    """Train; returns a summary dict (final step, last loss) on every rank."""
    args = parse_args(argv)
    try:
        check_args(args)
    except UsageError as e:
        fail(str(e))
    args.dtype = resolve_dtype(args.dtype, args.device)
    rank, world, device = init_distributed(args.device)
    try:
        try:
            out, ckpt, tokenizer, tokenizer_path, model, dataset = setup(args, rank, world, device)
        except (UsageError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        return train(args, rank, world, device, out, ckpt, tokenizer, tokenizer_path, model, dataset)
    except KeyboardInterrupt:
        exit_interrupted(Path(args.out), rank)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device, out, ckpt, tokenizer, tokenizer_path, model, dataset) -> dict:
    """The training loop (see module docstring)."""
    dtype = DTYPES[args.dtype]
    cfg = model.cfg
    setup_trainable(model, args, dtype)
    steps_per_epoch = len(dataset) // args.global_batch
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    warmup = math.ceil(args.warmup_ratio * total_steps)
    accum = args.global_batch // (args.batch_size * world)
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "skipped": 0, "skipped_by_reason": {}}
    run_info = {"mode": args.mode, "train_modules": train_modules(args), "global_batch": args.global_batch,
                "seed": args.seed, "dataset_len": len(dataset), "total_steps": total_steps, "lora_r": args.lora_r,
                "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    if args.box_value_sigma > 0:  # absent otherwise, as group_by_length
        run_info["box_value_sigma"] = args.box_value_sigma
    if args.group_by_length:  # absent otherwise, so that checkpoints written before the flag existed still resume
        run_info["group_by_length"] = True
    if ckpt is not None:
        state = read_train_state(ckpt, rank, world)  # the optimizer state on rank 0 only
        changed = {k: (state["run"].get(k), run_info.get(k)) for k in run_info.keys() | state["run"].keys()
                   if state["run"].get(k) != run_info.get(k)}
        if changed:
            fail(f"cannot resume {ckpt}: settings differ from the checkpoint's (checkpoint, now): {changed}")
        load_trainable(model, ckpt, args)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = train_flops_per_token(model)
    if args.compile:
        for layer in model.llm.layers:
            layer.compile()
    value_ids = box_value_ids(tokenizer, tokenizer_path) if args.box_value_sigma > 0 else None  # checked in setup
    loss_model = CausalLMLoss(model, grad_ckpt=args.grad_ckpt, compute_dtype=dtype, box_value_ids=value_ids,
                              box_value_sigma=args.box_value_sigma).to(device)
    if world > 1:
        apply_fsdp(loss_model, world, device, dtype)
    trainable = [p for p in loss_model.parameters() if p.requires_grad]  # after fully_shard: the DTensor params
    optimizer = adamw(trainable, args, device)
    if ckpt is not None:
        if (ckpt / OPTIMIZER_DIR).is_dir():
            load_optimizer(loss_model, optimizer, ckpt / OPTIMIZER_DIR)
        else:  # a checkpoint of an older run: the whole optimizer state in train_state.pt, on rank 0
            load_optimizer_state(loss_model, optimizer, state.pop("optimizer", {}), world)
        if state.get("world_size") == world:
            set_rng_state(state["rng"][rank], device)
        else:
            torch.manual_seed(args.seed + 1000 * rank + state["step"])
    else:
        torch.manual_seed(args.seed + rank)  # dropout differs across ranks
    start_step, skipped_total, skip_totals = state["step"], state["skipped"], Counter(state["skipped_by_reason"])
    if rank == 0:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        keep_metrics(out / METRICS, start_step)
        print(f"GeoChat {args.mode}: {n_params / 1e6:.1f}M params, {n_trainable / 1e6:.2f}M trainable; "
              f"{len(dataset)} samples, {steps_per_epoch} steps/epoch, {total_steps} steps (warmup {warmup}), "
              f"global batch {args.global_batch} = {args.batch_size} x {world} ranks x {accum} accumulation; "
              f"{args.dtype} on {device}" + (f", from step {start_step}" if start_step else ""), flush=True)
    # the same policy on 1 and N processes (see the module docstring): FSDP2 has already cast the params to dtype
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    defer_sync = world > 1 and args.mode != "full"  # full: unsharded fp32 grads of the whole model would not fit
    peak = peak_flops(device) if dtype == torch.bfloat16 else None
    batches = micro_batches(dataset, args, rank, world, state["epoch"], state["step_in_epoch"], steps_per_epoch,
                            tokenizer.pad_id)
    from tqdm import tqdm

    bar = None
    metrics = {}
    loss_model.train()
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro, n_target, skips = next_global_batch(batches, accum, args, world, device, step)
            if bar is None:  # after the first batch's checks, so that an error there stays one line
                if rank == 0 and sum(skips.values()) > 0.1 * args.global_batch:
                    print(f"train.py: warning: {sum(skips.values())} of the {args.global_batch} samples of step "
                          f"{step + 1} skipped: {format_skips(skips)}", file=sys.stderr, flush=True)
                bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=rank != 0)
            lr = lr_at(step, total_steps, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, (batch, _, _) in enumerate(micro):
                if world > 1:
                    batch = with_image(batch, tokenizer.bos_id, tokenizer.pad_id, cfg.image_size)
                    if defer_sync:  # accumulate unsharded gradients; reduce-scatter once, after the last micro-batch
                        loss_model.set_requires_gradient_sync(i == len(micro) - 1)
                elif batch is None:
                    continue
                # FSDP averages gradients over ranks: scale by world so they sum, i.e. d(global sum / global count)
                loss_sum += forward_backward(loss_model, batch, world / n_target, device, autocast)
            grad_norm = optimizer_step(trainable, optimizer)
            stats = torch.tensor([float(loss_sum), sum(n_tokens(b, cfg.n_image_tokens) for b, _, _ in micro)],
                                 dtype=torch.float64)
            stats = all_reduce_sum(stats.to(device), world).cpu()
            elapsed = time.perf_counter() - t0
            skipped_total += sum(skips.values())
            skip_totals += skips
            loss = float(stats[0]) / n_target
            n_trained = args.global_batch - sum(skips.values())
            metrics = {"step": step + 1, "loss": loss, "lr": lr, "tokens": int(stats[1]),
                       "tokens_per_s": float(stats[1]) / elapsed, "samples_per_s": n_trained / elapsed,
                       "grad_norm": grad_norm, "skipped": skipped_total}
            if peak is not None:
                metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / (peak * world)
            epoch, step_in_epoch = divmod(step + 1, steps_per_epoch)
            if rank == 0:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if "mfu" in metrics:
                    postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
                bar.set_postfix(postfix)
                bar.update(1)
            if step + 1 == total_steps or (args.save_every and (step + 1) % args.save_every == 0):
                schedule = {"warmup_steps": warmup, "total_steps": total_steps, "peak_lr": args.lr,
                            "kind": "transformers-cosine-with-warmup"}
                train_state = {"step": step + 1, "epoch": epoch, "step_in_epoch": step_in_epoch,
                               "skipped": skipped_total, "skipped_by_reason": dict(skip_totals), "lr": lr,
                               "schedule": schedule, "run": run_info}
                save_checkpoint(out, model, loss_model, optimizer, args, tokenizer_path, train_state, rank, world,
                                device)
    finally:
        if bar is not None:
            bar.close()  # before any Ctrl-C message
    if rank == 0:
        print(f"done: {total_steps} steps, last loss {metrics.get('loss', float('nan')):.4f}, skipped samples "
              f"{skipped_total} ({format_skips(skip_totals)}); checkpoint in {out / CKPT}", flush=True)
    return {"step": total_steps, "loss": metrics.get("loss"), "skipped": skipped_total}


def keep_metrics(path: Path, upto_step: int):
    """Drop metrics.jsonl lines past upto_step (and lines torn by a kill), atomically: the resumed run logs them anew."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


if __name__ == "__main__":
    main()
