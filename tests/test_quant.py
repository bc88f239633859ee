"""Weight-only int8 / int4 (quant.py): the kernels against the dequantised weights, accuracy against float32 on a
small random config and the shipped Baby GeoChat, the engine's features, converted checkpoints and bad input."""

import contextlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import data
import lora as lora_lib
import quant
import sample
from geochat import GeoChat, GeoChatConfig
from llama import LlamaConfig
from vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]
BABY = ROOT / "checkpoints" / "baby-geochat"
CPU = torch.device("cpu")


# (out_features, in_features, mode): aten's blocked int4 layout (N % 64 == 0), N not a multiple of 16 (dequantise
# path), K = 688 (group 16, the baby's down_proj), N = 96 (an aten layout not recognised: a second packed copy)
SHAPES = [(64, 256, "int8"), (1000, 256, "int8"), (128, 256, "int4"), (1000, 256, "int4"), (256, 688, "int4"),
          (96, 256, "int4")]


@pytest.mark.parametrize("out_features,in_features,mode", SHAPES)
def test_every_kernel_computes_with_the_dequantised_weight(out_features, in_features, mode):
    """Decode (packed kernels) and prefill (dequantise + GEMM) rows give x @ W_dq.T; W_dq is within half a step of W."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    layer = quant.QuantLinear.from_linear(linear, mode)
    weight = layer.dequantized(torch.float32)
    scale = layer.weight_scale  # (N,) or (N, K / group) -> per element (N, 1) or (N, K)
    step = scale[:, None] if scale.ndim == 1 else scale.repeat_interleave(layer.group_size, 1)
    assert ((weight - linear.weight).abs() <= step / 2 + 1e-6).all()
    for rows in (1, 3, quant.DECODE_MAX_ROWS // 2 + 1):  # 2 x rows: the packed kernels, then dequantise + GEMM
        x = torch.randn(2, rows, in_features)
        out = layer(x)
        if 2 * rows <= quant.DECODE_MAX_ROWS and layer.kernel_scales is not None:
            # bfloat16 activations, float32 accumulation, a bfloat16 result
            torch.testing.assert_close(out, x.bfloat16().float() @ weight.T, atol=0.02, rtol=0.01)
        else:
            torch.testing.assert_close(out, x @ weight.T, atol=1e-5, rtol=1e-5)
    bf16 = torch.randn(1, 1, in_features, dtype=torch.bfloat16)
    assert layer(bf16).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_scales_are_bfloat16_values_that_clip_nothing(mode):
    """The packed kernels' bf16 copy of each scale is the scale itself; every weight is within q's range of it."""
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.logspace(-4, 1, 64)[:, None]  # rows of very different magnitudes
    if mode == "int8":
        q, scale = quant.quantize_int8(weight)
        limit, per_element = 127, scale[:, None]
    else:
        packed, scale = quant.quantize_int4(weight, 128)
        q, limit, per_element = quant.unpack_int4(packed), 7, scale.repeat_interleave(128, 1)
    assert scale.dtype == torch.float32 and torch.equal(scale.to(torch.bfloat16).float(), scale)
    assert (weight.abs() <= limit * per_element).all() and q.abs().max() <= limit
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(256, 64, bias=False), mode)
    if mode == "int8":  # the kernel's own scales, nothing multiplied after it
        assert torch.equal(layer.kernel_scales.float(), layer.weight_scale) and layer.output_scales is None


def test_int8_scales_bfloat16_cannot_hold_are_applied_in_float32():
    """A checkpoint quantised with scales off the bf16 grid: no channel is biased by its scale rounded to bf16.

    Such a bias cost the baby 1.4 points of held-out [refer] boxes. Scales 1 + 3/1024 round to 1.0 in bf16 (0.29%
    off); applied in float32, the decode output's gain against the exact float32 product (least squares) stays 1
    up to the bf16 rounding noise of activations and outputs, which averages out (measured 1 + 2.5e-5, and
    1 - 0.29% with the scales in the kernel).
    """
    torch.manual_seed(0)
    layer = quant.QuantLinear(256, 64, "int8")
    layer.weight = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    layer.weight_scale = torch.full((64,), 1 + 3 / 1024)
    layer.prepare_kernels()
    x = torch.randn(quant.DECODE_MAX_ROWS, 256)
    exact = x @ layer.dequantized(torch.float32).T  # (M, N)
    gain = float((layer(x) * exact).sum() / (exact * exact).sum())  # the least-squares a in layer(x) ~ a * exact
    assert abs(gain - 1) < 3e-4, f"decode output is {gain - 1:+.3%} off on average"


@pytest.mark.parametrize("out_features,in_features,mode", SHAPES)
def test_state_dict_is_the_checkpoint_layout_after_repacking(out_features, in_features, mode):
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    layer = quant.QuantLinear.from_linear(linear, mode)
    group = quant.int4_group_size(in_features, quant.DEFAULT_GROUP_SIZE)
    q, scale = quant.quantize_int8(linear.weight) if mode == "int8" else quant.quantize_int4(linear.weight, group)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale"}
    assert torch.equal(state["weight"], q) and torch.equal(state["weight_scale"], scale)
    again = quant.QuantLinear(in_features, out_features, mode)
    again.load_state_dict(state)
    again.prepare_kernels()
    assert torch.equal(again.dequantized(torch.float32), layer.dequantized(torch.float32))


def test_aten_int4_layout_is_recognised_at_geochat_7b_widths():
    """No second int4 copy at 7B's row counts (q/k/v/o 4096, gate/up 11008, lm_head 32000), on AVX512 and AVX2 alike."""
    assert all(quant.aten_int4_block_rows(rows) in (32, 64) for rows in (4096, 11008, 32000))
    assert quant.aten_int4_block_rows(1000) is None  # not a multiple of 16: aten packs no such weight


def test_prefill_dtype_follows_the_cpu():
    assert quant.prefill_dtype(torch.float32, CPU) == torch.float32
    assert quant.prefill_dtype(torch.float16, CPU) == torch.float32
    assert quant.prefill_dtype(torch.bfloat16, CPU) == (torch.bfloat16 if quant.fast_bf16_gemm_cpu() else torch.float32)


def logit_agreement(reference, candidate):
    """(max |logit difference| / max |reference logit|, share of positions with the same argmax)."""
    relative = float((candidate - reference).abs().max() / reference.abs().max())
    top1 = float((candidate.argmax(-1) == reference.argmax(-1)).float().mean())
    return relative, top1


# mode: (most max |dlogit| / max |logit|, least top-1 agreement); measured 0.0082 / 0.962 and 0.112 / 0.850 on the small
# config, 0.0337 / 0.989 and 0.1124 / 0.910 on the shipped baby (printed with pytest -s; the November baby, commit
# 4ad6370: 0.0077 / 0.988 and 0.0902 / 0.904; before scales were rounded up to bf16 values 0.0084 / 0.975 and
# 0.110 / 0.850 on the small config)
SMALL_BOUNDS = {"int8": (0.02, 0.95), "int4": (0.15, 0.80)}
BABY_BOUNDS = {"int8": (0.04, 0.97), "int4": (0.20, 0.88)}


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_small_random_config_logits_follow_float32(mode):
    torch.manual_seed(0)
    cfg = GeoChatConfig(vision=ViTConfig(image_size=32, patch_size=8, width=64, n_layers=2, n_heads=2, mlp_dim=128),
                        llm=LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, intermediate_size=512, max_seq_len=128),
                        image_size=32)
    model = GeoChat(cfg).eval()
    ids = torch.randint(0, 512, (2, 25))
    ids[:, 3] = -200
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(ids, images)  # (2, 40, 512)
        quant.quantize_model(model, mode)
        relative, top1 = logit_agreement(reference, model(ids, images))
    print(f"small random config, {mode}: max |dlogit| / max |logit| {relative:.4f}, top-1 agreement {top1:.3f}")
    assert relative <= SMALL_BOUNDS[mode][0] and top1 >= SMALL_BOUNDS[mode][1]


@pytest.fixture(scope="module")
def baby_examples():
    return json.loads((BABY / "examples" / "expected.json").read_text())


