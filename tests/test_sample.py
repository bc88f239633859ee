"""The generation engine and sample.py's command line, against HF `generate` on tiny random checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import hf_ref
import sample
from geochat import GeoChat

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def engine(checkpoint):
    return sample.load(checkpoint, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(40, 64, 3, generator=g) * 255).byte().numpy()).save(path)
    return path


def prompt_for(engine, question):
    return engine.tokenizer.encode_prompt(data.build_prompt([("<image>\n" + question, None)], "llava_v1"))


def images_for(engine, n, seed=0):
    size = engine.model.cfg.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_kv_cache_decoding_equals_full_recompute(engine):
    model = engine.model
    ids = prompt_for(engine, "[grounding] Describe the image in detail.")
    image = images_for(engine, 1)
    embeds, mask = engine.embed_prompts([ids], image)
    session = engine.new_session(1, embeds.shape[1], 12)
    with torch.inference_mode():
        step_logits = [session.prefill(embeds, mask)]
        generated = []
        for _ in range(10):
            token = step_logits[-1].argmax(-1)
            generated.append(int(token))
            step_logits.append(session.decode(token))
        full = model(torch.tensor([ids + generated]), image)  # (1, L + 10, V), no cache
    L = embeds.shape[1]
    diff = max((step_logits[i][0] - full[0, L - 1 + i]).abs().max().item() for i in range(11))
    print(f"KV cache vs recompute: max |logit difference| = {diff:.2e}")
    assert diff < 1e-5


def test_greedy_tokens_equal_hf_generate(engine, ref):
    ids = prompt_for(engine, "Is there a building near the road?\nAnswer the question using a single word or phrase.")
    image = images_for(engine, 1, seed=4)
    ours = engine.generate([ids], image, max_new_tokens=24)[0].token_ids
    input_ids, mask = hf_ref.hf_inputs(ref, torch.tensor([[t if t != data.IMAGE_TOKEN_ID else -200 for t in ids]]))
    with torch.no_grad():
        hf = ref.generate(input_ids=input_ids, attention_mask=mask, pixel_values=image, max_new_tokens=24, do_sample=False,
                          eos_token_id=engine.tokenizer.eos_id, pad_token_id=0)
    hf_tokens = hf[0, input_ids.shape[1]:].tolist()
    if hf_tokens[-1] == engine.tokenizer.eos_id:  # HF keeps the stop token, we do not
        hf_tokens.pop()
    assert len(ours) > 0 and ours == hf_tokens  # whole sequences: an early stop on either side shows


def test_batch_rows_match_running_alone(engine):
    questions = ["[grounding] Describe the image in detail.", "How many ships are in the harbor?",
                 "Is it a rural or an urban area? Answer in one word or a short phrase."]
    prompts = [prompt_for(engine, q) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is left-padded
    images = images_for(engine, 3, seed=7)
    batch = engine.generate(prompts, images, max_new_tokens=16)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], images[i:i + 1], max_new_tokens=16)[0]
        assert batch[i].token_ids == alone.token_ids


def test_sampling_is_seeded_and_filters(engine):
    ids = prompt_for(engine, "What is in the image?")
    image = images_for(engine, 1)
    a = engine.generate([ids], image, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=5)[0].token_ids
    b = engine.generate([ids], image, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=5)[0].token_ids
    assert a == b
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert all(sample.sample_next(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(s)).item() == 1 for s in range(5))
    picks = {sample.sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)).item() for s in range(20)}
    assert picks == {1}  # token 1 alone holds over half the mass
    assert sample.sample_next(logits).item() == 1


def test_sampling_without_seed_leaves_the_global_rng_alone(engine):
    ids = prompt_for(engine, "What is in the image?")
    image = images_for(engine, 1)
    state = torch.get_rng_state()
    engine.generate([ids], image, max_new_tokens=4, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("decode_ahead", [False, True])
def test_non_finite_logits_fail_with_one_clear_error(checkpoint, decode_ahead):
    model = GeoChat.from_pretrained(checkpoint, dtype=torch.float32)
    engine = sample.Engine(model, data.Tokenizer(checkpoint / "tokenizer.model"), decode_ahead=decode_ahead)
    ids = prompt_for(engine, "[grounding] Describe the image in detail.")
    image = images_for(engine, 1)
    assert len(engine.generate([ids], image, max_new_tokens=4)[0].token_ids) == 4  # no early stop in the budget
    calls = []

    def nan_from_call(n):  # the lm_head's n-th call (1: the prefill, 2: the first decode step) turns NaN
        def hook(module, inputs, output):
            calls.append(None)
            return output * float("nan") if len(calls) >= n else output
        return hook

    for n, where in ((1, "after the prompt"), (3, "at step 3 of the answer")):
        handle = model.llm.lm_head.register_forward_hook(nan_from_call(n))
        for temperature in (0.0, 1.0):  # greedy would pick a NaN; sampling would crash on it
            calls.clear()
            with pytest.raises(sample.NonFiniteLogits, match=f"logits are NaN or infinite {where}"):
                engine.generate([ids], image, max_new_tokens=4, temperature=temperature, seed=0)
        handle.remove()


def test_decode_ahead_gives_the_same_tokens_and_session(engine):
    """Queuing step t+1 before the host reads step t's tokens (the CUDA default) changes no token, and a step queued
    past the answers is undone: the session ends as without it (length, filled slots, positions, unfed tokens)."""
    prompts = [prompt_for(engine, "[grounding] Describe the image in detail."), prompt_for(engine, "How many ships?"),
               prompt_for(engine, "Is there a plane?")]
    images = images_for(engine, 3, seed=11)
    tok = engine.tokenizer
    free = sample.Engine(engine.model, SimpleNamespace(eos_id=-1, pad_id=tok.pad_id, decode=tok.decode))
    unstopped = [g.token_ids for g in free.generate(prompts, images, max_new_tokens=12)]
    eos = unstopped[0][4]  # a token row 0 makes at step 5: rows stop at different steps, or run to the budget
    cases = {"rows stop at </s> at different steps": (3, 12), "every row stops at </s>": (1, 12),
             "every row ends at the budget": (3, 3)}
    ends = {}
    for ahead in (False, True):
        stopping = sample.Engine(engine.model, SimpleNamespace(eos_id=eos, pad_id=tok.pad_id, decode=tok.decode),
                                 decode_ahead=ahead)
        for case, (rows, budget) in cases.items():
            with torch.inference_mode():
                embeds, mask = stopping.embed_prompts(prompts[:rows], images[:rows])
                session = stopping.new_session(rows, embeds.shape[1], budget)
                ids = stopping.continue_generation(session, session.prefill(embeds, mask), budget)
            ends[ahead, case] = (ids, session.unfed, session.length, session.key_valid.tolist(),
                                 session.next_position.tolist(), session.decode_calls)
    for case in cases:
        without, ahead = ends[False, case], ends[True, case]
        assert ahead[:5] == without[:5], case
        assert ahead[5] == without[5] + (case == "every row stops at </s>"), case  # one step queued, then undone
    assert ends[True, "every row stops at </s>"][0] == [unstopped[0][:4]]


def test_stream_printer_prints_characters_split_into_bytes(sp_model_path, capsys):
    tokenizer = data.Tokenizer(sp_model_path)
    answer = "The angle θ is 45° near the café, 港口 has 3 ships."
    ids = tokenizer.encode(answer)
    assert sum(tokenizer.sp.is_byte(i) for i in ids) >= 6  # byte fallback: each of θ ° é 港 口 is several byte pieces
    printer = sample.StreamPrinter(tokenizer)
    shown = []
    for i in ids:
        printer.on_token(0, i)
        shown.append(capsys.readouterr().out)
    printer.finish()
    streamed = "".join(shown) + capsys.readouterr().out
    assert streamed == tokenizer.decode(ids) + "\n" and tokenizer.decode(ids).strip() == answer
    assert "\ufffd" not in streamed


def test_decode_step_has_no_graph_break(engine):
    session = engine.new_session(1, 8, 4)
    llm = engine.model.llm
    key_valid = session.key_valid.clone()
    key_valid[:, :3] = True
    explanation = torch._dynamo.explain(sample.decode_step)(
        llm, torch.tensor([[5]]), torch.tensor([[2]]), torch.tensor([2]), key_valid)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_engine_gives_the_eager_tokens(engine):
    """--compile (static shapes, a C++ wrapper on CPU, a cache rounded up to 256 slots, batches padded to a power of
    two) changes no token; calls of batch 3, 1 and 4 build one graph per bucket (4 and 1) on one reused cache."""
    compiled = sample.Engine(engine.model, engine.tokenizer, compile=True)
    prompts = [prompt_for(engine, "[grounding] Describe the image in detail."), prompt_for(engine, "How many ships?"),
               prompt_for(engine, "Is there a plane?")]
    images = images_for(engine, 3, seed=11)
    eager = [g.token_ids for g in engine.generate(prompts, images, max_new_tokens=20)]
    llm = engine.model.llm
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = compiled.generate(prompts, images, max_new_tokens=20)  # 3 rows run as 4: the cache is sized for 4
    assert [g.token_ids for g in fast] == eager
    buffers = [t.data_ptr() for t in (llm.layers[0].attn.kv_cache.k, llm.rope_cos)]
    assert llm.layers[0].attn.kv_cache.k.shape[:3:2] == (4, 256)
    assert compiled.generate(prompts[1:2], images[1:2], max_new_tokens=20)[0].token_ids == eager[1]
    four = compiled.generate(prompts + prompts[:1], torch.cat([images, images[:1]]), max_new_tokens=20)
    assert [g.token_ids for g in four] == eager + eager[:1]
    assert [t.data_ptr() for t in (llm.layers[0].attn.kv_cache.k, llm.rope_cos)] == buffers  # allocated once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # batch buckets 4 and 1, one capacity
    assert compiled.new_session(1, 300, 20).capacity == min(512, engine.context)  # sizes double from 256


def test_cache_is_reused_when_big_enough():
    """setup_cache keeps a cache with enough rows and slots (same buffers) and grows to the largest asked so far."""
    from llama import Llama, LlamaConfig

    llm = Llama(LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, intermediate_size=32, max_seq_len=256))
    assert llm.setup_cache(2, 64) is True
    first = llm.layers[0].attn.kv_cache.k
    assert llm.setup_cache(1, 32) is False and llm.layers[0].attn.kv_cache.k is first
    assert llm.setup_cache(1, 128) is True
    assert tuple(llm.layers[0].attn.kv_cache.k.shape[:3:2]) == (2, 128)  # rows kept from the larger earlier cache
    assert llm.rope_cos.dtype == first.dtype and "rope_cos" in dict(llm.named_buffers())
    assert "rope_cos" not in llm.state_dict()


def test_interactive_keeps_cache_across_turns(engine):
    # A second turn appended to the kept cache equals the whole two-turn prompt computed from scratch.
    tok = engine.tokenizer
    first = prompt_for(engine, "What is in the image?")
    image = images_for(engine, 1)
    session = sample.Session(engine.model, 1, engine.context)
    with torch.inference_mode():
        embeds, mask = engine.embed_prompts([first], image)
        answer = engine.continue_generation(session, session.prefill(embeds, mask), 5)[0]
        follow = session.unfed[0] + [tok.eos_id] + tok.encode("USER: How many ships? ASSISTANT:")
        embeds2, mask2 = engine.embed_prompts([follow], None)
        logits = session.prefill(embeds2, mask2)
        fed = answer[: len(answer) - len(session.unfed[0])]
        recompute = engine.model(torch.tensor([first + fed + follow]), image)[0, -1]
    assert session.length == embeds.shape[1] + len(fed) + len(follow)
    assert torch.allclose(logits[0], recompute, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Boxes.

BOX_TABLE = [
    ("<p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>}", [("two planes", 8, 82, 16, 90, 69), ("two planes", 6, 44, 14, 48, 32)]),
    ("{<16><55><24><63>|<11>}", [(None, 16, 55, 24, 63, 11)]),
    ("<p>car</p> {<1><2><3><4>}", [("car", 1, 2, 3, 4, 0)]),  # 4 numbers: angle 0
    ("{<1><2><3>|<4>} and {<10><20><30><40>|<5>}", [(None, 10, 20, 30, 40, 5)]),  # a malformed box is skipped
    ("{<1><2><x><4>|<4>} {<5><6><7><8>|<9>", []),  # garbage, unclosed: nothing, no crash
    ("There is no box here.", []),
]


@pytest.mark.parametrize("answer,expected", BOX_TABLE)
def test_box_records_parse_real_answers(answer, expected):
    got = sample.box_records(answer, 200, 100)
    assert [(b["label"], b["x1"], b["y1"], b["x2"], b["y2"], b["angle"]) for b in got] == expected
    for b in got:
        assert len(b["polygon"]) == 4


def test_drawn_box_lands_where_the_coordinates_say():
    image = Image.new("RGB", (200, 100), "white")  # padded square: 200 x 200, image at y offset 50
    boxes = sample.box_records("<p>ship</p> {<10><30><50><60>|<0>}", 200, 100)
    assert boxes[0]["polygon"] == [[20.0, 10.0], [100.0, 10.0], [100.0, 70.0], [20.0, 70.0]]
    drawn = sample.draw_boxes(image, boxes)
    scale = drawn.height / 100  # small images are upscaled for display (short side 512)
    assert drawn.size == (1024, 512)
    pixel = lambda x, y: drawn.getpixel((round(x * scale), round(y * scale)))  # noqa: E731  (original coordinates)
    red = lambda x, y: pixel(x, y)[0] > 200 and pixel(x, y)[1] < 120  # noqa: E731
    assert red(60, 70) and red(100, 40) and red(20, 40)  # bottom, right and left edges
    assert pixel(60, 40) == (255, 255, 255)  # inside stays untouched
    assert pixel(150, 90) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# The command line.


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_json_and_drawing(checkpoint, image_file, tmp_path):
    out = tmp_path / "boxes.png"
    r = run_cli("--checkpoint", checkpoint, "--image", image_file, "--image", image_file, "--task", "grounding",
                "--max-new-tokens", "8", "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["token_ids"] == lines[1]["token_ids"]
    assert set(lines[0]) == {"image", "answer", "boxes", "token_ids", "prefill_ms", "decode_tokens_per_s"}
    assert (tmp_path / "boxes_0.png").exists() and (tmp_path / "boxes_1.png").exists()


def test_cli_streams_text(checkpoint, image_file):
    r = run_cli("--checkpoint", checkpoint, "--image", image_file, "--task", "vqa", "--prompt", "How many ships?",
                "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


def test_ctrl_c_during_streaming_exits_cleanly(tmp_path, sp_model_path):
    # a checkpoint whose context is long enough to stream for a while
    ref = hf_ref.tiny_llava(seed=5, vocab_size=VOCAB)
    ref.config.text_config.max_position_embeddings = 4096
    with torch.no_grad():  # sharp logits and a zero </s> row: it never stops on its own before the signal
        ref.lm_head.weight.mul_(20)
        ref.lm_head.weight[2] = 0
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip", with_weights=False)
    ckpt = hf_ref.write_release(ref, tmp_path / "g", clip_dir=clip_dir)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))
    (ckpt / "tokenizer.model").write_bytes(Path(sp_model_path).read_bytes())
    image = tmp_path / "x.png"
    Image.new("RGB", (30, 20), "gray").save(image)
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(ckpt), "--image", str(image),
                             "--task", "chat", "--prompt", "Tell me everything.", "--max-new-tokens", "3900",
                             "--temperature", "1.0", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.time() + 60
    while time.time() < deadline and not proc.stdout.read(1):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.decode().strip() == "interrupted"


def test_cli_lora_adapter_changes_the_answer(checkpoint, image_file, tmp_path):
    import lora

    model = GeoChat.from_pretrained(checkpoint, dtype=torch.float32)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    lora.save_adapter(model, tmp_path / "adapter")
    common = ["--checkpoint", checkpoint, "--image", image_file, "--task", "grounding", "--max-new-tokens", "8", "--json"]
    plain, adapted = run_cli(*common), run_cli(*common, "--lora", tmp_path / "adapter")
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert json.loads(plain.stdout)["token_ids"] != json.loads(adapted.stdout)["token_ids"]
    missing = run_cli(*common, "--lora", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr
