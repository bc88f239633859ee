"""GeoChat data: images, tokenizer, prompts and the instruction-tuning dataset.

Everything the model sees before the first matmul lives here, written to reproduce the
reference (LLaVA-1.5 / GeoChat) byte for byte where it is right:

- images are padded to a square with the CLIP mean colour, resized to 504 with PIL bicubic
  and normalised with the CLIP mean/std (the reference's `expand2square` + CLIPImageProcessor);
- text is tokenised like the reference's slow HF LlamaTokenizer: the literal special-token strings
  split the text and every remaining piece is encoded by SentencePiece on its own; in legacy mode
  (HF's default) every piece gets the dummy prefix "▁", with `"legacy": false` in the checkpoint's
  tokenizer_config.json only the text's start does (after "</s>": "US" "ER", not "▁US" "ER");
- prompts follow the `llava_v1` (inference) and `vicuna_v1` (training) templates;
- boxes in prompts and answers are `{<x1><y1><x2><y2>|<θ>}` (format and geometry in boxes.py);
- training labels keep each assistant answer and its "</s>", computed on the very tokens of
  the full prompt (no "tokenization mismatch" that silently masks whole samples).
"""

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image, UnidentifiedImageError

from boxes import format_box
from geochat import IGNORE_INDEX, IMAGE_TOKEN_ID

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
    elif img.mode == "F":
        # 32-bit float (e.g. a reflectance GeoTIFF): PIL truncates 0..1 values to 0 (an all-black image)
        pixels = np.asarray(img, dtype=np.float64)  # (H, W)
        if not np.isfinite(pixels).all():
            raise ValueError("float image with NaN or infinite pixels")
        low, high = float(pixels.min()), float(pixels.max())
        if low >= 0.0 and high <= 1.0:
            pixels = pixels * 255.0
        elif low < 0.0 or high > 255.0:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]; expected 0-1 or 0-255: rescale it first")
        img = Image.fromarray(np.rint(pixels).astype(np.uint8), mode="L")
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


def read_legacy_flag(config_path):
    """tokenizer_config.json's `legacy` (HF's default, True, when the file or the field is absent)."""
    if not config_path.is_file():
        return True
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    legacy = config.get("legacy")
    if legacy is not None and not isinstance(legacy, bool):
        raise ValueError(f"{config_path}: 'legacy' must be true, false or null, got {legacy!r}")
    return True if legacy is None else legacy


NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"  # appended to a model's bytes: normalizer_spec { add_dummy_prefix: false } (protobuf merges it)


class Tokenizer:
    """SentencePiece tokenizer behaving like the reference's slow HF LlamaTokenizer (legacy or not)."""

    def __init__(self, model_path, legacy=None):
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
        self.legacy = read_legacy_flag(path.parent / "tokenizer_config.json") if legacy is None else legacy
        if not self.legacy:  # HF's non-legacy mode: no dummy prefix, "▁" only at the start of the text
            self.sp_plain = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes() + NO_DUMMY_PREFIX)
            self.unk_piece = self.sp.id_to_piece(self.unk_id)
            self.unk_length = len(self.sp_plain.encode(self.unk_piece))

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

    def encode_piece(self, text, opens_text=True):
        """Ids of text without special tokens; opens_text: it starts the text (not right after a special token).

        Legacy (the default, as HF's): every piece gets SentencePiece's dummy prefix "▁". Non-legacy: only
        the text's start gets "▁"; a piece right after "</s>" keeps its first character bare ("US" "ER").
        """
        if self.legacy:
            return self.sp.encode(text)
        text = ("▁" if opens_text else "") + text.replace("▁", " ")
        if text.startswith(("▁", " ")):  # HF's trick: encode after "<unk>" so the leading "▁" stays a piece of its own
            return self.sp_plain.encode(self.unk_piece + text)[self.unk_length:]
        return self.sp_plain.encode(text)

    def encode(self, text, bos=False, continuation=False):
        """Text -> ids; "<s>"/"</s>" in the text become BOS/EOS; continuation: the text follows a special token."""
        ids = [self.bos_id] if bos else []
        for start, end, special_id in self._split_special(text):
            ids.extend([special_id] if special_id is not None else
                       self.encode_piece(text[start:end], opens_text=start == 0 and not continuation))
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
VQA_SUFFIX = "Answer the question using a single word or phrase."  # after every VQA question, in training and GeoChat-Bench
DESCRIBE = "Describe the image in detail."
REFER_HEAD = "Give me the location of"
IDENTIFY_HEAD = "What is the object present at"
SCENE_HEAD = "Classify the given image in one of the following classes. Classes:"
SCENE_TAIL = " \nAnswer in one word or a short phrase."  # after the classes' "." (the bench files' space and newline)
# The words of the prompts that never change, each as the tokenizer sees it: with the space before it (at the text's
# start SentencePiece's dummy prefix is that space). `synthetic/prepare.py tokenizer --prompt-pieces` makes each one
# tokenizer piece, so that a baby model spends its compute on the words that carry the question.
FIXED_PROMPT_PHRASES = (" " + SYSTEM_LLAVA_V1, " " + SYSTEM_VICUNA_V1, VQA_SUFFIX, " " + DESCRIBE, " " + REFER_HEAD,
                        " " + IDENTIFY_HEAD, " " + SCENE_HEAD, SCENE_TAIL)