def example_inputs(engine, example):
    """(prompt ids, preprocessed image (1, 3, S, S)) of a shipped example."""
    args = sample.parse_args(["--image", str(BABY / "examples" / example["image"]), *example["args"]])
    image = data.preprocess_image(data.load_image(args.image[0]), engine.model.cfg.image_size)[None]
    return engine.prompt_ids(sample.user_text(args)), image


@pytest.fixture(scope="module")
def baby_float():
    return sample.load(BABY, CPU, torch.float32)


@pytest.fixture(scope="module")
def baby_int8():
    return sample.load(BABY, CPU, torch.float32, quantize="int8")


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_baby_logits_follow_float32(mode, baby_float, baby_int8, baby_examples):
    """Every position of the shipped examples' prompt + answer, teacher-forced."""
    engine = baby_int8 if mode == "int8" else sample.load(BABY, CPU, torch.float32, quantize=mode)
    errors, agreements = [], []
    with torch.no_grad():
        for example in baby_examples:
            ids, image = example_inputs(baby_float, example)
            ids = torch.tensor([ids + example["token_ids"]])
            relative, top1 = logit_agreement(baby_float.model(ids, image), engine.model(ids, image))
            errors.append(relative)
            agreements.append(top1)
    mean_top1 = sum(agreements) / len(agreements)
    print(f"baby, {mode}: max |dlogit| / max |logit| {max(errors):.4f}, top-1 agreement {mean_top1:.3f}")
    assert max(errors) <= BABY_BOUNDS[mode][0] and mean_top1 >= BABY_BOUNDS[mode][1]


def test_baby_int8_greedy_answers_differ_only_at_near_ties(baby_float, baby_int8, baby_examples):
    """int8 gives the float32 tokens, or leaves them where float32's two best logits lie closer than int8's logit error.

    Measured on the shipped examples: 5 of 6 answers identical; the sixth (scene_1.png, grounding) leaves float32's
    token 17 where its two best logits lie 0.031 apart and int8 moves logits by up to 0.049 (the November baby, commit
    4ad6370: the same example at token 19, margin 0.024 against noise 0.047).
    """
    same = 0
    for example in baby_examples:
        ids, image = example_inputs(baby_int8, example)
        got = baby_int8.generate([ids], image, max_new_tokens=256)[0].token_ids
        want = example["token_ids"]
        if got == want:
            same += 1
            continue
        step = next(k for k, (a, b) in enumerate(zip(got + [-1], want + [-1])) if a != b)
        prefix = torch.tensor([ids + want[:step]])
        with torch.no_grad():
            reference, candidate = baby_float.model(prefix, image)[0, -1], baby_int8.model(prefix, image)[0, -1]
        margin = float(reference[want[step]] - reference[got[step]]) if step < len(got) else float("nan")
        noise = float((candidate - reference).abs().max())
        print(f"{example['image']} {example['args'][1]}: differs at token {step}, float32 margin {margin:.4f}, int8 noise {noise:.4f}")
        assert 0 <= margin < noise, (example, step)  # int8 chose float32's near-tied runner-up
    assert same >= len(baby_examples) // 2


def test_int8_engine_batches_streams_and_compiles(baby_int8, baby_examples):
    ids, image = example_inputs(baby_int8, baby_examples[0])
    other_ids, other_image = example_inputs(baby_int8, baby_examples[3])
    streamed = []
    alone = baby_int8.generate([ids], image, max_new_tokens=24, on_token=lambda row, t: streamed.append(t))[0].token_ids
    other = baby_int8.generate([other_ids], other_image, max_new_tokens=24)[0].token_ids
    assert streamed == alone
    batch = baby_int8.generate([ids, other_ids], torch.cat([image, other_image]), max_new_tokens=24)
    assert [g.token_ids for g in batch] == [alone, other]
    compiled = sample.Engine(baby_int8.model, baby_int8.tokenizer, compile=True)
    assert compiled.generate([ids], image, max_new_tokens=24)[0].token_ids == alone


