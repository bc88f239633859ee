"""GeoChat data: images, tokenizer, prompts, boxes and the instruction-tuning dataset.

Everything the model sees before the first matmul lives here, written to reproduce the
reference (LLaVA-1.5 / GeoChat) byte for byte where it is right:

- images are padded to a square with the CLIP mean colour, resized to 504 with PIL bicubic
  and normalised with the CLIP mean/std (the reference's `expand2square` + CLIPImageProcessor);
- text is tokenised like the reference's slow, legacy-mode HF LlamaTokenizer: the literal
  special-token strings split the text, every remaining piece is encoded by SentencePiece on
  its own (so every piece gets the dummy-prefix "▁");
- prompts follow the `llava_v1` (inference) and `vicuna_v1` (training) templates;
- boxes are `{<x1><y1><x2><y2>|<θ>}` on a 0-100 grid over the padded square image;
- training labels keep each assistant answer and its "</s>", computed on the very tokens of
  the full prompt (no "tokenization mismatch" that silently masks whole samples).
"""

import argparse
import json
import math
import os
import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_TOKEN_ID = -200  # placeholder id spliced out for the image features
IGNORE_INDEX = -100  # label value that the loss ignores
IMAGE_PLACEHOLDER = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), the reference's background

# -----------------------------------------------------------------------------
# images


def _to_rgb(img):
    """Convert any PIL image to RGB the way the reference does (`img.convert("RGB")`)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # PIL clamps 16-bit values to 255 (an all-white image); scale 0..65535 to 0..255 instead
        pixels = np.asarray(img, dtype=np.float64) / 257.0  # (H, W)
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # same colours as P -> RGB, without PIL's transparency warning
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {img.mode!r} ({e})") from None


def load_image(path):
    """Load an image file fully decoded as RGB; FileNotFoundError / ValueError on bad files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now: truncated files fail here, not later
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path}: truncated or corrupt image ({e})") from None


def pad_to_square(img):
    """Pad to a square of side max(W, H) with the CLIP mean colour, image centred (reference expand2square)."""
    img = _to_rgb(img)
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new("RGB", (side, side), PAD_COLOR)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(img, size=504):
    """PIL image (any mode) -> normalised (3, size, size) float32 tensor: pad, bicubic resize, CLIP norm."""
    img = pad_to_square(img).resize((size, size), Image.BICUBIC)  # centre crop to size is a no-op
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # (size, size, 3)
    pixels = pixels.permute(2, 0, 1)  # (3, size, size)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """SentencePiece tokenizer behaving like the reference's slow legacy HF LlamaTokenizer."""

    def __init__(self, model_path):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such SentencePiece tokenizer file")
        self.model_path = str(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id  # LLaVA pads with <unk>
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the SentencePiece model has no BOS or no EOS piece")
        # literal strings the slow HF tokenizer never splits: they map straight to their ids
        self.special_ids = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in alternatives))

    def _split_special(self, text):
        """Yield (start, end, special_id or None) spans covering text; empty text spans are dropped."""
        position = 0
        for match in self._special_re.finditer(text):
            if match.start() > position:
                yield position, match.start(), None
            yield match.start(), match.end(), self.special_ids[match.group()]
            position = match.end()
        if position < len(text):
            yield position, len(text), None

    def encode(self, text, bos=False):
        """Text -> ids; "<s>"/"</s>" in the text become BOS/EOS, each other piece gets SentencePiece's dummy prefix."""
        ids = [self.bos_id] if bos else []
        for start, end, special_id in self._split_special(text):
            ids.extend([special_id] if special_id is not None else self.sp.encode(text[start:end]))
        return ids

    def encode_prompt(self, prompt):
        """The reference's tokenizer_image_token: BOS, chunks split on "<image>", IMAGE_TOKEN_ID between them."""
        ids = [self.bos_id]
        for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids.append(IMAGE_TOKEN_ID)
            ids.extend(self.encode(chunk))
        return ids

    def decode(self, ids):
        """Ids -> text, skipping special tokens and ids outside the vocabulary (a model's padded embedding rows)."""
        skip = set(self.special_ids.values()) | {self.pad_id}
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in skip])

    def token_to_piece(self, token_id):
        """The SentencePiece piece of one id, e.g. "▁the" or "<0x0A>"."""
        return self.sp.id_to_piece(int(token_id))


# -----------------------------------------------------------------------------
# prompts

SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {"llava_v1": SYSTEM_LLAVA_V1, "vicuna_v1": SYSTEM_VICUNA_V1}
USER_ROLE, ASSISTANT_ROLE = "USER", "ASSISTANT"
USER_SEP, ASSISTANT_SEP = " ", "</s>"  # the reference's sep / sep2 of SeparatorStyle.TWO


def _build_prompt_and_spans(turns, template):
    """Prompt text plus the (start, end) character spans of each " " + assistant answer + "</s>"."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; expected one of {sorted(TEMPLATES)}")
    turns = list(turns)
    if not turns:
        raise ValueError("a prompt needs at least one (user, assistant) turn")
    prompt, spans = TEMPLATES[template] + USER_SEP, []
    for i, turn in enumerate(turns):
        if isinstance(turn, str) or len(turn) != 2:
            raise ValueError(f"turn {i}: expected a (user_text, assistant_text_or_None) pair, got {turn!r}")
        user, assistant = turn
        if not isinstance(user, str) or not user:
            raise ValueError(f"turn {i}: the user text must be a non-empty string, got {user!r}")
        prompt += f"{USER_ROLE}: {user}{USER_SEP}"
        if assistant is None or assistant == "":  # the reference writes the bare role for an empty message
            if i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last turn may have no assistant answer")
            prompt += f"{ASSISTANT_ROLE}:"
        elif isinstance(assistant, str):
            prompt += f"{ASSISTANT_ROLE}:"
            answer = " " + assistant + ASSISTANT_SEP  # the space is the answer's: the prompt ends at "ASSISTANT:"
            spans.append((len(prompt), len(prompt) + len(answer)))
            prompt += answer
        else:
            raise ValueError(f"turn {i}: the assistant text must be a string or None, got {assistant!r}")
    return prompt, spans


def build_prompt(turns, template="llava_v1"):
    """[(user, assistant or None), ...] -> the reference's conv.get_prompt() text (SeparatorStyle.TWO)."""
    return _build_prompt_and_spans(turns, template)[0]


