"""Chat with GeoChat about aerial images: every task, streamed answers, boxes drawn on the image.

    python sample.py --image x.png --task grounding --out boxes.png
    python sample.py --checkpoint DIR --image a.png --image b.png --task vqa --prompt "Is there a ship?"
    python sample.py --image x.png --task chat --interactive

The engine (gpt-fast style): a static KV cache per layer written at explicit slots, one prefill of
the whole (left-padded) batch, then one-token decode steps that can be `torch.compile`d without
graph breaks. Greedy at temperature 0, otherwise temperature / top-k / top-p sampling with a seed.
"""

import argparse
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import quant
from boxes import Box, box_polygon, parse_boxes
from geo import georef, tiling
from geochat import DTYPES, GeoChat, read_json
from synthetic.scenes import SCENE_CLASSES as BABY_SCENE_CLASSES

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "baby-geochat"
MIN_TILE = 16  # smallest --tile, in pixels
DEFAULT_TILE_BATCH = 8  # tiles per batch when --tile-batch is not given
MIN_COMPILED_CAPACITY = 256  # smallest KV cache of a compiled session; sizes double from here
DEFAULT_QUESTIONS = {"vqa": "What is in the image?", "chat": data.DESCRIBE}
NON_FINITE = -1  # the token a row gets when its logits hold NaN or Inf (checked before the stop token)


class PromptTooLong(ValueError):
    pass


class NonFiniteLogits(ValueError):
    pass


@dataclass
class Generation:
    token_ids: list  # generated ids, without the stop token
    text: str
    prefill_ms: float
    decode_tokens_per_s: float


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else a filtered random draw."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p (always the first)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_step(llm, tokens, positions, cache_pos, key_valid):
    """Logits (B, V) of one new token per row (B, 1) at rotary positions (B, 1), written at cache slot cache_pos (1,)."""
    mask = key_valid[:, None, None, :]  # (B, 1, 1, S): every filled slot of the row
    return llm(llm.embed_tokens(tokens), positions, mask, cache_pos)[:, -1]


class Session:
    """A batch of conversations sharing a static KV cache: prefill blocks of embeddings, then decode token by token."""

    def __init__(self, model: GeoChat, batch_size: int, capacity: int, compiled_step=None, live_rows=None):
        self.model, self.llm = model, model.llm
        self.capacity = capacity
        self.live_rows = batch_size if live_rows is None else live_rows  # rows past these only pad the batch
        device = model.llm.embed_tokens.weight.device
        self.llm.setup_cache(batch_size, capacity)  # reuses the model's cache when it is big enough
        self.key_valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, S) filled slots
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) rotary position
        self.length = 0  # slots used
        self.slots = torch.arange(capacity, device=device)  # cache_pos views, not a new tensor per step
        self.step_fn = compiled_step or decode_step
        self.static_shapes = compiled_step is not None
        self.decode_calls = 0
        self.first_decode_end = None  # perf_counter() after the first decode step (which compiles, if compiled)

    def prefill(self, embeds, attention_mask):
        """Append embeddings (B, T, D) with padding mask (B, T); return the logits (B, V) after the last one."""
        T = embeds.shape[1]
        if self.length + T > self.capacity:
            raise PromptTooLong(f"the conversation needs {self.length + T} positions but the context holds {self.capacity}")
        start, end = self.length, self.length + T
        slots = self.slots[:end]
        self.key_valid[:, start:end] = attention_mask
        positions = self.next_position[:, None] + attention_mask.long().cumsum(-1) - 1  # (B, T)
        if start == 0 and bool(attention_mask.all()):
            mask = None  # nothing to hide: plain causal attention, which skips the masked half of the work
        else:
            causal = slots[None, :] <= slots[start:end, None]  # (T, end)
            mask = self.key_valid[:, None, None, :end] & causal  # (B, 1, T, end)
            mask = mask | (slots[None, :] == slots[start:end, None])  # a padding row sees itself: no NaN
        logits = self.llm(embeds, positions.clamp_min(0), mask, slots[start:end], last_only=True)[:, -1]
        self.next_position += attention_mask.long().sum(-1)
        self.length = end
        return logits

    def undo_decode(self):
        """Forget the last token decode() fed: its slot counts as empty again and is overwritten by the next one."""
        self.length -= 1
        self.key_valid[:, self.length] = False
        self.next_position -= 1

    def decode(self, tokens):
        """Feed one token per row (B,); return the next logits (B, V)."""
        if self.length >= self.capacity:
            raise PromptTooLong(f"the conversation reached the context of {self.capacity} positions")
        slot = self.length
        self.key_valid[:, slot] = True
        key_valid = self.key_valid if self.static_shapes else self.key_valid[:, : slot + 1]
        logits = self.step_fn(self.llm, tokens[:, None], self.next_position[:, None], self.slots[slot: slot + 1], key_valid)
        self.next_position += 1
        self.length += 1
        self.decode_calls += 1
        if self.decode_calls == 1:
            self.first_decode_end = time.perf_counter()
        return logits


