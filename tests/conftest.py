"""Shared pytest fixtures: a tiny Llama-like SentencePiece model and the shared example images."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# a small corpus in the style of GeoChat prompts and answers (one sentence per line, as SentencePiece reads it)
SP_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: There are two planes parked at the airport.",
    "[grounding] Describe the image in detail.",
    "[refer] Give me the location of <p> the small white car </p>",
    "[identify] What is the object present at {<12><34><56><78>|<45>}",
    "Answer the question using a single word or phrase.",
    "Classify the image from the following classes: airport, beach, forest, river, harbor, dense residential.",
    "Answer in one word or a short phrase.",
    "<p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>}",
    "Is there a building near the road? Yes. How many ships are in the harbor? 3",
    "The image shows a large parking lot with 25 cars, a tennis court and 3 storage tanks.",
    "Is the number of buildings greater than the number of roads? No",
    "Is it a rural or an urban area? urban",
]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """Path to a tiny SentencePiece BPE `tokenizer.model` trained like Llama's (byte fallback, split digits)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp_model")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_prefix=str(folder / "tokenizer"), model_type="bpe",
        vocab_size=400, hard_vocab_limit=False, byte_fallback=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def examples_dir():
    """The shared example images (shared/examples inside or beside the repo); skips when absent."""
    for candidate in (REPO / "shared" / "examples", REPO.parent / "shared" / "examples"):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    pytest.skip("shared/examples not found inside or beside the repository")


@pytest.fixture(scope="session")
def tiny_ref():
    """A tiny random HF LlavaForConditionalGeneration (vocab 512, 56 px images) used as the reference."""
    import hf_ref

    return hf_ref.tiny_llava(seed=3, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_ref, sp_model_path):
    """tiny_ref saved as a GeoChat-release checkpoint directory with a tokenizer.model."""
    import hf_ref

    base = tmp_path_factory.mktemp("ckpt")
    clip_dir = hf_ref.save_clip_dir(tiny_ref, base / "clip", with_weights=False)
    ckpt = hf_ref.write_release(tiny_ref, base / "geochat", fmt="safetensors", clip_dir=clip_dir)
    (ckpt / "tokenizer.model").write_bytes(Path(sp_model_path).read_bytes())
    return ckpt
