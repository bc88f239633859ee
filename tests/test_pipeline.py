"""End to end through the training input pipeline: every sample is trained with its own image.

Each record's image is a solid colour that encodes the record's index and its answer says the same
index, so a batch row can be traced back to its record twice, through its text and through the
image features spliced into it. Checked for batches of images mixed with text-only and multi-turn
records, the dummy image row that FSDP ranks add, DataLoader workers against the main process, and
training's preprocessing against inference's.
"""

import argparse
import json

import pytest
import torch
from PIL import Image

import data
import train
from geochat import IMAGE_TOKEN_ID, GeoChat, GeoChatConfig
from llama import LlamaConfig
from vit import ViTConfig

N_RECORDS = 24
IMAGE_SIZE = 32


def colour(i: int) -> tuple:
    """The solid colour of record i's image: distinct for every index."""
    return (10 * i, 250 - 10 * i, 60 + 5 * i)


def record(i: int) -> dict:
    """Record i: text-only when i % 4 == 3, two turns when i % 4 == 1, otherwise one; answers name i."""
    if i % 4 == 3:
        return {"id": str(i), "conversations": [{"from": "human", "value": "Say the number."},
                                                {"from": "gpt", "value": f"number {i}"}]}
    conv = [{"from": "human", "value": "<image>\nWhich image is this?"}, {"from": "gpt", "value": f"image {i}"}]
    if i % 4 == 1:
        conv += [{"from": "human", "value": "Again?"}, {"from": "gpt", "value": f"image {i}"}]
    return {"id": str(i), "image": f"img_{i}.png", "conversations": conv}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sp_model_path):
    """A dataset of N_RECORDS traceable records with non-square images (so padding to square happens)."""
    root = tmp_path_factory.mktemp("pipeline")
    for i in range(N_RECORDS):
        Image.new("RGB", (40, 28) if i % 2 else (28, 40), colour(i)).save(root / f"img_{i}.png")
    (root / "train.json").write_text(json.dumps([record(i) for i in range(N_RECORDS)]))
    tokenizer = data.Tokenizer(sp_model_path)
    return data.InstructDataset(root / "train.json", root, tokenizer, image_size=IMAGE_SIZE, max_length=256,
                                n_image_tokens=4)


def row_record(tokenizer, labels: torch.Tensor) -> int:
    """The record index a batch row was made from, read from its labelled answer text."""
    text = tokenizer.decode([t for t in labels.tolist() if t != data.IGNORE_INDEX and t != tokenizer.eos_id])
    numbers = {int(word) for word in text.replace("</s>", " ").split() if word.isdigit()}
    assert len(numbers) == 1, text
    return numbers.pop()


def trace_batches(dataset, workers: int, steps: int = 3, group_by_length: bool = False):
    """Record indices per micro-batch row of the first steps, checking each image against its row."""
    args = argparse.Namespace(global_batch=8, batch_size=4, num_workers=workers, seed=0, device="cpu",
                              group_by_length=group_by_length)
    tokenizer = dataset.tokenizer
    rows = []
    batches = train.micro_batches(dataset, args, rank=0, world=1, epoch=0, step_in_epoch=0,
                                  steps_per_epoch=N_RECORDS // 8, pad_id=tokenizer.pad_id)
    for _ in range(steps * 2):
        batch, n_asked, skips = next(batches)
        assert n_asked == 4 and not skips
        rows.append([row_record(tokenizer, batch["labels"][b]) for b in range(batch["input_ids"].shape[0])])
        image_rows = [b for b in range(batch["input_ids"].shape[0]) if IMAGE_TOKEN_ID in batch["input_ids"][b]]
        if not image_rows:  # a micro-batch of text-only samples (length grouping gathers them) carries no images
            assert batch["images"] is None
            continue
        assert batch["images"].shape[0] == len(image_rows)
        for k, b in enumerate(image_rows):
            i = rows[-1][b]
            expected = data.preprocess_image(data.load_image(dataset.image_paths[i]), IMAGE_SIZE)
            assert torch.equal(batch["images"][k], expected), f"row {b} (record {i}) got another record's image"
    return rows


def test_every_row_gets_its_own_image_in_the_main_process_and_in_workers(dataset):
    in_process = trace_batches(dataset, workers=0)
    assert sorted(i for micro in in_process for i in micro) == list(range(N_RECORDS))  # one epoch, each once
    assert trace_batches(dataset, workers=2) == in_process


def test_rows_keep_their_images_when_batches_are_grouped_by_length(dataset):
    grouped = trace_batches(dataset, workers=0, group_by_length=True)
    assert sorted(i for micro in grouped for i in micro) == list(range(N_RECORDS))  # still one epoch, each once
    assert trace_batches(dataset, workers=2, group_by_length=True) == grouped


def tiny_model() -> GeoChat:
    cfg = GeoChatConfig(vision=ViTConfig(image_size=IMAGE_SIZE, patch_size=16, width=32, n_layers=2, n_heads=2,
                                         mlp_dim=64),
                        llm=LlamaConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, intermediate_size=64,
                                        max_seq_len=256),
                        image_size=IMAGE_SIZE)
    model = GeoChat(cfg)
    train.init_weights(model, seed=0)
    return model.eval()


@torch.no_grad()
def test_spliced_features_are_the_rows_own_image_with_a_dummy_row(dataset):
    model = tiny_model()
    tokenizer = dataset.tokenizer
    text_only = [dataset[i] for i in (3, 7)]  # a batch without images gets the FSDP dummy image row
    image_batch = data.collate([dataset[i] for i in (0, 3, 5, 6)], tokenizer.pad_id)
    for batch in (image_batch, train.with_image(data.collate(text_only, tokenizer.pad_id), tokenizer.bos_id,
                                                tokenizer.pad_id, IMAGE_SIZE)):
        embeds, _, labels = model.embed_inputs(batch["input_ids"], batch["images"], None, batch["labels"])
        features = model.encode_images(batch["images"])  # (N, P, D)
        k = 0
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b].tolist()
            if IMAGE_TOKEN_ID not in ids:
                continue
            start = ids.index(IMAGE_TOKEN_ID)
            assert torch.equal(embeds[b, start:start + model.n_image_tokens], features[k])
            assert (labels[b, start:start + model.n_image_tokens] == data.IGNORE_INDEX).all()
            k += 1
        assert k == batch["images"].shape[0]


def test_training_and_inference_preprocess_the_same_way(dataset, tiny_checkpoint, tmp_path, monkeypatch):
    import eval as bench_eval
    import sample

    seen = []  # the image tensors the model is given at inference
    encode_images = GeoChat.encode_images

    def recording(self, images):
        seen.append(images.float().clone())
        return encode_images(self, images)

    monkeypatch.setattr(GeoChat, "encode_images", recording)
    size = GeoChat.from_pretrained(tiny_checkpoint, dtype=torch.float32).cfg.image_size
    trained = data.InstructDataset(dataset.json_path, dataset.image_folder, dataset.tokenizer, image_size=size,
                                   max_length=256, n_image_tokens=4)
    expected = torch.stack([trained[0]["image"], trained[1]["image"]])  # a tall and a wide image, padded to square
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2"]
    sample.main(["--image", trained.image_paths[0], "--image", trained.image_paths[1], "--json", *common])
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"img_{i}.png", "text": "Is it red?"}) + "\n"
                                 for i in (0, 1)))
    assert bench_eval.main(["run", "--bench", "vqa", "--questions", str(questions), "--image-folder",
                            trained.image_folder, "--answers", str(tmp_path / "a.jsonl"), *common]) == 0
    from_sample, from_eval = seen[0], torch.cat(seen[1:])  # eval.py may answer one question per batch
    assert torch.equal(from_sample, expected)
    assert torch.equal(from_eval, expected)