class Engine:
    """Greedy or sampled generation for a loaded GeoChat and its tokenizer."""

    def __init__(self, model: GeoChat, tokenizer: data.Tokenizer, compile: bool = False, decode_ahead=None):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.llm.embed_tokens.weight.device
        # Decode ahead: queue step t+1 on the GPU before the host reads step t's tokens (to stop at </s>), so the GPU
        # never waits for the host; a step queued past the end is undone. Default on CUDA, where kernels run
        # asynchronously; on CPU nothing overlaps and the extra step would only cost time.
        self.decode_ahead = self.device.type == "cuda" if decode_ahead is None else decode_ahead
        self.context = model.cfg.llm.max_seq_len
        self.compiled_step = None
        if compile:
            # The step costs microseconds of arithmetic and many launches: CUDA graphs remove the launch
            # overhead on GPU; on CPU a C++ wrapper around the generated kernels removes the Python one.
            # On GPU also gpt-fast's coordinate-descent tuning of the generated kernels (decode is weight-reading
            # reductions, whose default launch configs leave bandwidth unused).
            how = {"cuda": dict(options={"triton.cudagraphs": True, "coordinate_descent_tuning": True}),
                   "cpu": dict(options={"cpp_wrapper": True})}.get(self.device.type, {})
            self.compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=False, **how)

    def prompt_ids(self, user_text: str) -> list:
        """Token ids of a one-question llava_v1 prompt (user_text holds "<image>\n" where the image goes)."""
        return self.tokenizer.encode_prompt(data.build_prompt([(user_text, None)], "llava_v1"))

    def embed_prompts(self, prompts_ids, images):
        """Left-pad token lists into (B, T), splice images in: embeds (B, L, D) and mask (B, L)."""
        T = max(len(p) for p in prompts_ids)
        ids = torch.full((len(prompts_ids), T), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts_ids), T, dtype=torch.bool)
        for b, p in enumerate(prompts_ids):
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = True
        imgs = None if images is None else images.to(self.device)
        embeds, mask, _ = self.model.embed_inputs(ids.to(self.device), imgs, mask.to(self.device), padding_side="left")
        return embeds, mask

    def new_session(self, batch_size, prompt_length, max_new_tokens, live_rows=None):
        """A session sized for the prompt and the token budget (rounded up to a power of two when compiled)."""
        if prompt_length >= self.context:
            raise PromptTooLong(f"the prompt is {prompt_length} tokens (image tokens included) but the context holds {self.context}")
        capacity = prompt_length + max_new_tokens
        if self.compiled_step is not None:  # the compiled step attends over the whole cache: few sizes, few graphs
            capacity = max(MIN_COMPILED_CAPACITY, 1 << (capacity - 1).bit_length())
        return Session(self.model, batch_size, min(self.context, capacity), self.compiled_step, live_rows)

    def batch_rows(self, n: int) -> int:
        """Rows a batch of n prompts runs with: n eager; compiled, n rounded up to a power of two (one graph each)."""
        return n if self.compiled_step is None else 1 << (n - 1).bit_length()

    @torch.inference_mode()
    def continue_generation(self, session, logits, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                            seed=None, on_token=None):
        """Decode up to max_new_tokens per row after `logits`; stop rows at </s>. Returns ids per row (no stop token)."""
        generator = None
        if temperature > 0:  # without a seed a fresh one: torch.seed() would reseed the global generators too
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else secrets.randbits(64))
        B = logits.shape[0]
        eos = self.tokenizer.eos_id
        done = [b >= session.live_rows for b in range(B)]  # rows that produced </s> (or pad the batch), on the host
        finished = torch.tensor(done, device=self.device) if any(done) else None  # the same as a (B,) bool tensor
        # what a finished row feeds: </s> after its answer; the pad id in a row that only pads the batch
        filler = torch.tensor([eos if b < session.live_rows else self.tokenizer.pad_id for b in range(B)],
                              device=self.device)
        out = [[] for _ in range(B)]
        ids = [eos] * B
        budget = min(max_new_tokens, session.capacity - session.length)
        for step in range(budget):
            finite = torch.isfinite(logits).all(-1)  # (B,): checked on the host with the tokens, no extra sync
            if temperature > 0:  # multinomial refuses NaN (on CUDA with a device-side assert)
                logits = logits.where(finite[:, None], 0.0)
            tokens = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(~finite, NON_FINITE)
            if finished is not None:
                tokens = torch.where(finished, filler, tokens)
            ahead = self.decode_ahead and step < budget - 1
            if ahead:  # the tokens fed are the same whatever the host finds below: queue the next step now
                host_tokens = tokens.to("cpu", non_blocking=True)  # copied before the next step runs, not after it
                copied = torch.cuda.Event() if tokens.is_cuda else None
                if copied is not None:
                    copied.record()
                next_logits = session.decode(tokens.clamp_min(0))  # a NON_FINITE row feeds a valid id: undone below
                if copied is not None:
                    copied.synchronize()  # waits for this step's tokens only, not for the step queued after them
                ids = host_tokens.tolist()
            else:
                ids = tokens.tolist()
            stopped = False
            for b, t in enumerate(ids):
                if done[b]:
                    continue
                if t == NON_FINITE:
                    if ahead:
                        session.undo_decode()
                    where = "after the prompt" if step == 0 else f"at step {step + 1} of the answer"
                    raise NonFiniteLogits(f"the model's logits are NaN or infinite {where} "
                                          "(broken weights, or an overflow: try --dtype float32)")
                if t == eos:
                    done[b] = stopped = True
                else:
                    out[b].append(t)
                    if on_token is not None:
                        on_token(b, t)
            if all(done) or step == budget - 1:
                if ahead:  # every row stopped: the queued step fed tokens past the answers
                    session.undo_decode()
                break
            if stopped:
                finished = torch.tensor(done, device=self.device)
            logits = next_logits if ahead else session.decode(tokens)
        # the last sampled token of a row stopped by the budget was never fed: a next turn must feed it first
        session.unfed = [[] if t == eos else [t] for t in ids]
        return out

    @torch.inference_mode()
    def generate(self, prompts_ids, images=None, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
                 seed=None, on_token=None) -> list:
        """Answer a batch of tokenised prompts (each holding one IMAGE_TOKEN_ID per image)."""
        t0 = time.perf_counter()
        embeds, mask = self.embed_prompts(prompts_ids, images)  # (n, L, D), (n, L)
        n, rows = len(prompts_ids), self.batch_rows(len(prompts_ids))
        if rows > n:  # rows of padding only (zero embeddings, all masked): they see themselves, their tokens are dropped
            embeds = torch.cat([embeds, embeds.new_zeros(rows - n, *embeds.shape[1:])])  # (rows, L, D)
            mask = torch.cat([mask, mask.new_zeros(rows - n, mask.shape[1])])  # (rows, L)
        session = self.new_session(rows, embeds.shape[1], max_new_tokens, live_rows=n)
        logits = session.prefill(embeds, mask)
        self._sync()
        t1 = time.perf_counter()
        ids = self.continue_generation(session, logits, max_new_tokens, temperature, top_k, top_p, seed, on_token)[:n]
        self._sync()
        t2 = time.perf_counter()
        if session.decode_calls >= 2:  # steady state: leave out the first step, where --compile builds its graph
            rate = (session.decode_calls - 1) / (t2 - session.first_decode_end)
        else:
            steps = max(len(r) for r in ids)
            rate = steps / (t2 - t1) if steps and t2 > t1 else 0.0
        return [Generation(r, self.tokenizer.decode(r), (t1 - t0) * 1000, rate) for r in ids]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Boxes on the image.