def task_prompt(task, question=None, classes=None, box=None, expression=None):
    """The user text GeoChat was tuned on for one task (without the "<image>\\n" prefix)."""
    if task == "grounding":
        return f"[grounding] {question or DESCRIBE}"
    if task == "caption":
        return question or DESCRIBE
    if task == "refer":
        if not expression:
            raise ValueError("task 'refer' needs expression= (the object to locate)")
        return f"[refer] {REFER_HEAD} <p> {expression} </p>"
    if task == "identify":
        if box is None:
            raise ValueError("task 'identify' needs box= (a Box or a '{<x1><y1><x2><y2>|<θ>}' string)")
        return f"[identify] {IDENTIFY_HEAD} {box if isinstance(box, str) else format_box(box)}"
    if task == "vqa":
        if not question:
            raise ValueError("task 'vqa' needs question=")
        return f"{question}\n{VQA_SUFFIX}"
    if task == "scene":  # the GeoChat-Bench scene files' wording (UCMerced, AID), space before the newline included
        if not classes:
            raise ValueError("task 'scene' needs classes= (a list of class names or a comma-separated string)")
        if question:
            raise ValueError("task 'scene' takes no question: its prompt is fixed, only the classes change")
        classes = classes if isinstance(classes, str) else ", ".join(classes)
        return f"{SCENE_HEAD} {classes}.{SCENE_TAIL}"
    if task == "chat":
        if not question:
            raise ValueError("task 'chat' needs question=")
        return question
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


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
            opens_text = start == 0  # each chunk between images is a tokenizer call of its own, as in the reference
            start, end = chunk_start + start, chunk_start + end  # positions in the prompt
            if special_id is not None:
                input_ids.append(special_id)
                labels.append(special_id if in_answer(start) else IGNORE_INDEX)
                continue
            ids = tokenizer.encode_piece(prompt[start:end], opens_text)
            answer_start = next((max(s, start) for s, e in answer_spans if s < end and e > start), None)
            if answer_start is None:
                n_prompt = len(ids)
            elif answer_start == start:
                n_prompt = 0
            else:  # the piece holds the end of the user part and the start of an answer
                n_prompt = _longest_common_prefix(ids, tokenizer.encode_piece(prompt[start:answer_start], opens_text))
            input_ids.extend(ids)
            labels.extend([IGNORE_INDEX] * n_prompt + ids[n_prompt:])
        chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return input_ids, labels


SKIP_REASONS = ("missing_image", "corrupt_image", "image_cut_by_max_length", "no_answer_tokens_left")  # InstructDataset.skipped's keys


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

    def text_lengths(self) -> list[int]:
        """Characters of each record's turns: a proxy of its token count that needs no tokenizing (for grouping)."""
        return [sum(len(str(turn.get("value", ""))) for turn in record["conversations"]) for record in self.records]

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
            except FileNotFoundError:
                self.skipped["missing_image"] += 1
                return None
            except ValueError:
                self.skipped["corrupt_image"] += 1
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
    """Deterministic (seed, epoch) order, padded to a multiple of world_size, rank takes every world_size-th index.

    With `lengths` and `group_size`, each run of group_size indices of the order is sorted longest first (transformers'
    group_by_length): consecutive samples, and so the samples of a batch, have similar lengths and little padding."""

    def __init__(self, dataset_len, rank, world_size, seed, shuffle=True, lengths=None, group_size=0):
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if lengths is not None and len(lengths) != dataset_len:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {dataset_len}")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.lengths, self.group_size = lengths, group_size
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
        if self.lengths is not None and self.group_size > 1:
            indices = [i for start in range(0, len(indices), self.group_size)
                       for i in sorted(indices[start:start + self.group_size], key=lambda i: -self.lengths[i])]
        total = self.num_samples * self.world_size
        indices = (indices * math.ceil(total / self.dataset_len))[:total]  # pad by repeating from the start
        return indices[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index
