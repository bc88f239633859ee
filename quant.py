"""Weight-only int8 / int4 quantisation of the decoder's linears, and the fastest kernel and compute dtype per phase.

Symmetric, no zero point: int8 has one float32 scale per output channel (w ~ q * scale, q in [-127, 127]);
int4 one float32 scale per output channel and group of `group_size` input columns (w ~ q * scale,
q in [-7, 7]; stored as q + 8). Each scale is rounded up to a bfloat16 value before the weight is rounded to it:
the packed CPU kernels take their scales in bf16 (and GPU int8 multiplies by them in the activations' dtype), and
a scale rounded to bf16 there (up to 0.4% off) would scale its channel wrongly at every token, a bias that moved
the baby's held-out single-object `[refer]` boxes from float32's 28.3% to 26.9% under int8 (28.0% with the
rounded-up scales). Every decoder linear and `lm_head` is quantised; the vision tower, the projector, the
token embeddings and the norms stay in the model's dtype (the tower and projector run once per image
as a compute-bound prefill, where low-bit storage saves no time, and they are 4% of GeoChat-7B).

Checkpoint layout (our `model.safetensors`, `config.json` has `"quantization": {"mode", "group_size"}`):
  `<linear>.weight`        int8 (N, K)                   int8: q
                           uint8 (N, K/2)                int4: q + 8, column 2j in the low nibble, 2j+1 in the high
  `<linear>.weight_scale`  float32 (N,) or (N, K/group)  the scales
int4 layers whose K is not a multiple of `group_size` use the largest power of two below it that divides K.

Kernels (`QuantLinear.forward`), chosen by device and by rows M = batch x tokens:
- CPU decode (M <= DECODE_MAX_ROWS): aten's packed kernels, `_weight_int8pack_mm` and
  `_weight_int4pack_mm_for_cpu` (int4 weights repacked into aten's CPU layout at load time), on activations
  rounded to bfloat16: with float32 activations both reach a reference loop 10-30x slower.
  (int4 layers with N % 16 != 0 or a group size aten refuses dequantise as in prefill; int8 scales bf16 cannot
  hold, from a checkpoint quantised before scales were rounded up, go after the kernel in float32.)
- CPU prefill: dequantise into the compute dtype, then one GEMM. The compute dtype is float32 unless
  the activations are bfloat16 and the CPU has AMX (prefill_dtype: bf16 GEMMs are slower than float32 on
  AVX2, which emulates bf16, and also on AVX512-BF16 without AMX).
- CUDA / MPS: gpt-fast's form, `F.linear(x, w.to(x.dtype)) * scale` (int8) or dequantise-then-linear
  (int4), which torch.compile fuses into the matmul's prologue; compiled int8 decode (up to GPU_FUSED_DECODE_ROWS
  rows) is written as a multiply-reduce, which inductor fuses into one kernel reading the int8 weight.
The same per-phase rule serves bf16 / fp16 storage without quantisation: on such CPUs `sample.load` makes every
plain linear a `Float32PrefillLinear` (decode in the stored dtype, prefill cast to float32).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
# Rows up to which the packed CPU kernels beat dequantise + GEMM: at 4096x4096 on one AVX512 core, int8 64 / 121 ms
# against 89 / 121 ms at 128 / 256 rows, int4 62 / 126 against 147 / 164 ms; a bf16 GEMM 28 / 107 ms against
# 50 / 101 ms cast to float32 at 64 / 256 rows (a one-off timing loop on one core of this project's AVX512 CPU;
# bench_quant.py --kernels times 1, 16 and 1330 rows).
DECODE_MAX_ROWS = 128
GPU_FUSED_DECODE_ROWS = 8  # compiled GPU int8 calls of up to this many rows run as one fused multiply-reduce
ATEN_INT4_GROUP_SIZES = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
DECODER_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def int4_group_size(in_features: int, group_size: int) -> int:
    """The group size an int4 layer of in_features columns uses: group_size, or the largest power of two below it dividing K."""
    size = group_size
    while in_features % size:
        size //= 2
    return size


def round_up_to_bfloat16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 values >= each float32 scale, as float32 (exact in bf16, so a kernel's bf16 copy is exact)."""
    rounded = scale.to(torch.bfloat16)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.float() < scale, up, rounded).float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q (N, K) and float32 scales (N,) of a float weight (N, K), symmetric per output channel."""
    w = weight.float()
    scale = round_up_to_bfloat16(w.abs().amax(dim=1).clamp_min(1e-12) / 127)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 (N, K/2) and float32 scales (N, K/group_size) of a float weight (N, K), symmetric per group."""
    N, K = weight.shape
    w = weight.float().view(N, K // group_size, group_size)
    scale = round_up_to_bfloat16(w.abs().amax(dim=2).clamp_min(1e-12) / 7)  # (N, G): q in [-7, 7], no clipping
    q = torch.round(w / scale[:, :, None]).clamp_(-7, 7).to(torch.int8).view(N, K)
    return pack_int4(q), scale  # (N, K/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed int4 values as int8 (N, K) in [-8, 7] from the packed checkpoint layout (N, K/2)."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(1)  # (N, K/2, 2) -> (N, K)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (N, K) in dtype from int8 values (N, K) and scales (N,) or (N, G)."""
    if scale.ndim == 1:
        return q.to(dtype) * scale.to(dtype)[:, None]
    N, K = q.shape
    groups = scale.shape[1]
    return (q.view(N, groups, K // groups).to(dtype) * scale.to(dtype)[:, :, None]).view(N, K)


def aten_int4_block_rows(out_features: int) -> int | None:
    """Rows per block of aten's CPU int4 packing for this many rows (it depends on the CPU's ISA), or None when unknown.

    aten stores blocks of R rows as (K, R/2) bytes, row r in the low nibble and row r + R/2 in the high one.
    R is found by packing a random probe and comparing, so a layout this code does not know is never misread.
    """
    if out_features % 16:  # aten packs no such weight
        return None
    probe = torch.randint(0, 16, (out_features, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for rows in (64, 32, 16):
        if out_features % rows == 0 and tuple(packed.shape) == (out_features, 32):
            blocks = probe.view(out_features // rows, rows, 64).transpose(1, 2)  # (N/R, K, R)
            expected = blocks[:, :, : rows // 2] | (blocks[:, :, rows // 2:] << 4)  # (N/R, K, R/2)
            if torch.equal(packed.view(out_features // rows, 64, rows // 2), expected.to(torch.uint8)):
                return rows
    return None


def unpack_aten_int4(aten: torch.Tensor, rows: int) -> torch.Tensor:
    """Signed int4 values as int8 (N, K) in [-8, 7] from aten's CPU int4 layout (N, K/2) with `rows` rows per block."""
    N, half_k = aten.shape
    blocks = aten.view(N // rows, 2 * half_k, rows // 2)  # (N/R, K, R/2)
    q = torch.cat((blocks & 15, blocks >> 4), dim=2).transpose(1, 2).reshape(N, 2 * half_k)  # (N, K) in 0..15
    return q.to(torch.int8) - 8


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """The checkpoint's packed layout (N, K/2) uint8 of signed int4 values (N, K) in [-8, 7]."""
    q = (values + 8).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def check_quantization(quantization, source: str) -> dict:
    """A config.json "quantization" entry, checked: {"mode": int8|int4, "group_size": a power of two >= 2}; ValueError naming source."""
    if not isinstance(quantization, dict) or quantization.get("mode") not in QUANT_MODES:
        raise ValueError(f"{source}: quantization {quantization!r} is not supported (mode must be one of {', '.join(QUANT_MODES)})")
    size = quantization.get("group_size", DEFAULT_GROUP_SIZE)
    if not isinstance(size, int) or size < 2 or size & (size - 1):
        raise ValueError(f"{source}: quantization group_size {size!r} must be a power of two >= 2")
    return {"mode": quantization["mode"], "group_size": size}


def fast_bf16_gemm_cpu() -> bool:
    """Whether a bfloat16 GEMM beats float32 on this CPU: with AMX tiles only. On AVX512-BF16 without AMX a 1330x4096x4096
    GEMM took 597 ms against 333 ms in float32 (one core); on AVX2, which emulates bf16, 3,519 against 586 ms."""
    return torch.cpu._is_amx_tile_supported() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prefill_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a prefill GEMM computes in for activations of dtype: on CPU float32, unless bf16 is fast (AMX)."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    return dtype if dtype == torch.bfloat16 and fast_bf16_gemm_cpu() else torch.float32


class QuantLinear(nn.Module):
    """A bias-free linear with int8 (per channel) or int4 (per group) weights; see the module docstring for the kernels."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = DEFAULT_GROUP_SIZE, device=None):
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantisation mode {mode!r}; supported: {', '.join(QUANT_MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        if mode == "int8":
            self.group_size = in_features
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            if in_features % 2:
                raise ValueError(f"int4 needs an even number of input features, got {in_features}")
            self.group_size = int4_group_size(in_features, group_size)
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, in_features // self.group_size,
                                                             dtype=torch.float32, device=device))
        self.aten_block_rows = None  # int4 on CPU: weight is in aten's layout with this many rows per block
        # int4 on CPU when aten's layout is unknown: a second, aten-packed copy of the weight
        self.register_buffer("packed_cpu_weight", None, persistent=False)
        # on CPU, the scales in the packed kernels' bfloat16: (N,) for int8, (K/group, N, 2) scales and zeros for int4
        self.register_buffer("kernel_scales", None, persistent=False)
        # int8 on CPU with scales bf16 cannot hold (a checkpoint quantised before scales were rounded up to bf16): the
        # kernel gets unit scales and its output is multiplied by these float32 ones (N,)
        self.register_buffer("output_scales", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> "QuantLinear":
        """A QuantLinear holding linear's weight quantised (computed in float32), ready for its device."""
        if linear.bias is not None:
            raise ValueError("only bias-free linears are quantised")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, mode, group_size, device=weight.device)
        q, scale = quantize_int8(weight) if mode == "int8" else quantize_int4(weight, module.group_size)
        module.weight, module.weight_scale = q, scale
        return module.prepare_kernels()

    @torch.no_grad()
    def prepare_kernels(self) -> "QuantLinear":
        """On CPU: the scales in bfloat16 for the packed kernels; int4 weights repacked into aten's layout (in place where
        the layout is known, else a second copy; none for group sizes or N the kernel refuses). Returns self."""
        if self.weight.device.type != "cpu" or self.kernel_scales is not None or self.packed_cpu_weight is not None:
            return self
        if self.mode == "int8":
            self.kernel_scales = self.weight_scale.to(torch.bfloat16)
            if not torch.equal(self.kernel_scales.float(), self.weight_scale):
                self.kernel_scales, self.output_scales = torch.ones_like(self.kernel_scales), self.weight_scale
        elif self.group_size in ATEN_INT4_GROUP_SIZES and self.out_features % 16 == 0:  # what aten's CPU kernel takes
            values = (unpack_int4(self.weight) + 8).to(torch.int32)  # (N, K) in 0..15
            aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            scale = self.weight_scale.t().contiguous()  # (G, N)
            scales_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1)  # (G, N, 2): w = (q - 8) * s + 0
            self.kernel_scales = scales_zeros.to(torch.bfloat16)  # the dtype of the kernel's activations
            rows = aten_int4_block_rows(self.out_features)
            if rows is not None:
                self.weight, self.aten_block_rows = aten, rows
            else:
                self.packed_cpu_weight = aten
        return self

    def quantized_values(self) -> torch.Tensor:
        """The signed integer weight (N, K) as int8, whatever its stored layout."""
        if self.mode == "int8":
            return self.weight
        if self.aten_block_rows is not None:
            return unpack_aten_int4(self.weight, self.aten_block_rows)
        return unpack_int4(self.weight)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight (N, K) in dtype."""
        return dequantize(self.quantized_values(), self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) with the kernel for this device and phase."""
        rows = x.numel() // self.in_features
        if x.device.type != "cpu":  # gpt-fast's form: torch.compile fuses the cast and scale into the matmul
            if self.mode == "int8":
                if rows <= GPU_FUSED_DECODE_ROWS and torch.compiler.is_compiling():
                    # compiled decode: one reduction kernel reading the int8 weight (inductor of torch 2.11 fails to
                    # build the mm form below inside the decode step: AssertionError on an ir.Pointwise input)
                    # (..., 1, K) * (N, K) -> (..., N, K), summed over K -> (..., N)
                    out = (x[..., None, :] * self.weight.to(x.dtype)).sum(-1, dtype=torch.float32)
                    return (out * self.weight_scale).to(x.dtype)
                return F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
            return F.linear(x, self.dequantized(x.dtype))
        if rows <= DECODE_MAX_ROWS and self.kernel_scales is not None:
            # aten's fast packed kernels take bfloat16 activations (float32 ones reach a reference loop 10-30x slower)
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (M, K)
            if self.mode == "int8":
                out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.kernel_scales)
                if self.output_scales is not None:
                    out = out * self.output_scales
            else:
                packed = self.weight if self.aten_block_rows else self.packed_cpu_weight
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, self.kernel_scales)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)
        compute = prefill_dtype(x.dtype, x.device)
        return F.linear(x.to(compute), self.dequantized(compute)).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Save the checkpoint layout, also after int4 weights were repacked for aten's CPU kernel."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.aten_block_rows is not None:
            destination[prefix + "weight"] = pack_int4(unpack_aten_int4(self.weight, self.aten_block_rows))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, group_size={self.group_size}"


class Float32PrefillLinear(nn.Linear):
    """An nn.Linear with bf16 / fp16 weights that computes calls of more than DECODE_MAX_ROWS rows in float32 (CPU prefill)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode rows in the weight's dtype (half the bytes to read); prefill rows cast to float32 and back."""
        if x.numel() // self.in_features <= DECODE_MAX_ROWS:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def use_float32_prefill(model):
    """Make every plain nn.Linear of a bf16 / fp16 CPU model a Float32PrefillLinear on the same parameters; returns the model.

    For CPUs where prefill_dtype says float32: --dtype bfloat16 then halves memory without bf16 GEMMs in prefill.
    """
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            new = Float32PrefillLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
            new.weight, new.bias = module.weight, module.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def quantizable_linears(model) -> list[str]:
    """Names of the modules quantize_model replaces: every decoder linear and llm.lm_head."""
    names = [f"llm.layers.{i}.{name}" for i in range(len(model.llm.layers)) for name in DECODER_LINEARS]
    return names + ["llm.lm_head"]


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
    """Replace the decoder linears and lm_head of a GeoChat by QuantLinears (LoRA must be merged first); returns the model.

    A meta-device model gets empty QuantLinears (for loading a quantised checkpoint into); otherwise each
    weight is quantised and its float copy dropped as soon as it is replaced.
    """
    check_quantization({"mode": mode, "group_size": group_size}, "quantize_model")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"the model is already quantised ({model.cfg.quantization['mode']})")
    from lora import LoRALinear

    for name in quantizable_linears(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if isinstance(linear, LoRALinear):
            if not linear.merged:
                raise ValueError(f"{name} has an unmerged LoRA adapter: merge it (lora.merge_lora) before quantising")
            linear = linear.base
        if linear.weight.device.type == "meta":
            new = QuantLinear(linear.in_features, linear.out_features, mode, group_size, device="meta")
        else:
            new = QuantLinear.from_linear(linear, mode, group_size)
        setattr(parent, attr, new)
    model.cfg.quantization = {"mode": mode, "group_size": group_size}
    return model


def prepare_kernels(model):
    """Ready every QuantLinear of a loaded model for its device (QuantLinear.prepare_kernels); returns the model."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare_kernels()
    return model