PALETTE = ["#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55"]


def box_record(box, polygon) -> dict:
    """One box as a dict: label, x1, y1, x2, y2, angle (0-100 grid) and the polygon in original pixels."""
    return {"label": box.label, "x1": box.x1, "y1": box.y1, "x2": box.x2, "y2": box.y2, "angle": box.angle,
            "polygon": [[round(x, 2), round(y, 2)] for x, y in polygon]}


def box_records(answer: str, width: int, height: int) -> list:
    """The answer's boxes as dicts (box_record) for a width x height image."""
    return [box_record(b, box_polygon(b, width, height)) for b in parse_boxes(answer)]


def scene_records(scene) -> list:
    """A tiled scene's merged boxes (geo.tiling.SceneAnswer) as dicts (box_record), grid values to 2 decimals."""
    out = []
    for found in scene.boxes:
        b = found.box
        rounded = Box(*(round(v, 2) for v in (b.x1, b.y1, b.x2, b.y2, b.angle)), b.label)
        out.append(box_record(rounded, found.polygon))
    return out


MIN_DISPLAY_SHORT_SIDE = 512  # smaller images are upscaled before drawing, so labels and lines are legible
MAX_DISPLAY_LONG_SIDE = 2048  # larger images (whole scenes) are downscaled for display
LABEL_MIN_PX, LABEL_MAX_PX = 12, 20  # label text height: 1/32 of the short side within these (whole scenes: small labels)