def test_lora_is_merged_before_quantising(tmp_path):
    torch.manual_seed(0)
    model = GeoChat.from_pretrained(BABY, dtype=torch.float32)
    lora_lib.apply_lora(model, r=4, alpha=8, dropout=0.0)
    for module in model.modules():
        if isinstance(module, lora_lib.LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    lora_lib.save_adapter(model, tmp_path / "adapter", r=4, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        quant.quantize_model(model, "int8")
    lora_lib.merge_lora(model)
    merged_q_proj = model.llm.layers[0].attn.q_proj.weight.detach().clone()  # merge_lora put the plain linear back
    engine = sample.load(BABY, CPU, torch.float32, lora=tmp_path / "adapter", quantize="int8")
    layer = engine.model.llm.layers[0].attn.q_proj
    assert isinstance(layer, quant.QuantLinear)
    q, scale = quant.quantize_int8(merged_q_proj)
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)


def run_main(main, *argv):
    """A command-line main() in this process: (exit code, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv]) or 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue().splitlines()


def convert(*argv):
    """scripts/convert.py in this process: (exit code, stdout, stderr lines)."""
    spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run_main(module.main, *argv)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The baby converted with --quantize int8 and int4 (float32 for everything else): {mode: directory}."""
    base = tmp_path_factory.mktemp("converted")
    for mode in quant.QUANT_MODES:
        code, _, err = convert(BABY, base / mode, "--dtype", "float32", "--quantize", mode)
        assert code == 0, err
    return {mode: base / mode for mode in quant.QUANT_MODES}


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_converted_checkpoint_loads_memory_mapped_with_the_same_logits(mode, converted, baby_examples):
    folder = converted[mode]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"mode": mode, "group_size": quant.DEFAULT_GROUP_SIZE}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        q_proj = f.get_tensor("llm.layers.0.attn.q_proj.weight")
        assert q_proj.dtype == (torch.int8 if mode == "int8" else torch.uint8)
        assert f.get_tensor("llm.lm_head.weight_scale").dtype == torch.float32
        assert f.get_tensor("vision.blocks.0.mlp.fc1.weight").dtype == torch.float32  # the tower stays float
    loaded = sample.load(folder, CPU, torch.float32)
    in_memory = sample.load(BABY, CPU, torch.float32, quantize=mode)
    ids, image = example_inputs(loaded, baby_examples[0])
    with torch.no_grad():
        assert torch.equal(loaded.model(torch.tensor([ids]), image), in_memory.model(torch.tensor([ids]), image))
    if mode == "int8":  # used in place from the mapped file: the loaded tensor's bytes are the file's
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert torch.equal(loaded.model.llm.lm_head.weight, f.get_tensor("llm.lm_head.weight"))
    # the same answer through the command line; --quantize may name the checkpoint's own mode
    code, out, err = run_main(sample.main, "--checkpoint", folder, "--image", BABY / "examples" / baby_examples[0]["image"],
                              *baby_examples[0]["args"], "--json", "--device", "cpu", "--max-new-tokens", "8", "--quantize", mode)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == in_memory.generate([ids], image, max_new_tokens=8)[0].token_ids


