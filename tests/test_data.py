"""Tests for data.py: images, tokenizer, prompts, boxes, training labels, dataset, collate, sampler."""

import io
import json
import pickle
import random
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from boxes import Box
from data import (CLIP_MEAN, CLIP_STD, SYSTEM_LLAVA_V1, SYSTEM_VICUNA_V1, InstructDataset, ShardedSampler, Tokenizer,
                  build_prompt, collate, encode_conversation, load_image, pad_to_square, preprocess_image, task_prompt)
from geochat import IGNORE_INDEX, IMAGE_TOKEN_ID


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


# -----------------------------------------------------------------------------
# constants and images


def test_clip_normalisation_and_pad_colour_match_transformers():
    image_utils = pytest.importorskip("transformers.image_utils")
    assert CLIP_MEAN == tuple(image_utils.OPENAI_CLIP_MEAN) and CLIP_STD == tuple(image_utils.OPENAI_CLIP_STD)
    assert data.PAD_COLOR == tuple(int(m * 255) for m in image_utils.OPENAI_CLIP_MEAN)  # the reference's expand2square fill


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("hello, not pixels")
    with pytest.raises(ValueError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        random_image(96, 96, seed=1).save(buffer, fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(ValueError, match=rf"cut\.{fmt.lower()}: truncated or corrupt image"):
            load_image(path)


def test_load_image_modes(tmp_path):
    rgb = random_image(7, 5, seed=2)
    for mode in ("RGBA", "L", "LA", "CMYK", "1", "RGB"):
        img = load_image(save(rgb.convert(mode), tmp_path / f"{mode}.tiff"))
        assert img.mode == "RGB" and img.size == (7, 5)
        assert np.array_equal(np.asarray(img), np.asarray(rgb.convert(mode).convert("RGB")))  # as PIL does
    # 16-bit grayscale is scaled to 8 bits instead of PIL's clamp to white
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = load_image(save(Image.fromarray(sixteen), tmp_path / "gray16.png"))
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    assert np.asarray(img)[0, :, 0].tolist() == [0, 100, 255]
    # 32-bit float TIFFs (reflectance 0-1, or 0-255) are scaled, not truncated to black; other ranges are refused
    reflectance = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    img = load_image(save(Image.fromarray(reflectance, mode="F"), tmp_path / "float01.tif"))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]
    img = load_image(save(Image.fromarray(reflectance * 200, mode="F"), tmp_path / "float255.tif"))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 100, 200]
    for name, values, message in (("nan.tif", [[0.0, np.nan]], "NaN or infinite"), ("dn.tif", [[0.0, 4000.0]], "expected 0-1 or 0-255")):
        path = save(Image.fromarray(np.array(values, dtype=np.float32), mode="F"), tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: float image with .*{message}"):
            load_image(path)
    # palette with transparency: the palette colours, no warning
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save(palette, tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(tmp_path / "p.png")
    assert np.array_equal(np.asarray(img), np.asarray(palette.convert("RGB")))
    # 1-pixel-wide and 1-pixel-high
    assert load_image(save(random_image(1, 9), tmp_path / "thin.png")).size == (1, 9)
    assert load_image(save(random_image(9, 1), tmp_path / "flat.jpg")).size == (9, 1)


def test_pad_to_square():
    for width, height in [(10, 4), (4, 10), (1, 6), (6, 1), (5, 8), (8, 5)]:
        img = random_image(width, height, seed=width)
        square = pad_to_square(img)
        side = max(width, height)
        assert square.size == (side, side) and square.mode == "RGB"
        x0, y0 = (side - width) // 2, (side - height) // 2
        pixels = np.asarray(square)
        assert np.array_equal(pixels[y0:y0 + height, x0:x0 + width], np.asarray(img))
        mask = np.ones((side, side), bool)
        mask[y0:y0 + height, x0:x0 + width] = False
        assert (pixels[mask] == (122, 116, 104)).all()
    img = random_image(6, 6)
    assert pad_to_square(img) is img
    assert pad_to_square(img.convert("L")).mode == "RGB"


@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    from transformers.image_utils import PILImageResampling

    def make(size):
        processor = transformers.CLIPImageProcessorPil(
            do_resize=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            do_center_crop=True, resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
        assert processor.backend == "pil"  # resizes with PIL, as the reference's slow processor did
        return processor
    return make


def reference_expand2square(pil_img, background_color):
    """Port of the reference's mm_utils.expand2square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def reference_pixels(processor, img):
    """The reference: convert("RGB"), expand2square with the mean colour, then CLIPImageProcessor.preprocess."""
    square = reference_expand2square(img.convert("RGB"), tuple(int(x * 255) for x in processor.image_mean))
    return processor(square, return_tensors="pt")["pixel_values"][0]


def test_preprocess_matches_hf_clip_processor(clip_processor):
    processor = clip_processor(504)
    for i, (width, height) in enumerate([(64, 64), (120, 50), (50, 120), (1, 40), (40, 1), (333, 517)]):
        img = random_image(width, height, seed=i)
        pixels = preprocess_image(img)
        assert pixels.shape == (3, 504, 504) and pixels.dtype == torch.float32
        assert torch.allclose(pixels, reference_pixels(processor, img).float(), atol=2e-3)
    small = random_image(30, 20, mode="RGBA", seed=9)
    assert torch.allclose(preprocess_image(small, size=56), reference_pixels(clip_processor(56), small).float(),
                          atol=2e-3)
    # the padding colour normalises to ~0 (not exactly: int() truncates the mean colour)
    assert preprocess_image(random_image(1, 40))[:, 0, 0].abs().max() < 0.02


def test_preprocess_real_examples(clip_processor, examples_dir):
    processor = clip_processor(504)
    paths = sorted(p for p in examples_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:2]
    assert paths
    for path in paths:
        img = load_image(path)
        img = img.crop((0, 0, img.width, img.height * 2 // 3))  # non-square: exercise the padding
        assert torch.allclose(preprocess_image(img), reference_pixels(processor, img).float(), atol=2e-3)


# -----------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tokenizer(sp_model_path):
    return Tokenizer(sp_model_path)


def hf_llama_tokenizer(sp_model_path, legacy):
    """HF LlamaTokenizer built from the same SentencePiece model (vocab + BPE merges, no protobuf)."""
    transformers = pytest.importorskip("transformers")
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True,
                                       add_eos_token=False)


@pytest.fixture(scope="module")
def hf_tokenizer(sp_model_path):
    return hf_llama_tokenizer(sp_model_path, legacy=True)


@pytest.fixture(scope="module")
def hf_tokenizer_non_legacy(sp_model_path):
    return hf_llama_tokenizer(sp_model_path, legacy=False)


def reference_tokenizer_image_token(prompt, tokenizer):
    """Port of the reference's mm_utils.tokenizer_image_token (returns a list)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    separated = [e for sub in zip(prompt_chunks, [[IMAGE_TOKEN_ID] * (offset + 1)] * len(prompt_chunks))
                 for e in sub][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def space_after_special(text):
    """True when some piece between special tokens starts with a space: HF 5 and slow legacy differ there."""
    return any(piece.startswith(" ") for piece in re.split(r"<s>|</s>|<unk>|<image>", text))


QUESTIONS = [
    "What is in the image?",
    "How many planes are there?\nCount them carefully.",
    "Is there a building near the road at {<12><34><56><78>|<45>}? Answer 1, 22 or 333.",
    "[identify] What is the object present at {<0><0><100><100>}",
    "line one\n\nline two\twith a tab, digits 2024 and ünïcode 中文",
    "text with a literal </s> inside and <s> and <unk> too",
    "ends with the end token</s>",
    "<p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>}",
]


def test_tokenizer_basics(tokenizer, sp_model_path, tmp_path):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.vocab_size == 400
    assert Tokenizer(sp_model_path.parent).vocab_size == 400  # a directory holding tokenizer.model
    assert tokenizer.encode("") == [] and tokenizer.encode("", bos=True) == [1]
    assert tokenizer.encode("hi", bos=True)[0] == 1
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer(tmp_path / "nothing.model")
    (tmp_path / "junk.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    clone = pickle.loads(pickle.dumps(tokenizer))  # DataLoader workers need this
    assert clone.encode(QUESTIONS[2]) == tokenizer.encode(QUESTIONS[2])


def test_encode_matches_hf_llama_tokenizer(tokenizer, hf_tokenizer):
    texts = QUESTIONS + [SYSTEM_LLAVA_V1, SYSTEM_VICUNA_V1, "USER: hi</s>USER: again</s><s>x"]
    for question in QUESTIONS:
        texts.append(build_prompt([("<image>\n" + question, None)], "llava_v1").replace("<image>", ""))
    random.seed(0)
    alphabet = list("abcdefghijXYZ0123456789 <>{}|.,:?\n\t'[]/-_é") + ["</s>", "<s>", "<unk>", "<p>", "ASSISTANT: "]
    texts += ["".join(random.choice(alphabet) for _ in range(random.randint(0, 40))) for _ in range(400)]
    checked = 0
    for text in texts:
        if space_after_special(text):
            continue
        assert tokenizer.encode(text, bos=True) == hf_tokenizer(text).input_ids, text
        checked += 1
    assert checked > 200


def test_encode_after_special_token_matches_slow_legacy(tokenizer):
    """HF 5's Metaspace does not double the dummy prefix of a piece starting with a space; the slow legacy
    tokenizer (the reference) ran sp.encode on every piece, which does. We follow the reference."""
    sp = tokenizer.sp
    text = "  two spaces</s> one space<s>  x"
    expected = sp.encode("  two spaces") + [2] + sp.encode(" one space") + [1] + sp.encode("  x")
    assert tokenizer.encode(text) == expected
    assert tokenizer.encode(" x")[:2] == [sp.piece_to_id("▁"), sp.piece_to_id("▁")]  # "▁▁x": doubled prefix


def test_legacy_flag_follows_hf_on_multi_turn_text(sp_model_path, tmp_path, hf_tokenizer, hf_tokenizer_non_legacy):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    turns = [("<image>\nHow many planes are there?", "2"), ("Is there a road?", "Yes"), ("[grounding] Describe it.", None)]
    prompt = build_prompt(turns, "vicuna_v1").replace("<image>", "")
    texts = [prompt, "ok</s>USER: again</s>ASSISTANT: x", "</s>USER", "x<s>y</s>z"]  # no space after a special token:
    # there HF 5's tokenizer and the slow one the reference used differ (see the test below)
    for legacy, hf in ((True, hf_tokenizer), (False, hf_tokenizer_non_legacy)):
        (folder / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "model_max_length": 2048}))
        ours = Tokenizer(folder)
        assert ours.legacy is legacy
        for text in texts:
            assert ours.encode(text, bos=True) == hf(text).input_ids, (legacy, text)
        # training labels are computed on the very same ids
        conversation = [{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                        for i, v in enumerate(["<image>\nHow many planes are there?", "2", "Is there a road?", "Yes"])]
        input_ids, _ = encode_conversation(ours, conversation)
        assert input_ids == ours.encode_prompt(build_prompt(data._conversation_turns(conversation), "vicuna_v1"))
    differs = Tokenizer(folder, legacy=True).encode(prompt) != Tokenizer(folder, legacy=False).encode(prompt)
    assert differs  # multi-turn text tells the two modes apart (after "</s>")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    assert Tokenizer(folder).legacy is True  # HF's default when the field is absent
    (folder / "tokenizer_config.json").write_text(json.dumps({"legacy": "no"}))
    with pytest.raises(ValueError, match="'legacy' must be true, false or null"):
        Tokenizer(folder)


def test_encode_prompt_matches_reference(tokenizer, hf_tokenizer):
    prompts = []
    for question in QUESTIONS:
        prompts.append(build_prompt([("<image>\n" + question, None)], "llava_v1"))
        prompts.append(build_prompt([("<image>\n" + question, "An answer."), ("And then?", None)], "vicuna_v1"))
    prompts += ["<image>", "<image>\nwhat", "no image at all", "two<image>images<image>", ""]
    for prompt in prompts:
        ids = tokenizer.encode_prompt(prompt)
        assert ids[0] == 1 and ids.count(IMAGE_TOKEN_ID) == prompt.count("<image>")
        if not space_after_special(prompt):
            assert ids == reference_tokenizer_image_token(prompt, hf_tokenizer), prompt


def test_decode(tokenizer):
    text = "How many planes? 12 {<8><82><16><90>|<69>}\nünïcode 中文"
    ids = tokenizer.encode_prompt("<image>\n" + text + "</s>")
    assert tokenizer.decode(ids) == "\n" + text
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(torch.tensor(tokenizer.encode("a b"))) == "a b"


# -----------------------------------------------------------------------------
# prompts


def reference_get_prompt(system, messages):
    """Port of the reference's Conversation.get_prompt for SeparatorStyle.TWO (sep " ", sep2 "</s>")."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def test_build_prompt_matches_reference():
    cases = [
        [("<image>\nWhat is this?", None)],
        [("<image>\nWhat is this?", "A plane.")],
        [("<image>\nWhat is this?", "A plane."), ("How many?", "Two."), ("Where?", None)],
    ]
    for template, system in (("llava_v1", SYSTEM_LLAVA_V1), ("vicuna_v1", SYSTEM_VICUNA_V1)):
        for turns in cases:
            messages = [m for user, assistant in turns for m in (("USER", user), ("ASSISTANT", assistant))]
            assert build_prompt(turns, template) == reference_get_prompt(system, messages)
    assert build_prompt([("<image>\nQ", None)]) == SYSTEM_LLAVA_V1 + " USER: <image>\nQ ASSISTANT:"
    assert build_prompt([("Q1", "A1"), ("Q2", None)], "vicuna_v1") == \
        SYSTEM_VICUNA_V1 + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert "curious human" in SYSTEM_LLAVA_V1 and "the user's questions" in SYSTEM_VICUNA_V1


def test_build_prompt_errors():
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_prompt([("Q", None)], "llama_2")
    with pytest.raises(ValueError, match="at least one"):
        build_prompt([])
    with pytest.raises(ValueError, match="only the last turn"):
        build_prompt([("Q1", None), ("Q2", None)])
    with pytest.raises(ValueError, match="user text"):
        build_prompt([("", "A")])
    with pytest.raises(ValueError, match="pair"):
        build_prompt(["just a string"])


def test_task_prompts():
    assert task_prompt("grounding") == "[grounding] Describe the image in detail."
    assert task_prompt("caption") == "Describe the image in detail."
    assert task_prompt("refer", expression="the red car") == "[refer] Give me the location of <p> the red car </p>"
    assert task_prompt("identify", box=Box(12, 34, 56, 78, 45)) == \
        "[identify] What is the object present at {<12><34><56><78>|<45>}"
    assert task_prompt("identify", box="{<1><2><3><4>|<0>}").endswith("at {<1><2><3><4>|<0>}")
    assert task_prompt("vqa", question="Is there a road?") == \
        "Is there a road?\nAnswer the question using a single word or phrase."
    assert task_prompt("scene", classes=["airport", "beach"]) == (  # GeoChat-Bench's scene files, byte for byte
        "Classify the given image in one of the following classes. Classes: airport, beach. \n"
        "Answer in one word or a short phrase.")
    with pytest.raises(ValueError, match="takes no question"):
        task_prompt("scene", question="What is it?", classes="a, b")
    assert task_prompt("chat", question="Hello?") == "Hello?"
    for task, match in [("refer", "expression"), ("identify", "box"), ("vqa", "question"), ("scene", "classes"),
                        ("chat", "question"), ("segment", "unknown task")]:
        with pytest.raises(ValueError, match=match):
            task_prompt(task)


# -----------------------------------------------------------------------------
# training labels


def reference_preprocess_v1(prompt, tokenizer, has_image):
    """Port of the reference's preprocess_v1 masking for one prompt (returns input_ids, labels or None)."""
    tok = (lambda text: reference_tokenizer_image_token(text, tokenizer)) if has_image else \
        (lambda text: tokenizer(text).input_ids)
    input_ids = tok(prompt)
    target = list(input_ids)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX]
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len = len(tok(rou))
        instruction_len = len(tok(parts[0])) - 2
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    return (input_ids, target) if cur_len == len(input_ids) else None  # None: "tokenization mismatch"


def random_conversation(rng, with_image):
    words = ["the", "plane", "airport", "car", "12", "3", "Yes", "No", "{<8><82><16><90>|<69>}", "<p>ship</p>",
             "building,", "road.", "\n", "how", "many", "?", "[grounding]", "urban"]

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))).strip() or "x"
    turns = []
    for r in range(rng.randint(1, 3)):
        question = sentence()
        if with_image and r == 0:
            question = rng.choice(["<image>\n" + question, question + "\n<image>", "<image>" + question])
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence()}]
    return turns


def test_encode_conversation_equals_full_prompt_and_reference(tokenizer, hf_tokenizer):
    rng = random.Random(0)
    compared = 0
    for n in range(150):
        with_image = n % 3 != 0
        conversation = random_conversation(rng, with_image)
        input_ids, labels = encode_conversation(tokenizer, conversation)
        turns = data._conversation_turns(conversation)
        prompt = build_prompt(turns, "vicuna_v1")
        assert input_ids == tokenizer.encode_prompt(prompt)
        assert len(labels) == len(input_ids)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, input_ids))
        assert labels.count(tokenizer.eos_id) == len(turns)  # every answer's "</s>" is trained
        if not space_after_special(prompt):
            reference = reference_preprocess_v1(prompt, hf_tokenizer, with_image)
            assert reference is not None, "the reference mismatched: the port or the prompt is wrong"
            assert (input_ids, labels) == reference
            compared += 1
    assert compared > 100


def test_encode_conversation_trains_exactly_the_answers(tokenizer):
    conversation = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A plane."},
                    {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2 {<1><2><3><4>|<5>}"}]
    input_ids, labels = encode_conversation(tokenizer, conversation)
    sp = tokenizer.sp
    prompt = (SYSTEM_VICUNA_V1 + " USER: <image>\nWhat is it? ASSISTANT: A plane.</s>"
              "USER: How many? ASSISTANT: 2 {<1><2><3><4>|<5>}</s>")
    assert input_ids == tokenizer.encode_prompt(prompt)  # "<image>" moved to the front, as the reference does
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert trained == sp.encode("A plane.") + [2] + sp.encode("2 {<1><2><3><4>|<5>}") + [2]
    # each answer is one contiguous run ending with its </s>, right after "ASSISTANT:"
    runs = [m.span() for m in re.finditer(r"1+", "".join("1" if x != IGNORE_INDEX else "0" for x in labels))]
    assert len(runs) == 2
    for start, end in runs:
        assert input_ids[end - 1] == 2 and tokenizer.decode(input_ids[:start]).endswith("ASSISTANT:")
    assert labels[input_ids.index(IMAGE_TOKEN_ID)] == IGNORE_INDEX
    # llava_v1 template gives the same answer labels
    _, labels_llava = encode_conversation(tokenizer, conversation, "llava_v1")
    assert [x for x in labels_llava if x != IGNORE_INDEX] == trained


def test_encode_conversation_with_special_strings_in_text(tokenizer):
    conversation = [{"from": "human", "value": "<image>\nSay </s> please <s>"},
                    {"from": "gpt", "value": "Here: </s> and <unk> done"},
                    {"from": "human", "value": " leading space"}, {"from": "gpt", "value": " 7"}]
    input_ids, labels = encode_conversation(tokenizer, conversation, "llava_v1")
    prompt = build_prompt(data._conversation_turns(conversation), "llava_v1")
    assert input_ids == tokenizer.encode_prompt(prompt)
    trained = [label for label in labels if label != IGNORE_INDEX]
    sp = tokenizer.sp

    def tail(text, prefix):  # tokens of text after those of prefix, both encoded as one piece
        assert sp.encode(text)[:len(sp.encode(prefix))] == sp.encode(prefix)
        return sp.encode(text)[len(sp.encode(prefix)):]
    assert trained == (tail(" ASSISTANT: Here: ", " ASSISTANT:") + [2] + sp.encode(" and ") + [0] +
                       sp.encode(" done") + [2] + tail("USER:  leading space ASSISTANT:  7",
                                                       "USER:  leading space ASSISTANT:") + [2])
    assert trained.count(2) == 3  # the literal "</s>" inside the answer is part of the answer


def test_encode_conversation_bad_records(tokenizer):
    good = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    bad = {
        "non-empty list": [],
        "expected 'human'": [{"from": "system", "value": "S"}] + good,
        "expected 'gpt'": [good[0], good[0]],
        "ends with a human turn": good + [good[0]],
        "empty or non-string": [good[0], {"from": "gpt", "value": ""}],
        "is not a": [good[0], "A"],
    }
    for match, conversation in bad.items():
        with pytest.raises(ValueError, match=match):
            encode_conversation(tokenizer, conversation)


# -----------------------------------------------------------------------------
# dataset, collate, sampler


def make_dataset(tmp_path, records, **kwargs):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    random_image(30, 20, seed=3).save(folder / "a.png")
    random_image(16, 16, seed=4).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    kwargs = dict(image_size=28, max_length=200, n_image_tokens=4) | kwargs
    return InstructDataset(path, folder, kwargs.pop("tokenizer"), **kwargs)


def record(image=None, question="<image>\nWhat is this?", answer="A plane.", **extra):
    rec = {"id": extra.pop("id", "r"), "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec | extra


def test_dataset_items(tmp_path, tokenizer):
    records = [record(" a.png \n"), record("b.jpg"), record(None, question="Text only?")]
    dataset = make_dataset(tmp_path, records, tokenizer=tokenizer)
    assert len(dataset) == 3
    item = dataset[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
    assert item["image"].shape == (3, 28, 28)
    expected_ids, expected_labels = encode_conversation(tokenizer, records[0]["conversations"])
    assert item["input_ids"].tolist() == expected_ids and item["labels"].tolist() == expected_labels
    assert torch.equal(item["image"], preprocess_image(load_image(tmp_path / "images" / "a.png"), 28))
    assert dataset[2]["image"] is None and IMAGE_TOKEN_ID not in dataset[2]["input_ids"].tolist()
    assert not dataset.skipped


def test_dataset_skips_missing_and_corrupt_images(tmp_path, tokenizer):
    dataset = make_dataset(tmp_path, [record("nope.png"), record("broken.png"), record("a.png")],
                           tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted per reason, never warned one record at a time
        assert dataset[0] is None and dataset[1] is None
    assert dataset[2] is not None
    assert dataset.skipped == {"missing_image": 1, "corrupt_image": 1}


def test_dataset_truncation(tmp_path, tokenizer):
    long_answer = " ".join(["the plane is at the airport"] * 40)
    prompt_len = len(tokenizer.encode_prompt(build_prompt([("<image>\nWhat is this?", None)], "vicuna_v1")))
    max_length = prompt_len + 9 + 20  # room for the image (10 tokens for 1 placeholder) and 20 answer tokens
    dataset = make_dataset(tmp_path, [record("a.png", answer=long_answer), record("a.png", question="Q <image>"),
                                      record(None, question="Text only?", answer=long_answer)],
                           tokenizer=tokenizer, max_length=max_length, n_image_tokens=10)
    full_ids, full_labels = encode_conversation(tokenizer, dataset.records[0]["conversations"])
    assert len(full_ids) - 1 + 10 > max_length
    item = dataset[0]
    assert len(item["input_ids"]) - 1 + 10 == max_length  # spliced length exactly max_length
    assert item["input_ids"].tolist() == full_ids[:max_length - 9]
    assert item["labels"].tolist() == full_labels[:max_length - 9]
    assert (item["labels"] != IGNORE_INDEX).sum() == 20
    assert len(dataset[1]["input_ids"]) < max_length - 9  # short: untouched
    assert len(dataset[2]["input_ids"]) == max_length
    # the placeholder itself would be cut
    tight = make_dataset(tmp_path, [record("a.png")], tokenizer=tokenizer, max_length=30, n_image_tokens=30)
    assert tight[0] is None and tight.skipped == {"image_cut_by_max_length": 1}
    # the answer is entirely cut off: nothing to learn
    no_answer = make_dataset(tmp_path, [record("a.png")], tokenizer=tokenizer, max_length=prompt_len,
                             n_image_tokens=1)
    assert no_answer[0] is None and no_answer.skipped == {"no_answer_tokens_left": 1}


def test_dataset_bad_input(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        InstructDataset(tmp_path / "missing.json", tmp_path, tokenizer)
    path = tmp_path / "bad.json"
    for content, match in [("{not json", "bad.json: invalid JSON"), ('{"a": 1}', "expected a JSON list"),
                           ("[]", "empty")]:
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            InstructDataset(path, tmp_path, tokenizer)
    cases = [
        ({"id": "x"}, r"record 0 \(id 'x'\): no 'conversations'"),
        (record("a.png", id="y") | {"conversations": [{"from": "gpt", "value": "A"}]}, r"record 0 \(id 'y'\).*human"),
        (record("../outside.png"), "outside the image folder"),
        (record("/etc/passwd"), "outside the image folder"),
        (record("a.png", question="no placeholder"), "exactly one"),
        (record("a.png", question="<image> twice <image>"), "exactly one"),
        (record(None), "without 'image'"),
        (record("a.png", answer="see <image>"), "assistant turn"),
        (record("   "), "non-empty file name"),
        ("just a string", "expected an object"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            make_dataset(tmp_path, [record("a.png"), bad][1:], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="record 1"):
        make_dataset(tmp_path, [record("a.png"), record("a.png", question="none")], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no image_folder"):
        path.write_text(json.dumps([record("a.png")]))
        InstructDataset(path, None, tokenizer)


def test_collate(tokenizer):
    items = [dict(input_ids=torch.tensor([1, 5, IMAGE_TOKEN_ID, 7]), labels=torch.tensor([-100, -100, -100, 7]),
                  image=torch.zeros(3, 4, 4)),
             None,
             dict(input_ids=torch.tensor([1, 9]), labels=torch.tensor([-100, 9]), image=None),
             dict(input_ids=torch.tensor([1, IMAGE_TOKEN_ID, 8]), labels=torch.tensor([-100, -100, 8]),
                  image=torch.ones(3, 4, 4))]
    batch = collate(items, pad_id=tokenizer.pad_id)
    assert batch["input_ids"].tolist() == [[1, 5, IMAGE_TOKEN_ID, 7], [1, 9, 0, 0], [1, IMAGE_TOKEN_ID, 8, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7], [-100, 9, -100, -100], [-100, -100, 8, -100]]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]
    assert batch["images"].shape == (2, 3, 4, 4) and batch["images"][1].eq(1).all()
    assert collate([items[2]], pad_id=0)["images"] is None
    assert collate([None, None], pad_id=0) is None


def test_collate_with_dataloader(tmp_path, tokenizer):
    import functools
    dataset = make_dataset(tmp_path, [record("a.png"), record("nope.png"), record(None, question="T?")],
                           tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=functools.partial(
        collate, pad_id=tokenizer.pad_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and batch["images"].shape == (1, 3, 28, 28)


def test_sharded_sampler():
    samplers = [ShardedSampler(10, rank, 4, seed=7) for rank in range(4)]
    assert [len(s) for s in samplers] == [3, 3, 3, 3]
    shards = [list(s) for s in samplers]
    everything = sum(shards, [])
    assert sorted(set(everything)) == list(range(10)) and len(everything) == 12
    assert list(ShardedSampler(10, 0, 4, seed=7)) == shards[0]  # deterministic
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != shards[0]
    first_epoch_one = list(samplers[0])
    samplers[0].set_epoch(1, start_index=2)  # resume
    assert list(samplers[0]) == first_epoch_one[2:] and len(samplers[0]) == 1
    samplers[0].set_epoch(1)
    assert list(samplers[0]) == first_epoch_one
    ordered = [list(ShardedSampler(5, rank, 2, seed=0, shuffle=False)) for rank in range(2)]
    assert ordered == [[0, 2, 4], [1, 3, 0]]  # padded by repeating from the start
    assert sorted(sum((list(ShardedSampler(1, r, 3, seed=0)) for r in range(3)), [])) == [0, 0, 0]
    for args in [(0, 0, 1, 0), (5, 2, 2, 0), (5, -1, 2, 0), (5, 0, 0, 0)]:
        with pytest.raises(ValueError):
            ShardedSampler(*args)
    with pytest.raises(ValueError, match="start_index"):
        samplers[1].set_epoch(0, start_index=4)


def test_sharded_sampler_groups_by_length():
    """lengths + group_size: each run of group_size indices of the same shuffled order is sorted longest first, so a
    batch spans a narrow range of lengths; every epoch is still a permutation, and ranks split it as before."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (400,), generator=gen).tolist()
    plain = ShardedSampler(400, 0, 1, seed=3)
    grouped = ShardedSampler(400, 0, 1, seed=3, lengths=lengths, group_size=96)  # six batches of 16 a run
    order, base = list(grouped), list(plain)
    assert sorted(order) == list(range(400))
    for start in range(0, 400, 96):  # the same samples in each run, longest first
        run = order[start:start + 96]
        assert sorted(run) == sorted(base[start:start + 96])
        assert [lengths[i] for i in run] == sorted((lengths[i] for i in run), reverse=True)

    def spread(indices, batch=16):  # mean max-min length within batches
        chunks = [indices[a:a + batch] for a in range(0, len(indices) - batch + 1, batch)]
        return sum(max(lengths[i] for i in c) - min(lengths[i] for i in c) for c in chunks) / len(chunks)

    assert spread(order) < 0.3 * spread(base)
    ranks = [list(ShardedSampler(400, r, 2, seed=3, lengths=lengths, group_size=96)) for r in range(2)]
    assert ranks == [order[0::2], order[1::2]]
    with pytest.raises(ValueError, match="lengths"):
        ShardedSampler(400, 0, 1, seed=3, lengths=lengths[:10], group_size=96)