def display_scale(width: int, height: int) -> float:
    """The factor draw_boxes resizes a width x height image by: up to a 512-px short side, down to a 2048-px long side."""
    return min(max(1.0, MIN_DISPLAY_SHORT_SIDE / min(width, height)), MAX_DISPLAY_LONG_SIDE / max(width, height))


def label_origin(anchor, text_size, image_size, gap=2):
    """Top-left corner of a label box of text_size just above anchor (below it when there is no room), inside the image."""
    (x, y), (text_w, text_h), (width, height) = anchor, text_size, image_size
    top = y - gap - text_h if y - gap - text_h >= 0 else y + gap
    return min(max(0, x), max(0, width - text_w)), min(max(0, top), max(0, height - text_h))


def place_label(origin, text_size, image_size, taken: list):
    """origin moved down or up by whole label heights, nearest first, to the first spot inside the image where the label
    overlaps none of the `taken` (left, top, right, bottom) rectangles; origin itself when there is none."""
    (x, y), (text_w, text_h), height = origin, text_size, image_size[1]

    def free(top):
        return all(top + text_h <= t or top >= b or x + text_w <= l or x >= r for l, t, r, b in taken)

    for k in range(height // (text_h + 1) + 1):
        for top in (y + k * (text_h + 1), y - k * (text_h + 1)):
            if 0 <= top <= height - text_h and free(top):
                return x, top
    return x, y


def draw_boxes(image, boxes: list):
    """A copy of the image, resized for display (display_scale), with each rotated box and its label drawn on it."""
    canvas = image.convert("RGB")
    scale = display_scale(*canvas.size)
    if scale != 1.0:
        size = (max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale)))
        canvas = canvas.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    thickness = max(2, round(max(canvas.size) / 400))
    font = ImageFont.load_default(size=min(LABEL_MAX_PX, max(LABEL_MIN_PX, round(min(canvas.size) / 32))))
    pad = max(1, thickness // 2)
    colours, taken = {}, []  # taken: the label rectangles drawn so far, which later labels must not cover
    for box in boxes:
        colour = colours.setdefault(box["label"], PALETTE[len(colours) % len(PALETTE)])
        points = [(x * scale, y * scale) for x, y in box["polygon"]]
        draw.line(points + points[:1], fill=colour, width=thickness, joint="curve")
        if box["label"]:
            left, top, right, bottom = draw.textbbox((0, 0), box["label"], font=font)
            text_size = (right - left + 2 * pad, bottom - top + 2 * pad)
            x, y = label_origin(min(points, key=lambda p: (p[1], p[0])), text_size, canvas.size)
            x, y = place_label((x, y), text_size, canvas.size, taken)
            taken.append((x, y, x + text_size[0], y + text_size[1]))
            draw.rectangle((x, y, x + text_size[0] - 1, y + text_size[1] - 1), fill=colour)
            draw.text((x + pad - left, y + pad - top), box["label"], fill="black", font=font)
    return canvas


# ---------------------------------------------------------------------------------------------
# Command line.

BOX_OPTION_RE = re.compile(r"\{<(-?\d+)><(-?\d+)><(-?\d+)><(-?\d+)>(?:\|<(-?\d+)>)?\}")  # integers; |<θ> optional
TASK_OPTIONS = {"--prompt": ("grounding", "refer", "vqa", "caption", "chat"), "--box": ("identify",), "--classes": ("scene",)}


def pick_device(name: str) -> torch.device:
    """The device for --device (auto: cuda, then mps, then cpu); ValueError for one this machine lacks."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not mps:
        raise ValueError("--device mps: no MPS device is available (it needs Apple silicon and a torch built with MPS)")
    return torch.device(name)


def default_dtype(device: torch.device) -> str:
    """bfloat16 on CUDA, float16 on MPS, float32 on CPU."""
    return {"cuda": "bfloat16", "mps": "float16"}.get(device.type, "float32")


def load(checkpoint, device, dtype, lora=None, compile=False, vision_tower=None, quantize=None) -> Engine:
    """Model (+ merged LoRA adapter, then int8 / int4 weights with quantize) and tokenizer from a checkpoint directory, as an Engine."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} not found")
    config = read_json(checkpoint / "config.json")  # one line for a missing, broken or non-object config.json, before the tokenizer
    stored = config["quantization"].get("mode") if isinstance(config.get("quantization"), dict) else None  # checked at loading
    if stored is not None and lora is not None:
        raise ValueError(f"--lora: {checkpoint} is quantised ({stored}) and an adapter cannot be merged into its weights; "
                         f"use the float checkpoint with --lora and --quantize {stored}")
    if stored is not None and quantize not in (None, stored):
        raise ValueError(f"--quantize {quantize}: {checkpoint} is already quantised as {stored}; use its float checkpoint")
    if quantize is not None and quantize not in quant.QUANT_MODES:
        raise ValueError(f"--quantize {quantize!r}: expected one of {', '.join(quant.QUANT_MODES)}")
    tokenizer = data.Tokenizer(checkpoint / "tokenizer.model")
    model = GeoChat.from_pretrained(checkpoint, dtype=dtype, device=device, vision_tower=vision_tower)
    if lora is not None:  # merged into the base weights (computed in float32): no per-token LoRA cost
        import lora as lora_lib

        lora_lib.load_adapter(model, lora)
        lora_lib.merge_lora(model)
    if quantize is not None and stored is None:  # after the merge: the adapter is quantised with its base weights
        quant.quantize_model(model, quantize)
    if quant.prefill_dtype(dtype, device) != dtype:  # bf16 / fp16 storage on a CPU whose bf16 GEMMs are slow
        quant.use_float32_prefill(model)
    if tokenizer.vocab_size > model.cfg.llm.vocab_size:
        raise ValueError(f"{checkpoint}: tokenizer has {tokenizer.vocab_size} tokens, the model only {model.cfg.llm.vocab_size}")
    return Engine(model, tokenizer, compile=compile)