def broken_copy(source: Path, target: Path, drop=None, replace=None, config=None) -> Path:
    """A copy of a quantised checkpoint without the tensor `drop`, with `replace` = {key: tensor}, or another config."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    state = load_file(str(source / "model.safetensors"))
    state.pop(drop, None)
    state.update(replace or {})
    save_file(state, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config or json.loads((source / "config.json").read_text())))
    (target / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
    return target


def test_bad_quantised_input_is_one_line_and_exit_code_2(converted, tmp_path):
    int8 = converted["int8"]
    config = json.loads((int8 / "config.json").read_text())
    cases = [
        (broken_copy(int8, tmp_path / "no_scale", drop="llm.layers.1.mlp.up_proj.weight_scale"), [],
         "missing llm.layers.1.mlp.up_proj.weight_scale"),
        (broken_copy(int8, tmp_path / "float_weight", replace={"llm.lm_head.weight": torch.zeros(1000, 256)}), [],
         "llm.lm_head.weight in model.safetensors has dtype float32, expected int8"),
        (broken_copy(int8, tmp_path / "bad_mode", config=config | {"quantization": {"mode": "int3"}}), [],
         "bad_mode/config.json: quantization {'mode': 'int3'} is not supported"),
        (broken_copy(int8, tmp_path / "bad_group", config=config | {"quantization": {"mode": "int4", "group_size": 100}}),
         [], "group_size 100 must be a power of two"),
        (int8, ["--quantize", "int4"], "--quantize int4: " + str(int8) + " is already quantised as int8"),
        (int8, ["--lora", tmp_path], "--lora: " + str(int8) + " is quantised (int8)"),
    ]
    image = BABY / "examples" / "scene_1.png"
    for checkpoint, extra, message in cases:
        code, out, err = run_main(sample.main, "--checkpoint", checkpoint, "--image", image, "--device", "cpu", *extra)
        assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_convert_refuses_bad_quantisation_options(tmp_path):
    assert convert(BABY, tmp_path / "out", "--quantize", "int4", "--group-size", "100") == (
        2, "", ["error: --group-size 100 must be a power of two >= 2"])
    assert not (tmp_path / "out").exists()
    assert convert(BABY, tmp_path / "out", "--group-size", "64") == (2, "", ["error: --group-size only applies with --quantize int4"])


def test_interactive_chat_runs_quantised(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where are the ships?\n"))
    code = sample.main(["--image", str(BABY / "examples" / "scene_1.png"), "--device", "cpu", "--task", "chat", "--prompt",
                        "What is in the image?", "--max-new-tokens", "6", "--interactive", "--quantize", "int4"]) or 0
    out, err = capsys.readouterr()
    assert code == 0, err
    answers = re.findall(r"ASSISTANT: ?(.*)", out)  # the baby may answer the untrained first question with nothing
    assert len(answers) == 2 and answers[-1], out


def test_bfloat16_storage_prefills_in_float32_where_bf16_gemms_are_slow(baby_examples):
    engine = sample.load(BABY, CPU, torch.bfloat16)
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    if quant.fast_bf16_gemm_cpu():
        assert not any(isinstance(m, quant.Float32PrefillLinear) for m in linears)
        pytest.skip("this CPU has AMX: bf16 GEMMs stay bf16")
    assert linears and all(isinstance(m, quant.Float32PrefillLinear) for m in linears)  # tower, projector, decoder, head
    assert set(engine.model.state_dict()) == set(GeoChat.from_pretrained(BABY, dtype=torch.bfloat16).state_dict())
    layer = engine.model.llm.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16
    prefill = torch.randn(1, quant.DECODE_MAX_ROWS + 1, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(prefill), (prefill.float() @ layer.weight.float().T).bfloat16())
    step = prefill[:, :1]
    assert torch.equal(layer(step), torch.nn.functional.linear(step, layer.weight))
    ids, image = example_inputs(engine, baby_examples[1])  # the scene answer, one word
    assert engine.generate([ids], image, max_new_tokens=8)[0].text == baby_examples[1]["answer"]


def test_eval_run_answers_with_the_quantised_engine(baby_int8, tmp_path):
    import eval as geochat_eval

    questions = [{"question_id": f"q{i}", "image": f"scene_{i}.png", "ground_truth": "water",
                  "text": "Classify the image in one of the following classes. Classes: farmland, water, desert, urban."}
                 for i in (1, 2, 3)]
    qfile = tmp_path / "scene.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    code, _, err = run_main(geochat_eval.main, "run", "--bench", "scene", "--questions", qfile, "--image-folder",
                            BABY / "examples", "--checkpoint", BABY, "--answers", answers, "--device", "cpu",
                            "--batch-size", "3", "--max-new-tokens", "8", "--quantize", "int8")
    assert code == 0, err
    size = baby_int8.model.cfg.image_size
    prompts = [baby_int8.prompt_ids(data.IMAGE_PLACEHOLDER + "\n" + geochat_eval.question_prompt("scene", q)) for q in questions]
    images = torch.stack([data.preprocess_image(data.load_image(BABY / "examples" / q["image"]), size) for q in questions])
    want = [g.text.strip() for g in baby_int8.generate(prompts, images, max_new_tokens=8)]
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == want