TASKS = ("grounding", "refer", "identify", "vqa", "scene", "caption", "chat")


def task_prompt(task, question=None, classes=None, box=None, expression=None):
    """The user text GeoChat was tuned on for one task (without the "<image>\\n" prefix)."""
    if task == "grounding":
        return f"[grounding] {question or 'Describe the image in detail.'}"
    if task == "caption":
        return question or "Describe the image in detail."
    if task == "refer":
        if not expression:
            raise ValueError("task 'refer' needs expression= (the object to locate)")
        return f"[refer] Give me the location of <p> {expression} </p>"
    if task == "identify":
        if box is None:
            raise ValueError("task 'identify' needs box= (a Box or a '{<x1><y1><x2><y2>|<θ>}' string)")
        return f"[identify] What is the object present at {box if isinstance(box, str) else format_box(box)}"
    if task == "vqa":
        if not question:
            raise ValueError("task 'vqa' needs question=")
        return f"{question}\nAnswer the question using a single word or phrase."
    if task == "scene":
        if not classes:
            raise ValueError("task 'scene' needs classes= (a list of class names or a comma-separated string)")
        classes = classes if isinstance(classes, str) else ", ".join(classes)
        question = question or "Classify the given image in one of the following classes."
        return f"{question}\nClassify the image from the following classes: {classes}. Answer in one word or a short phrase."
    if task == "chat":
        if not question:
            raise ValueError("task 'chat' needs question=")
        return question
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# -----------------------------------------------------------------------------
# boxes


@dataclass
class Box:
    """A box on the 0-100 grid over the padded square image; angle in degrees (see box_polygon_grid)."""
    x1: float
    y1: float
    x2: float
    y2: float
    angle: float = 0.0
    label: str | None = None


_NUMBER = r"<\s*(-?\d+(?:\.\d+)?)\s*>"
_BOX_RE = re.compile(r"\{\s*" + r"\s*".join([_NUMBER] * 4) + r"\s*(?:\|\s*" + _NUMBER + r"\s*)?\}")
_LABEL_RE = re.compile(r"<p>([^{}]*?)</p>")  # a label holds no braces, so it never swallows a box
_BETWEEN_BOXES_RE = re.compile(r"(?:[\s,;]|\{[^{}]*\}?)*")  # what may sit between a label and its boxes


def parse_boxes(text):
    """Every {<x1><y1><x2><y2>|<θ>} in text (θ optional), labelled by the <p>label</p> right before its group."""
    events = [(m.start(), m.end(), "label", m.group(1).strip()) for m in _LABEL_RE.finditer(text)]
    events += [(m.start(), m.end(), "box", m) for m in _BOX_RE.finditer(text)]
    events.sort(key=lambda event: event[0])
    boxes, label, position = [], None, 0
    for start, end, kind, payload in events:
        if kind == "label":
            label = payload
        else:
            if not _BETWEEN_BOXES_RE.fullmatch(text, position, start):
                label = None  # other words since the label: the label does not reach this box
            x1, y1, x2, y2, angle = (float(v) if v is not None else 0.0 for v in payload.groups())
            boxes.append(Box(x1, y1, x2, y2, angle, label))
        position = end
    return boxes


def format_box(box):
    """Box -> "{<x1><y1><x2><y2>|<θ>}" with integers (half rounds up)."""
    x1, y1, x2, y2, angle = (int(math.floor(v + 0.5)) for v in (box.x1, box.y1, box.x2, box.y2, box.angle))
    return f"{{<{x1}><{y1}><{x2}><{y2}>|<{angle}>}}"


def box_polygon_grid(box):
    """The 4 corners on the 0-100 grid: the box x1..x2, y1..y2 turned by `angle` degrees about its centre.

    Convention (the only one in this project): y points down, as in image pixels, and a
    positive angle turns the box counter-clockwise as seen on screen. A corner at offset
    (dx, dy) from the centre goes to (dx cos θ + dy sin θ, -dx sin θ + dy cos θ). Corners come
    in the order (x1, y1), (x2, y1), (x2, y2), (x1, y2) before the turn.
    """
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    cos, sin = math.cos(math.radians(box.angle)), math.sin(math.radians(box.angle))
    corners = [(box.x1, box.y1), (box.x2, box.y1), (box.x2, box.y2), (box.x1, box.y2)]
    return [(cx + (x - cx) * cos + (y - cy) * sin, cy - (x - cx) * sin + (y - cy) * cos) for x, y in corners]


def box_polygon(box, width, height):
    """The 4 corners in original-image pixels of a width x height image (grid spans the padded square)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    offset_x, offset_y = (side - width) // 2, (side - height) // 2
    return [(x * side / 100 - offset_x, y * side / 100 - offset_y) for x, y in box_polygon_grid(box)]


# -----------------------------------------------------------------------------
# training data

_ROLES = ("human", "gpt")


def _conversation_turns(conversations):
    """GeoChat_Instruct "conversations" -> [(user, assistant)], checked, "<image>" moved to the turn's front."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    for j, message in enumerate(conversations):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise ValueError(f"turn {j} is not a {{'from': ..., 'value': ...}} dict")
        if message["from"] != _ROLES[j % 2]:
            raise ValueError(f"turn {j} is from {message['from']!r}, expected {_ROLES[j % 2]!r} "
                             "(turns must alternate human, gpt, ... starting with human)")
        if not isinstance(message["value"], str) or not message["value"].strip():
            raise ValueError(f"turn {j} has an empty or non-string 'value'")
    if len(conversations) % 2:
        raise ValueError("the conversation ends with a human turn: nothing to learn from it")
    values = []
    for message in conversations:
        value = message["value"]
        if IMAGE_PLACEHOLDER in value:  # the reference's preprocess_multimodal
            value = (IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        values.append(value)
    return list(zip(values[0::2], values[1::2]))


def _longest_common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_conversation(tokenizer, conversations, template="vicuna_v1"):
    """GeoChat_Instruct turns -> (input_ids, labels); labels keep each answer and its "</s>", else IGNORE_INDEX.

    input_ids are exactly tokenizer.encode_prompt(build_prompt(turns, template)); labels are
    computed on those very tokens, so no sample is silently masked by a length mismatch.
    A token is labelled when it holds a character of " " + answer + "</s>": generation starts right
    after "ASSISTANT:", so the model must learn the space too ("▁Yes", or "▁" then "2" for digits).
    This equals the reference's labels whenever the reference has no tokenization mismatch.
    """
    turns = _conversation_turns(conversations)
    prompt, answer_spans = _build_prompt_and_spans(turns, template)

    def in_answer(position):
        return any(start <= position < end for start, end in answer_spans)

    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    chunk_start = 0
    for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            input_ids.append(IMAGE_TOKEN_ID)
            labels.append(IGNORE_INDEX)
        for start, end, special_id in tokenizer._split_special(chunk):
            start, end = chunk_start + start, chunk_start + end  # positions in the prompt
            if special_id is not None:
                input_ids.append(special_id)
                labels.append(special_id if in_answer(start) else IGNORE_INDEX)
                continue
            ids = tokenizer.sp.encode(prompt[start:end])
            answer_start = next((max(s, start) for s, e in answer_spans if s < end and e > start), None)
            if answer_start is None:
                n_prompt = len(ids)
            elif answer_start == start:
                n_prompt = 0
            else:  # the piece holds the end of the user part and the start of an answer
                n_prompt = _longest_common_prefix(ids, tokenizer.sp.encode(prompt[start:answer_start]))
            input_ids.extend(ids)
            labels.extend([IGNORE_INDEX] * n_prompt + ids[n_prompt:])
        chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return input_ids, labels


class InstructDataset(torch.utils.data.Dataset):
    """GeoChat_Instruct json -> dict(input_ids, labels, image) items; unusable samples come back as None."""

    def __init__(self, json_path, image_folder, tokenizer, image_size=504, max_length=2048,
                 n_image_tokens=1296, template="vicuna_v1"):
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path}: no such dataset file")
        try:
            with open(json_path, encoding="utf-8") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{json_path}: invalid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
        if not records:
            raise ValueError(f"{json_path}: the dataset is empty")
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; expected one of {sorted(TEMPLATES)}")
        self.json_path = json_path
        self.image_folder = os.path.abspath(image_folder) if image_folder is not None else None
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.n_image_tokens = n_image_tokens
        self.template = template
        self.records = records
        self.image_paths = [self._check_record(i, record) for i, record in enumerate(records)]
        self.skipped = Counter()  # reason -> count, in this process (each DataLoader worker has its own)

    def _check_record(self, i, record):
        """Validate one record; return its resolved image path or None for a text-only record."""
        where = f"{self.json_path}: record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        where += f" (id {record.get('id')!r})"
        if "conversations" not in record:
            raise ValueError(f"{where}: no 'conversations'")
        try:
            _conversation_turns(record["conversations"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        n_placeholders = sum(m["value"].count(IMAGE_PLACEHOLDER) for m in record["conversations"][0::2])
        if any(IMAGE_PLACEHOLDER in m["value"] for m in record["conversations"][1::2]):
            raise ValueError(f"{where}: {IMAGE_PLACEHOLDER!r} in an assistant turn")
        if "image" not in record:
            if n_placeholders:
                raise ValueError(f"{where}: {IMAGE_PLACEHOLDER!r} in a record without 'image'")
            return None
        if n_placeholders != 1:
            raise ValueError(f"{where}: an image record needs exactly one {IMAGE_PLACEHOLDER!r}, found {n_placeholders}")
        name = record["image"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'image' must be a non-empty file name, got {name!r}")
        if self.image_folder is None:
            raise ValueError(f"{where}: has an image but no image_folder was given")
        path = os.path.normpath(os.path.join(self.image_folder, name.strip()))
        if os.path.commonpath([self.image_folder, path]) != self.image_folder:
            raise ValueError(f"{where}: image path {name!r} points outside the image folder {self.image_folder}")
        return path

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        """dict(input_ids (T,), labels (T,), image (3, S, S) or None), or None for a skipped sample."""
        input_ids, labels = encode_conversation(self.tokenizer, self.records[i]["conversations"], self.template)
        placeholders = [k for k, token in enumerate(input_ids) if token == IMAGE_TOKEN_ID]
        spliced_length = len(input_ids) + len(placeholders) * (self.n_image_tokens - 1)
        if spliced_length > self.max_length:
            keep = len(input_ids) - (spliced_length - self.max_length)
            if placeholders and placeholders[-1] >= keep:
                self.skipped["image_cut_by_max_length"] += 1
                return None
            input_ids, labels = input_ids[:keep], labels[:keep]
        if all(label == IGNORE_INDEX for label in labels):
            self.skipped["no_answer_tokens_left"] += 1
            return None
        image = None
        if self.image_paths[i] is not None:
            try:
                image = preprocess_image(load_image(self.image_paths[i]), self.image_size)  # (3, S, S)
            except FileNotFoundError as e:
                self.skipped["missing_image"] += 1
                warnings.warn(f"skipping record {i}: {e}", stacklevel=2)
                return None
            except ValueError as e:
                self.skipped["corrupt_image"] += 1
                warnings.warn(f"skipping record {i}: {e}", stacklevel=2)
                return None
        return dict(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    labels=torch.tensor(labels, dtype=torch.long),
                    image=image)


def collate(batch, pad_id):
    """List of dataset items (None dropped) -> padded batch dict; None when nothing is left."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(items), length), dtype=torch.bool)  # (B, T)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = True
    images = [item["image"] for item in items if item["image"] is not None]
    images = torch.stack(images) if images else None  # (N, 3, S, S)
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, images=images)


class ShardedSampler(torch.utils.data.Sampler):
    """Deterministic (seed, epoch) order, padded to a multiple of world_size, rank takes every world_size-th index."""

    def __init__(self, dataset_len, rank, world_size, seed, shuffle=True):
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_samples = math.ceil(dataset_len / world_size)  # per rank, per full epoch
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        """Select the epoch's order; start_index skips this rank's first samples (to resume mid-epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index must be in [0, {self.num_samples}], got {start_index}")
        self.epoch, self.start_index = epoch, start_index

    def rank_indices(self):
        """This rank's full index list for the current epoch (ignoring start_index)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        indices = (indices * math.ceil(total / self.dataset_len))[:total]  # pad by repeating from the start
        return indices[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


# ---------------------------------------------------------------------------------------------
# Synthetic aerial scenes ("Baby GeoChat")
#
# A deterministic generator of tiny remote-sensing-like images with rotated-box annotations,
# GeoChat_Instruct-style training conversations for every task, and GeoChat-Bench-style question
# files for held-out images. Pure numpy + Pillow; everything is a function of the seed.
#
# Box convention (the project's one convention, shared with `box_polygon`):
#   "{<x1><y1><x2><y2>|<θ>}" with integers on a 0-100 grid over the square image
#   (grid value g <-> continuous pixel coordinate g * size / 100; pixel (i, j) covers
#   [i, i+1) x [j, j+1), so its centre is at (i + 0.5, j + 0.5)). (x1, y1, x2, y2) is the
#   axis-aligned box BEFORE rotation; the object occupies that box rotated about its centre
#   (cx, cy) = ((x1+x2)/2, (y1+y2)/2) by θ degrees COUNTER-CLOCKWISE AS SEEN ON SCREEN (image
#   y pointing down): a local offset (u, v) maps to
#       x = cx + u*cos θ + v*sin θ,   y = cy - u*sin θ + v*cos θ.
#   θ is an integer in [0, 90): a w x h box at θ + 90 is the h x w box at θ, and the generator
#   always emits the θ in [0, 90) form (storage tanks, being circles, have θ = 0).
#   The box is the ground truth: objects are sampled directly as integer grid boxes and drawn
#   inside them, so the box string is exact (no rounding).
# ---------------------------------------------------------------------------------------------

SCENE_CLASSES = ("farmland", "water", "desert", "urban")
OBJECT_CLASSES = ("plane", "ship", "storage tank", "vehicle", "building")
SYNTH_TASKS = ("grounding", "refer", "identify", "presence", "count", "comparison", "scene")

SYNTH_PLURALS = {"plane": "planes", "ship": "ships", "storage tank": "storage tanks",
                 "vehicle": "vehicles", "building": "buildings"}
SYNTH_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
SYNTH_SCENE_PHRASES = {"farmland": "a farmland scene", "water": "a water scene",
                       "desert": "a desert scene", "urban": "an urban scene"}

# which object classes may appear on which ground (relative weights); ships only on water
SYNTH_SCENE_OBJECTS = {
    "farmland": {"building": 3, "vehicle": 3, "storage tank": 2, "plane": 1},
    "water": {"ship": 1},
    "desert": {"plane": 3, "storage tank": 3, "vehicle": 2, "building": 1},
    "urban": {"building": 3, "vehicle": 3, "storage tank": 1, "plane": 1},
}
SYNTH_N_OBJECTS_WEIGHTS = (0.1, 0.3, 0.3, 0.3)  # P(0, 1, 2, 3 objects)
SYNTH_PRESENCE_YES = 0.5 / (1.0 - SYNTH_N_OBJECTS_WEIGHTS[0])  # balances yes/no over scenes

# object size ranges on the 0-100 grid: (length range, breadth range or ratio range)
SYNTH_SIZE_GRID = {
    "plane": ((22, 33), None),          # breadth (wingspan) = length * U(0.85, 1.05)
    "ship": ((16, 31), (5, 9)),
    "storage tank": ((10, 19), None),   # circle: breadth = length, θ = 0
    "vehicle": ((8, 12), (5, 7)),
    "building": ((12, 28), (10, 22)),
}
SYNTH_COLORS = {  # one colour family per class, so that a few-million-parameter model can learn them on a CPU
    "plane": ((240, 240, 240), (214, 214, 222)),
    "ship": ((196, 42, 36), (235, 120, 30)),
    "storage tank": ((250, 215, 60),),
    "vehicle": ((40, 90, 235), (20, 200, 210)),
    "building": ((150, 60, 45), (120, 44, 40), (178, 98, 66), (62, 60, 78)),
}
SYNTH_MARGIN_GRID = 1.0     # objects keep this far from the image border (grid units)
SYNTH_GAP_GRID = 2.0        # and this far from each other (grid units)

# referring size groups by the target's (mean) box area w*h on the 0-100 grid
SYNTH_SIZE_SMALL_MAX = 150   # area < 150 -> "small" (vehicles, small tanks)
SYNTH_SIZE_MEDIUM_MAX = 400  # 150 <= area < 400 -> "medium"; otherwise "large"

SYNTH_SCENE_PROMPT = task_prompt("scene", classes=SCENE_CLASSES)
SYNTH_GROUNDING_PROMPT = task_prompt("grounding")
SYNTH_SYSTEM_PROMPTS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)


# ------------------------------------------------------------------------------ boxes/geometry

def synth_box_string(x1, y1, x2, y2, theta):
    """Format one integer grid box as GeoChat's `{<x1><y1><x2><y2>|<θ>}`."""
    return "{<%d><%d><%d><%d>|<%d>}" % (x1, y1, x2, y2, theta)


def synth_box_corners(x1, y1, x2, y2, theta):
    """Corners (grid units) of the box rotated counter-clockwise on screen by theta degrees."""
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    hw, hh = (x2 - x1) / 2.0, (y2 - y1) / 2.0
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    return [(cx + u * c + v * s, cy - u * s + v * c)
            for u, v in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))]


def _synth_polys_overlap(p, q):
    """Separating-axis test for two convex polygons."""
    for poly in (p, q):
        n = len(poly)
        for i in range(n):
            ax, ay = poly[i]
            bx, by = poly[(i + 1) % n]
            nx, ny = ay - by, bx - ax
            pa = [nx * x + ny * y for x, y in p]
            qa = [nx * x + ny * y for x, y in q]
            if max(pa) < min(qa) or max(qa) < min(pa):
                return False
    return True


def _synth_sample_object(rng, cls):
    """Sample (length, breadth, direction deg in [0,360)) for one object class, grid units."""
    (lo, hi), br = SYNTH_SIZE_GRID[cls]
    length = rng.randint(lo, hi)
    if cls == "plane":
        breadth = max(8, int(round(length * rng.uniform(0.85, 1.05))))
    elif cls == "storage tank":
        breadth = length
    elif cls == "building":
        breadth = min(length, rng.randint(*br))
    else:
        breadth = rng.randint(*br)
    direction = 0 if cls == "storage tank" else rng.randrange(360)
    return length, breadth, direction


def _synth_place(rng, cls, placed_polys, tries=30):
    """Rejection-sample a non-overlapping, fully-inside integer grid box for one object."""
    for _ in range(tries):
        length, breadth, direction = _synth_sample_object(rng, cls)
        phi = direction % 180
        if phi < 90:
            w, h, theta = length, breadth, phi
        else:
            w, h, theta = breadth, length, phi - 90
        c, s = abs(math.cos(math.radians(theta))), abs(math.sin(math.radians(theta)))
        ex, ey = (w * c + h * s) / 2.0, (w * s + h * c) / 2.0
        x_lo = math.ceil(SYNTH_MARGIN_GRID + ex - w / 2.0)
        x_hi = math.floor(100 - SYNTH_MARGIN_GRID - ex - w / 2.0)
        y_lo = math.ceil(SYNTH_MARGIN_GRID + ey - h / 2.0)
        y_hi = math.floor(100 - SYNTH_MARGIN_GRID - ey - h / 2.0)
        # the pre-rotation box itself must also lie on the 0..100 grid
        x_lo, y_lo = max(x_lo, 0), max(y_lo, 0)
        x_hi, y_hi = min(x_hi, 100 - w), min(y_hi, 100 - h)
        if x_lo > x_hi or y_lo > y_hi:
            continue
        x1, y1 = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
        grid = (x1, y1, x1 + w, y1 + h, theta)
        # collision test on boxes grown by the gap
        g = SYNTH_GAP_GRID / 2.0
        grown = synth_box_corners(x1 - g, y1 - g, x1 + w + g, y1 + h + g, theta)
        if any(_synth_polys_overlap(grown, other) for other in placed_polys):
            continue
        placed_polys.append(grown)
        return grid, direction
    return None


# ------------------------------------------------------------------------------ textures

def _synth_smooth_noise(nrng, size, cells):
    """Smooth noise in about [-1, 1]: a cells x cells normal grid bicubically upsampled."""
    small = nrng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 1.5


def _synth_rotated_coords(size, angle_deg, nrng):
    """Pixel-centre coordinates rotated by angle: (u along the angle, v across it)."""
    t = (np.arange(size, dtype=np.float32) + 0.5)
    x, y = t[None, :], t[:, None]
    a = math.radians(angle_deg)
    off = nrng.uniform(0, 1000, 2)
    u = x * math.cos(a) - y * math.sin(a) + off[0]
    v = x * math.sin(a) + y * math.cos(a) + off[1]
    return u, v


def _synth_texture(scene, size, nrng):
    """Float32 (size, size, 3) RGB ground texture for a scene class."""
    fine = nrng.standard_normal((size, size, 1)).astype(np.float32)
    if scene == "farmland":
        palette = np.array([(92, 138, 60), (120, 158, 70), (70, 112, 50), (176, 168, 88),
                            (196, 178, 104), (150, 124, 80), (104, 146, 84)], np.float32)
        palette += nrng.uniform(-10, 10, (1, 3)).astype(np.float32)
        u, v = _synth_rotated_coords(size, nrng.uniform(0, 180), nrng)
        sw = nrng.uniform(10, 22) * size / 128.0
        pl = nrng.uniform(40, 90) * size / 128.0
        iu, iv = np.floor(u / sw).astype(np.int64), np.floor(v / pl).astype(np.int64)
        table = nrng.integers(0, len(palette), (64, 64))
        img = palette[table[iu % 64, iv % 64]]
        frac = (u / sw) % 1.0
        edge = (frac < 0.08).astype(np.float32)[..., None]
        img = img * (1.0 - 0.15 * edge)
        rows = 0.5 + 0.5 * np.sin(u * (2 * math.pi / max(2.0, sw / 4.0)))
        img += (rows[..., None] - 0.5) * 8.0
        img += _synth_smooth_noise(nrng, size, 4)[..., None] * 8.0 + fine * 3.0
    elif scene == "water":
        base = np.array((30, 72, 118), np.float32) + nrng.uniform(-10, 10, 3).astype(np.float32)
        n = _synth_smooth_noise(nrng, size, 4) * 0.7 + _synth_smooth_noise(nrng, size, 10) * 0.3
        img = base[None, None, :] + n[..., None] * np.array((6, 10, 12), np.float32) + fine * 2.0
    elif scene == "desert":
        base = np.array((206, 176, 126), np.float32) + nrng.uniform(-12, 12, 3).astype(np.float32)
        u, _ = _synth_rotated_coords(size, nrng.uniform(0, 180), nrng)
        lam = nrng.uniform(14, 26) * size / 128.0
        warp = _synth_smooth_noise(nrng, size, 3)
        dunes = np.sin(2 * math.pi * (u / lam + 0.6 * warp))
        img = (base[None, None, :] + dunes[..., None] * 11.0
               + _synth_smooth_noise(nrng, size, 5)[..., None] * 8.0 + fine * 3.0)
    elif scene == "urban":
        t = np.arange(size, dtype=np.float32) + 0.5
        spacing = nrng.uniform(30, 46) * size / 128.0
        street = nrng.uniform(3.5, 5.5) * size / 128.0
        ox, oy = nrng.uniform(0, spacing, 2)
        bx = np.floor((t + ox) / spacing).astype(np.int64)
        by = np.floor((t + oy) / spacing).astype(np.int64)
        sx, sy = ((t + ox) % spacing) < street, ((t + oy) % spacing) < street
        shades = nrng.uniform(132, 172, (16, 16)).astype(np.float32)
        block = shades[by[:, None] % 16, bx[None, :] % 16]
        img = block[..., None] + np.array((0, 0, 3), np.float32) + fine * 6.0
        img += _synth_smooth_noise(nrng, size, 6)[..., None] * 5.0
        road = (sy[:, None] | sx[None, :])
        img[road] = np.array((88, 88, 92), np.float32) + fine[road] * 2.0
    else:
        raise ValueError(f"unknown scene class {scene!r}")
    return img


# ------------------------------------------------------------------------------ object drawing

def _synth_fill_convex(arr, poly, color):
    """Paint the pixels of arr whose centres lie in a convex polygon (pixel coords, y down)."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    h, w = arr.shape[:2]
    c0, c1 = max(0, int(math.floor(min(xs)))), min(w, int(math.ceil(max(xs))) + 1)
    r0, r1 = max(0, int(math.floor(min(ys)))), min(h, int(math.ceil(max(ys))) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    px = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
    py = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
    pos = np.ones((r1 - r0, c1 - c0), bool)
    neg = np.ones((r1 - r0, c1 - c0), bool)
    n = len(poly)
    for i in range(n):
        ax, ay = poly[i]
        bx, by = poly[(i + 1) % n]
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        pos &= cross >= 0
        neg &= cross <= 0
    arr[r0:r1, c0:c1][pos | neg] = color


def _synth_fill_disc(arr, cx, cy, r, color):
    """Paint the pixels of arr whose centres lie within distance r of (cx, cy)."""
    h, w = arr.shape[:2]
    c0, c1 = max(0, int(math.floor(cx - r))), min(w, int(math.ceil(cx + r)) + 1)
    r0, r1 = max(0, int(math.floor(cy - r))), min(h, int(math.ceil(cy + r)) + 1)
    px = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5 - cx
    py = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5 - cy
    arr[r0:r1, c0:c1][px * px + py * py <= r * r] = color


def _synth_draw_object(arr, cls, grid, direction, color, size):
    """Draw one object into a uint8 (size, size, 3) array inside its grid box.

    `direction` is the object's nose direction in degrees (counter-clockwise on screen); a
    pixel is painted iff its centre lies in one of the object's convex parts, all of which lie
    in the rotated box, so the box string describes the drawn pixels exactly.
    """
    x1, y1, x2, y2, theta = grid
    s = size / 100.0
    cx, cy = (x1 + x2) / 2.0 * s, (y1 + y2) / 2.0 * s
    phi = direction % 180
    length, breadth = ((x2 - x1), (y2 - y1)) if phi < 90 else ((y2 - y1), (x2 - x1))
    L, B = length * s, breadth * s
    a = math.radians(direction)
    c, sn = math.cos(a), math.sin(a)

    def part(local, col):  # local (a along the nose, b across) in units of L, B
        _synth_fill_convex(arr, [(cx + p * L * c + q * B * sn, cy - p * L * sn + q * B * c)
                                 for p, q in local], col)

    if cls == "plane":
        part([(-0.5, -0.08), (0.36, -0.08), (0.5, 0.0), (0.36, 0.08), (-0.5, 0.08)], color)
        for side in (-1, 1):
            part([(0.18, 0.0), (-0.08, 0.5 * side), (-0.24, 0.5 * side), (-0.12, 0.0)], color)
            part([(-0.32, 0.0), (-0.46, 0.22 * side), (-0.5, 0.22 * side), (-0.5, 0.0)], color)
    elif cls == "ship":
        part([(-0.5, -0.5), (0.2, -0.5), (0.5, 0.0), (0.2, 0.5), (-0.5, 0.5)], color)
        part([(-0.36, -0.26), (-0.08, -0.26), (-0.08, 0.26), (-0.36, 0.26)], (150, 150, 156))
    elif cls == "storage tank":
        _synth_fill_disc(arr, cx, cy, L / 2.0, (168, 168, 174))
        _synth_fill_disc(arr, cx, cy, L / 2.0 * 0.78, color)
    elif cls == "vehicle":
        part([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)], color)
        part([(0.12, -0.4), (0.3, -0.4), (0.3, 0.4), (0.12, 0.4)], (30, 30, 40))
    elif cls == "building":
        part([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)], color)
        shade = tuple(int(v * 0.75) for v in color)
        part([(-0.5, 0.0), (0.5, 0.0), (0.5, 0.5), (-0.5, 0.5)], shade)
    else:
        raise ValueError(f"unknown object class {cls!r}")


def _synth_reading_key(obj):
    x1, y1, x2, y2, _ = obj["grid"]
    return (y1 + y2, x1 + x2)


def make_scene(rng_seed, size=128, draw_objects=True):
    """Deterministically generate one synthetic aerial scene: (PIL RGB image, annotation dict)."""
    seed = int(rng_seed)
    rng = random.Random(seed)
    nrng = np.random.default_rng([seed, 1])
    scene = SCENE_CLASSES[rng.randrange(len(SCENE_CLASSES))]
    n_obj = rng.choices(range(len(SYNTH_N_OBJECTS_WEIGHTS)), weights=SYNTH_N_OBJECTS_WEIGHTS)[0]
    allowed = SYNTH_SCENE_OBJECTS[scene]
    classes, weights = list(allowed), list(allowed.values())
    placed, objects = [], []
    for _ in range(n_obj):
        cls = rng.choices(classes, weights=weights)[0]
        res = _synth_place(rng, cls, placed)
        if res is None:
            continue
        grid, direction = res
        color = rng.choice(SYNTH_COLORS[cls])
        objects.append({"class": cls, "grid": list(grid), "direction": direction,
                        "color": list(color)})
    objects.sort(key=_synth_reading_key)
    s = size / 100.0
    for o in objects:
        x1, y1, x2, y2, theta = o["grid"]
        o["box"] = synth_box_string(x1, y1, x2, y2, theta)
        o["rbox"] = [(x1 + x2) / 2.0 * s, (y1 + y2) / 2.0 * s, (x2 - x1) * s, (y2 - y1) * s,
                     float(theta)]
    tex = _synth_texture(scene, size, nrng)
    arr = np.clip(tex + 0.5, 0, 255).astype(np.uint8)
    if draw_objects:
        for o in objects:
            _synth_draw_object(arr, o["class"], o["grid"], o["direction"], o["color"], size)
    img = Image.fromarray(arr)
    ann = {"seed": seed, "size": size, "scene": scene, "objects": objects}
    return img, ann


# ------------------------------------------------------------------------------ questions

def _synth_counts(ann):
    counts = {c: 0 for c in OBJECT_CLASSES}
    for o in ann["objects"]:
        counts[o["class"]] += 1
    return counts


def _synth_group_phrase(cls, n):
    return "%s %s" % (SYNTH_NUMBER_WORDS[n], cls if n == 1 else SYNTH_PLURALS[cls])


def synth_grounded_description(ann):
    """Grounded description: scene phrase + `<p>two ships</p> {box}{box}` groups, reading order."""
    groups = {}
    for o in ann["objects"]:
        groups.setdefault(o["class"], []).append(o["box"])
    head = "The image shows %s" % SYNTH_SCENE_PHRASES[ann["scene"]]
    if not groups:
        return head + " with no notable objects."
    parts = ["<p>%s</p> %s" % (_synth_group_phrase(c, len(b)), "".join(b))
             for c, b in groups.items()]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return "%s with %s." % (head, body)


def synth_refer_targets(ann):
    """Referring targets: (expression, obj_ids) per class present: "the X" once, "all Xs" more."""
    out = []
    by_cls = {}
    for i, o in enumerate(ann["objects"]):
        by_cls.setdefault(o["class"], []).append(i)
    for cls, ids in by_cls.items():
        out.append(("the " + cls if len(ids) == 1 else "all " + SYNTH_PLURALS[cls], ids))
    return out


def synth_caption(cls):
    """The region caption of an object class (the one form used everywhere): 'A ship.'."""
    return "A %s." % cls


def _synth_size_group(ann, ids):
    areas = []
    for i in ids:
        x1, y1, x2, y2, _ = ann["objects"][i]["grid"]
        areas.append((x2 - x1) * (y2 - y1))
    a = sum(areas) / len(areas)
    if a < SYNTH_SIZE_SMALL_MAX:
        return "small"
    return "medium" if a < SYNTH_SIZE_MEDIUM_MAX else "large"


def _synth_presence(ann, rng):
    counts = _synth_counts(ann)
    present = [c for c in OBJECT_CLASSES if counts[c]]
    absent = [c for c in OBJECT_CLASSES if not counts[c]]
    yes = bool(present) and rng.random() < SYNTH_PRESENCE_YES
    cls = rng.choice(present if yes else absent)
    return "Is there a %s in the image?" % cls, ("Yes" if yes else "No")


def _synth_count(ann, rng):
    counts = _synth_counts(ann)
    present = [c for c in OBJECT_CLASSES if counts[c]]
    pool = present if present and rng.random() < 0.75 else list(OBJECT_CLASSES)
    cls = rng.choice(pool)
    return "How many %s are there in the image?" % SYNTH_PLURALS[cls], str(counts[cls])


def _synth_comparison(ann, rng):
    counts = _synth_counts(ann)
    pairs = [(a, b) for i, a in enumerate(OBJECT_CLASSES) for b in OBJECT_CLASSES[i + 1:]
             if counts[a] != counts[b]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    q = "Are there more %s than %s?" % (SYNTH_PLURALS[a], SYNTH_PLURALS[b])
    return q, ("Yes" if counts[a] > counts[b] else "No")


# in a scene without objects, a task that needs one is replaced by another (never by presence,
# so that every scene gets the same share of presence questions and yes/no stays balanced)
SYNTH_EMPTY_SCENE_SUBSTITUTE = {"refer": "grounding", "identify": "scene", "comparison": "count"}


def synth_task_cycle(ann):
    """One cycle of tasks for a scene: SYNTH_TASKS, object tasks substituted in empty scenes."""
    if ann["objects"]:
        return list(SYNTH_TASKS)
    return [SYNTH_EMPTY_SCENE_SUBSTITUTE.get(t, t) for t in SYNTH_TASKS]


def synth_qa(ann, task, rng):
    """One (human prompt, gpt answer) pair of a task for a scene; rng picks the target."""
    if task == "grounding":
        return SYNTH_GROUNDING_PROMPT, synth_grounded_description(ann)
    if task == "refer":
        expr, ids = rng.choice(synth_refer_targets(ann))
        return task_prompt("refer", expression=expr), "".join(ann["objects"][i]["box"] for i in ids)
    if task == "identify":
        o = rng.choice(ann["objects"])
        return task_prompt("identify", box=o["box"]), synth_caption(o["class"])
    if task in ("presence", "count", "comparison"):
        fn = {"presence": _synth_presence, "count": _synth_count,
              "comparison": _synth_comparison}[task]
        q, a = fn(ann, rng)
        return task_prompt("vqa", question=q), a
    if task == "scene":
        return SYNTH_SCENE_PROMPT, ann["scene"]
    raise ValueError(f"unknown task {task!r}")


def synth_conversations(ann, image_name, n_records=7, rng_seed=0, multi_turn_prob=0.25):
    """GeoChat_Instruct records for one image; tasks cycle so n_records >= 7 covers every task."""
    rng = random.Random("conv-%d-%d" % (int(ann["seed"]), int(rng_seed)))
    tasks = synth_task_cycle(ann)
    cycle = []
    stem = Path(image_name).stem
    records = []
    for k in range(n_records):
        n_turns = 1 if rng.random() >= multi_turn_prob else rng.choice((2, 3))
        conv = []
        for t in range(n_turns):
            if not cycle:
                cycle = tasks[:]
                rng.shuffle(cycle)
            q, a = synth_qa(ann, cycle.pop(), rng)
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            conv.append({"from": "gpt", "value": a})
        records.append({"id": "%s_%d" % (stem, k), "image": image_name, "conversations": conv})
    return records


def synth_bench_items(ann, image_name, rng_seed=0, start_qid=0):
    """GeoChat-Bench-style question dicts for a held-out image: {file key: [dicts]}."""
    rng = random.Random("bench-%d-%d" % (int(ann["seed"]), int(rng_seed)))
    stem = Path(image_name).stem
    out = {"scene": [], "vqa": [], "referring": [], "region_captioning": []}
    qid = start_qid
    out["scene"].append({"question_id": "%s/%s" % (ann["scene"], image_name), "image": image_name,
                         "text": SYNTH_SCENE_PROMPT, "ground_truth": ann["scene"]})
    for cat, fn in (("presence", _synth_presence), ("count", _synth_count),
                    ("comparison", _synth_comparison)):
        qa = fn(ann, rng)
        if qa is None:
            continue
        out["vqa"].append({"question_id": qid, "image": image_name,
                           "text": task_prompt("vqa", question=qa[0]), "category": cat,
                           "ground_truth": qa[1].lower()})
        qid += 1
    for expr, ids in synth_refer_targets(ann):
        out["referring"].append({
            "question_id": qid, "image_id": stem, "image": image_name,
            "question": task_prompt("refer", expression=expr),
            "ground_truth": "".join(ann["objects"][i]["box"] for i in ids),
            "type": "ref" if len(ids) == 1 else "grounding", "obj_ids": ids,
            "size_group": _synth_size_group(ann, ids), "dataset": "synthetic"})
        qid += 1
    for o in ann["objects"]:
        out["region_captioning"].append({"question_id": qid, "image": image_name,
                                         "question": task_prompt("identify", box=o["box"]),
                                         "ground_truth": synth_caption(o["class"])})
        qid += 1
    return out, qid


# ------------------------------------------------------------------------------ dataset writer

def synth_image_seed(seed, split, index):
    """The scene seed of image `index` of split 0 (train) / 1 (test) for a dataset seed."""
    return int(np.random.SeedSequence([int(seed), int(split), int(index)]).generate_state(1)[0])


def _synth_render_chunk(args):
    img_dir, split_name, split_id, seed, size, indices = args
    anns = []
    for i in indices:
        name = "%s_%06d.png" % (split_name, i)
        img, ann = make_scene(synth_image_seed(seed, split_id, i), size)
        img.save(Path(img_dir) / name, format="PNG", compress_level=1)
        ann["image"] = name
        anns.append(ann)
    return anns


def _synth_render_split(img_dir, split_name, split_id, n, seed, size, workers):
    chunk = max(16, min(256, -(-n // max(1, 4 * workers))))
    jobs = [(str(img_dir), split_name, split_id, seed, size, list(range(a, min(n, a + chunk))))
            for a in range(0, n, chunk)]
    if workers <= 1 or len(jobs) <= 1:
        results = [_synth_render_chunk(j) for j in jobs]
    else:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(_synth_render_chunk, jobs))
    return [a for r in results for a in r]


def _synth_corpus_lines(records, bench):
    yield from SYNTH_SYSTEM_PROMPTS
    yield "USER: <image>"
    yield "ASSISTANT: </s>"
    for rec in records:
        for turn in rec["conversations"]:
            for line in turn["value"].split("\n"):
                if line:
                    yield line
    for items in bench.values():
        for d in items:
            for key in ("text", "question", "ground_truth"):
                if key in d:
                    for line in str(d[key]).split("\n"):
                        if line:
                            yield line


def write_synthetic_dataset(out_dir, n_train_images, n_test_images, seed=0, size=128,
                            records_per_image=7, multi_turn_prob=0.25, workers=1):
    """Write images, train.json/test.json, bench jsonl files and corpus.txt; return their paths."""
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    train_anns = _synth_render_split(img_dir, "train", 0, n_train_images, seed, size, workers)
    test_anns = _synth_render_split(img_dir, "test", 1, n_test_images, seed, size, workers)

    def convs(anns):
        return [r for a in anns
                for r in synth_conversations(a, a["image"], records_per_image, seed, multi_turn_prob)]

    train_recs, test_recs = convs(train_anns), convs(test_anns)
    bench = {"scene": [], "vqa": [], "referring": [], "region_captioning": []}
    qid = 0
    for a in test_anns:
        items, qid = synth_bench_items(a, a["image"], seed, qid)
        for k, v in items.items():
            bench[k].extend(v)
    paths = {"images": img_dir, "train": out / "train.json", "test": out / "test.json",
             "annotations": out / "annotations.jsonl", "corpus": out / "corpus.txt"}
    paths["train"].write_text(json.dumps(train_recs))
    paths["test"].write_text(json.dumps(test_recs))
    with open(paths["annotations"], "w") as f:
        for a in train_anns + test_anns:
            f.write(json.dumps(a) + "\n")
    for k, items in bench.items():
        paths[k] = out / ("%s.jsonl" % k)
        with open(paths[k], "w") as f:
            for d in items:
                f.write(json.dumps(d) + "\n")
    with open(paths["corpus"], "w") as f:
        for line in _synth_corpus_lines(train_recs + test_recs, bench):
            f.write(line + "\n")
    return paths


def synth_main(argv=None):
    """CLI: `python data.py synth --out DIR --n-train N --n-test N --seed S --size PX`."""
    p = argparse.ArgumentParser(prog="data.py synth", description="write the synthetic aerial dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--records-per-image", type=int, default=7)
    p.add_argument("--multi-turn-prob", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.time()
    paths = write_synthetic_dataset(args.out, args.n_train, args.n_test, args.seed, args.size,
                                    args.records_per_image, args.multi_turn_prob, args.workers)
    print("wrote %d train + %d test images in %.1fs" % (args.n_train, args.n_test, time.time() - t0))
    for k, v in paths.items():
        print("  %-18s %s" % (k, v))
    return paths


def train_tokenizer(corpus, out_model, vocab_size=2000):
    """Train a Llama-style SentencePiece BPE tokenizer.model (bos 1, eos 2, unk 0, byte fallback) on a text file."""
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_model.with_suffix("")), model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", hard_vocab_limit=False, remove_extra_whitespaces=False, character_coverage=1.0,
        max_sentence_length=100000, minloglevel=2,
    )
    out_model.with_suffix(".vocab").unlink(missing_ok=True)
    return out_model


def tokenizer_main(argv=None):
    """CLI: `python data.py tokenizer --corpus corpus.txt --out tokenizer.model --vocab-size N`."""
    p = argparse.ArgumentParser(prog="data.py tokenizer", description="train a SentencePiece tokenizer.model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=2000)
    args = p.parse_args(argv)
    print(f"wrote {train_tokenizer(args.corpus, args.out, args.vocab_size)}")


if __name__ == "__main__":
    import sys

    commands = {"synth": synth_main, "tokenizer": tokenizer_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python data.py {{{','.join(commands)}}} ...")
    commands[sys.argv[1]](sys.argv[2:])