def check_args(args):
    """Refuse option values and combinations that cannot work (ValueError), before anything is loaded."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed)):
        if value is not None and args.temperature == 0:
            raise ValueError(f"{flag} only applies when sampling: add --temperature above 0")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.interactive and len(args.image) > 1:
        raise ValueError("--interactive chats about one image: give --image once")
    if args.interactive and args.json:
        raise ValueError("--interactive does not support --json: it streams text")
    if args.interactive and args.geojson:
        raise ValueError("--interactive does not support --geojson: export the boxes of a single answer instead")
    for flag, tasks in TASK_OPTIONS.items():
        if getattr(args, flag[2:]) is not None and args.task not in tasks:
            raise ValueError(f"--task {args.task} does not use {flag} (only --task {', '.join(tasks)})")
    if args.out is not None:
        check_out(args.out, args.image)
    check_tiling(args)
    if args.geojson is not None:
        check_geojson(args.geojson, args.image)


def check_tiling(args):
    """Refuse bad --tile / --overlap / --tile-batch values and combinations (ValueError)."""
    if args.tile is None:
        for flag, value in (("--overlap", args.overlap), ("--tile-batch", args.tile_batch)):
            if value is not None:
                raise ValueError(f"{flag} only applies to tiled scenes: add --tile N")
        return
    if args.tile < MIN_TILE:
        raise ValueError(f"--tile must be at least {MIN_TILE} pixels, got {args.tile}")
    if args.task not in tiling.TILED_TASKS:
        raise ValueError(f"--tile merges boxes: it works with --task {' or '.join(tiling.TILED_TASKS)}, not {args.task}")
    if args.interactive:
        raise ValueError("--interactive chats about one view: it does not take --tile")
    overlap = tile_overlap(args)
    if not 0 <= overlap <= args.tile // 2:
        raise ValueError(f"--overlap must be in [0, {args.tile // 2}] pixels (at most half of --tile {args.tile}), got {overlap}")
    if args.tile_batch is not None and args.tile_batch < 1:
        raise ValueError(f"--tile-batch must be >= 1, got {args.tile_batch}")


def tile_overlap(args) -> int:
    """--overlap, or a quarter of --tile when it is not given."""
    return args.overlap if args.overlap is not None else args.tile // 4


def check_output_folder(flag: str, path: Path):
    """Refuse an output file whose folder is missing, not a folder or not writable (ValueError)."""
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"{flag} {path}: directory {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: directory {folder} is not writable")


def check_geojson(geojson: Path, images: list):
    """Refuse a --geojson that is not a .geojson/.json name, cannot be written or already exists (never overwritten)."""
    if geojson.suffix.lower() not in (".geojson", ".json"):
        raise ValueError(f"--geojson {geojson}: the name needs the extension .geojson (or .json)")
    check_output_folder("--geojson", geojson)
    for i in range(len(images)):
        path = out_path(geojson, i, len(images))
        if path.exists() or path.is_symlink():
            raise ValueError(f"--geojson {path} already exists: it is never overwritten (remove it or choose another name)")


def check_out(out: Path, images: list):
    """Refuse an --out that cannot be written or that would overwrite one of the --image files (ValueError)."""
    if not out.suffix:
        raise ValueError(f"--out {out}: the name needs an image extension such as .png")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--out {out}: unknown image format {out.suffix!r} (try .png or .jpg)")
    check_output_folder("--out", out)
    for i in range(len(images)):
        path = out_path(out, i, len(images))
        if path.is_dir():
            raise ValueError(f"--out {path} is a directory")
        for image in images:
            if path.exists() and image.exists() and path.samefile(image):
                raise ValueError(f"--out {path} is the input image {image}: it would be overwritten")


def check_box(text: str) -> str:
    """--box stripped, if it is one '{<x1><y1><x2><y2>|<θ>}' of integers: x1 <= x2, y1 <= y2 in 0-100, θ in [-360, 360]."""
    box = text.strip()
    match = BOX_OPTION_RE.fullmatch(box)
    if match is None:
        raise ValueError(f"malformed --box {text!r}: expected one '{{<x1><y1><x2><y2>|<θ>}}' of integers (|<θ> may be left out)")
    x1, y1, x2, y2, angle = (int(v or 0) for v in match.groups())
    if not all(0 <= v <= 100 for v in (x1, y1, x2, y2)):
        raise ValueError(f"--box {text!r}: the corners must lie on the 0-100 grid")
    if x1 > x2 or y1 > y2:
        raise ValueError(f"--box {text!r}: needs x1 <= x2 and y1 <= y2 (the corners before the rotation)")
    if not -360 <= angle <= 360:
        raise ValueError(f"--box {text!r}: the angle must be in [-360, 360] degrees")
    return box


def scene_classes(args) -> list:
    """--classes as a list of names, or the Baby GeoChat's classes when it is the checkpoint."""
    if args.classes is not None:
        classes = [name.strip() for name in args.classes.split(",") if name.strip()]
        if not classes:
            raise ValueError(f"--classes {args.classes!r} names no class: expected 'a, b, c'")
        return classes
    if args.checkpoint.resolve() == DEFAULT_CHECKPOINT:
        return list(BABY_SCENE_CLASSES)
    raise ValueError("--task scene needs --classes 'a, b, c' (only the shipped Baby GeoChat has default classes)")


def user_text(args) -> str:
    """The first user message for --task (the task prompts GeoChat was tuned on, data.task_prompt), with the <image> placeholder."""
    if args.task == "identify":
        if args.box is None:
            raise ValueError("--task identify needs --box '{<x1><y1><x2><y2>|<θ>}'")
        text = data.task_prompt("identify", box=check_box(args.box))
    elif args.task == "refer":
        if not args.prompt:
            raise ValueError("--task refer needs --prompt 'the object to locate'")
        text = data.task_prompt("refer", expression=args.prompt)
    elif args.task == "scene":
        text = data.task_prompt("scene", classes=scene_classes(args))
    else:
        text = data.task_prompt(args.task, question=args.prompt or DEFAULT_QUESTIONS.get(args.task))
    return data.IMAGE_PLACEHOLDER + "\n" + text


def parse_args(argv=None):
    """The command line's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="model directory, any layout GeoChat.from_pretrained reads (the default: the shipped Baby GeoChat)")
    p.add_argument("--image", type=Path, action="append", required=True, help="image file; repeat for a batch")
    p.add_argument("--task", choices=data.TASKS, default="grounding", help="what to ask: GeoChat's task prompts (README)")
    p.add_argument("--prompt", help="the question (grounding, vqa, caption, chat) or the object to locate (refer); "
                                    "None: the task's default question")
    p.add_argument("--box", help="the region for --task identify: '{<x1><y1><x2><y2>|<θ>}', integers on the 0-100 grid, "
                                 "x1 <= x2, y1 <= y2, θ in [-360, 360] degrees (|<θ> may be left out)")
    p.add_argument("--classes", help="comma-separated classes for --task scene; None: the shipped Baby GeoChat's "
                                     "four (that checkpoint only)")
    p.add_argument("--lora", type=Path, help="adapter directory written by train.py, merged into the weights")
    p.add_argument("--vision-tower", type=Path, help="CLIP directory, for a release checkpoint without the tower's weights")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling at this temperature")
    p.add_argument("--top-p", type=float, default=None, help="sampling: keep the likeliest tokens holding this much "
                                                             "probability, in (0, 1]; None: all")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the k likeliest tokens; None: all")
    p.add_argument("--seed", type=int, default=None, help="sampling: seed for repeatable answers; None: a fresh one")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="None: bfloat16 on CUDA, float16 on MPS, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--quantize", choices=quant.QUANT_MODES, default=None,
                   help="weight-only int8 (per channel) or int4 (groups of 128) decoder linears and lm_head, after "
                        "--lora is merged; None: the checkpoint's own weights (README: Quantised inference)")
    p.add_argument("--out", type=Path, help="image file with the answer's boxes drawn (index appended for several "
                                            "images); never one of the --image files")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer instead of streaming text")
    p.add_argument("--tile", type=int, help="whole scenes: answer on overlapping N-pixel tiles, map the boxes to the "
                                            "scene and merge duplicates (grounding and refer); None: one view of the image")
    p.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles, at most N/2; None: a quarter of --tile")
    p.add_argument("--tile-batch", type=int, help="tiles answered per left-padded batch; None: 8")
    p.add_argument("--geojson", type=Path, help="new GeoJSON file with every box as a polygon (label, task): map "
                                                "coordinates when the image has a world file or GeoTIFF tags, else pixels "
                                                "(index appended for several images); an existing file is never overwritten")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat about one image (Ctrl-D or 'exit' ends it)")
    return p.parse_args(argv)


def out_path(out: Path, index: int, count: int) -> Path:
    """--out for image `index` of `count`."""
    return out if count == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")


def run(args):
    """Check the arguments, load, answer every image (whole, or tile by tile), print the answers, then draw and export the boxes."""
    check_args(args)
    first_text = user_text(args)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or default_dtype(device)]
    references = [georef.georeference(p) for p in args.image] if args.geojson else None  # a bad world file fails here
    pil_images = [tiling.load_scene(p) if args.tile else data.load_image(p) for p in args.image]
    engine = load(args.checkpoint, device, dtype, args.lora, args.compile, args.vision_tower, args.quantize)
    if args.tile:
        boxes = answer_scenes(engine, args, first_text, pil_images)
    else:
        boxes = answer_images(engine, args, first_text, pil_images)
        if boxes is None:  # --interactive: the chat drew its own boxes
            return
    write_outputs(args, pil_images, boxes, references)


def answer_images(engine, args, first_text, pil_images) -> list | None:
    """One view per image, as one batch (streamed when alone): print the answers, return their box records (None: interactive)."""
    size = engine.model.cfg.image_size
    images = torch.stack([data.preprocess_image(im, size) for im in pil_images])
    if args.interactive:
        return interactive(engine, args, first_text, pil_images[0], images[:1])
    prompt = engine.prompt_ids(first_text)
    stream = not args.json and len(pil_images) == 1
    printer = StreamPrinter(engine.tokenizer) if stream else None
    results = engine.generate([prompt] * len(pil_images), images, args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, args.seed, on_token=printer.on_token if printer else None)
    if printer:
        printer.finish()
    boxes = [box_records(res.text, *im.size) for res, im in zip(results, pil_images)]
    for res, path, image_boxes in zip(results, args.image, boxes):
        if args.json:
            print(json.dumps({"image": str(path), "answer": res.text, "boxes": image_boxes, "token_ids": res.token_ids,
                              "prefill_ms": round(res.prefill_ms, 2), "decode_tokens_per_s": round(res.decode_tokens_per_s, 2)}))
        elif not stream:
            print(f"[{path}] {res.text}")
    return boxes


def answer_scenes(engine, args, first_text, pil_images) -> list:
    """Each image as a tiled scene (geo.tiling): print its one merged answer, return its box records."""
    answer_tiles = tiling.engine_answerer(engine, first_text, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                          args.seed)
    label = args.prompt if args.task == "refer" else None
    boxes = []
    for path, image in zip(args.image, pil_images):
        scene = tiling.tiled_answer(answer_tiles, image, args.tile, tile_overlap(args), args.task,
                                    args.tile_batch or DEFAULT_TILE_BATCH, label=label)
        records = scene_records(scene)
        boxes.append(records)
        if args.json:
            print(json.dumps({"image": str(path), "answer": scene.text, "boxes": records, "tiles": scene.tiles,
                              "boxes_before_merge": scene.raw_boxes}))
        else:
            print(scene.text if len(pil_images) == 1 else f"[{path}] {scene.text}")
    return boxes


def write_outputs(args, pil_images, boxes, references):
    """--out: the boxes drawn on each image; --geojson: each image's boxes as GeoJSON polygons."""
    if args.geojson:
        for i, (path, image_boxes, reference) in enumerate(zip(args.image, boxes, references)):
            collection = georef.feature_collection(image_boxes, args.task, reference, image=str(path))
            georef.write_geojson(out_path(args.geojson, i, len(args.image)), collection)
    if args.out:
        unwritten = []
        for i, (im, image_boxes) in enumerate(zip(pil_images, boxes)):
            path = out_path(args.out, i, len(pil_images))
            try:
                draw_boxes(im, image_boxes).save(path)
            except OSError as e:
                unwritten.append(f"{path} ({e})")
        if unwritten:
            raise OSError(f"--out: could not write {', '.join(unwritten)}")


class StreamPrinter:
    """Prints a row's text as its tokens arrive; a character whose byte pieces are still arriving waits for the last one."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def on_token(self, row, token):
        """Print what `token` adds (the whole answer is decoded, so pieces join as in the final text)."""
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))  # an unfinished UTF-8 character decodes to U+FFFD

    def finish(self):
        """Print the rest (bytes that never made a character show as U+FFFD, as in the final text) and a newline."""
        self._show(self.tokenizer.decode(self.ids))
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.ids, self.shown = [], ""

    def _show(self, text):
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def read_turn(tokenizer, session) -> list | None:
    """The next question's ids for the kept cache, asked until one fits; None when the user ends the chat."""
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:  # Ctrl-D: the shell's prompt goes on a new line
            sys.stdout.write("\n")
            return None
        if question in ("exit", "quit"):
            return None
        if not question:
            continue
        # what the reference's template adds after an answer: "</s>USER: {question} ASSISTANT:"
        ids = session.unfed[0] + [tokenizer.eos_id] + tokenizer.encode(f"USER: {question} ASSISTANT:", continuation=True)
        left = session.capacity - session.length
        if len(ids) < left:  # room for the turn and at least one answer token
            return ids
        print(f"that turn does not fit: it needs {len(ids)} positions and an answer, {left} of the context's "
              f"{session.capacity} are left; ask something shorter, or start a new chat", file=sys.stderr)


def interactive(engine: Engine, args, first_text, pil_image, image):
    """Multi-turn chat about one image; the KV cache is kept between turns and a turn that does not fit is refused."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    tok = engine.tokenizer
    printer = StreamPrinter(tok)
    embeds, mask = engine.embed_prompts([engine.prompt_ids(first_text)], image)
    session = engine.new_session(1, embeds.shape[1], engine.context)  # the whole context: later turns add to it
    sys.stdout.write(f"USER: {first_text.split(chr(10), 1)[-1]}\n")
    while True:
        with torch.inference_mode():
            logits = session.prefill(embeds, mask)
        sys.stdout.write("ASSISTANT: ")
        answer = engine.continue_generation(session, logits, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                            args.seed, printer.on_token)[0]
        printer.finish()
        if args.out:
            try:
                draw_boxes(pil_image, box_records(tok.decode(answer), *pil_image.size)).save(args.out)
            except OSError as e:  # the chat goes on
                print(f"error: --out: could not write {args.out} ({e})", file=sys.stderr)
        ids = read_turn(tok, session)
        if ids is None:
            return
        embeds, mask = engine.embed_prompts([ids], None)


def main(argv=None):
    """CLI entry point: bad input is one line on stderr and exit code 2, Ctrl-C exits cleanly with 130."""
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
