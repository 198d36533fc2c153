"""One MoE layer's experts on one device: grouped GEMM, per-expert loop, transformers, roofline.

For each shape (random bf16 weights; E experts, top-K, hidden D, expert intermediate F) and each
token count T, with routing from a skewed random router (logits = noise + a Zipf-like bias per
expert; top-K, softmax over the K), it times, with device events after warm-up, the median over
rotating inputs of:
  * grouped: `GroupedExperts.moe` (device permutation, one `torch._grouped_mm` per projection,
    un-permutation, combine), what the runtime runs; and its opt-in variants (GROUPED_VARIANTS):
    the fused bias + GLU kernel, the Triton GEMM, the Triton permutation and combine
    (`permute="triton"`), and the permutation fused into the gate/up GEMM's loads
    (`permute="gather"`);
  * loop: the same with one F.linear per expert (the runtime's per-expert loop, one host read);
  * hf: transformers' own experts module of the family's sparse MoE block (Qwen3MoeSparseMoeBlock,
    GptOssMLP) with the same weights and routing, in its default ("eager") implementation and,
    where the installed transformers offers it, its "grouped_mm" implementation.
The router is not timed (all paths get the same top-k ids and weights).

Roofline: max(bytes / bandwidth, flops / matmul rate), where bytes are the weights of every
ACTIVE expert (one that gets at least one token) read once, flops = 2 * T * K * 3 * D * F, the
bandwidth is measured here with a large device copy (bytes read + written) and the matmul rate
with a large bf16 matmul. The table reports time / roofline, and "best" names the fastest
GroupedExperts variant of each row. The steps table times the permutation and the un-permute +
combine both ways (torch ops, Triton kernels) next to the GEMMs and the nonlinearity.

Launch overhead: the eager timings start each call from an idle device, so the host's launch
overhead counts in full (a few us per torch op or Triton launch). Every GroupedExperts variant
whose forward reads nothing back to the host (`GroupedExperts.why_not_capturable`) is also
captured as CUDA graphs (one per rotating input set, static buffers, after a warm-up on a side
stream) and timed replayed, as a serving engine runs its decode steps; the replayed output is
checked against the eager one (bitwise: the same kernels run). The steps table is replayed as
graphs too. "Work per layer" counts, in Python, the aten ops that run device work, the Triton
launches and the host reads of one eager call (`count_ops`). On the CPU nothing is
graph-timed (the outputs say so). The summary line names, per shape at 768 tokens, the best
eager and the best graph-replayed ratio to the roofline.

Tuning (`--tune`, CUDA only): before each shape's timing at each token count, each
projection's Triton GEMM is run with every config in TUNE_CANDIDATES (`tune_gemms`): its output
checked against the default config's (REL_TOL), then timed replayed as CUDA graphs over the
rotating inputs (gate/up gathering the token rows through the index, with its bias, as the
layer runs it; down on the activated rows). The fastest of each projection is recorded (every
candidate's time goes to the JSON and .md) and the variant `triton gather tuned` runs them
(`GroupedExperts(gemm_configs=...)`), checked against `triton gather` and `grouped` on the same
input and timed like the other variants; the steps table adds the gather GEMMs with the tuned
configs. Shapes in NOT_TUNED and runs on the CPU are not tuned, and the outputs say why.

Correctness first: on each shape's D and F with 8 experts and fresh random inputs, the grouped
path on the device equals the CPU loop twin (`loop_experts`, float32 from the same bf16 weights),
and on the full layer grouped, loop and hf agree.

    python3 -m experiments.runtime.moe_layer --device cuda --tune --out "$OUT" # on the H200
    python -m experiments.runtime.moe_layer --device cpu --quick --out /tmp/moe # here (tiny)

Writes moe_layer.json, moe_layer.md and manifest.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.calibration.calibrate_h200 import Timer, measure_copy, measure_matmul, rand
from experiments.manifest import Manifest
from probe.runtime.experts import (
    GemmConfigs,
    GroupedExperts,
    grouped_linear,
    grouped_mm_available,
    loop_experts,
)
from probe.runtime.glu import GluSpec, fused_glu, fused_glu_applies
from probe.runtime.permute import combine as combine_kernel
from probe.runtime.permute import permute as permute_kernel
from probe.runtime.permute import triton_applies
from probe.runtime.quant import PackedWeight
from probe.runtime.quant_gemm import DEFAULT_CONFIGS, KernelConfig, grouped_matmul

try:  # pragma: no cover - triton is optional (runtime extra)
    from triton.runtime import interpreter as triton_interpreter
    from triton.runtime import jit as triton_jit
except ImportError:  # pragma: no cover
    triton_interpreter = triton_jit = None

SHAPES = {  # name: (family, E, K, D, F)
    "gpt-oss-120b": ("gpt_oss", 128, 4, 2880, 2880),
    "qwen3-235b-a22b": ("qwen3_moe", 128, 8, 4096, 1536),
    "small (trained)": ("qwen3_moe", 64, 4, 256, 64),
}
QUICK_SHAPES = {
    "gpt-oss (tiny)": ("gpt_oss", 8, 2, 64, 32),
    "qwen3 (tiny)": ("qwen3_moe", 8, 2, 64, 32),
}
TOKENS, QUICK_TOKENS = (256, 768, 1536), (16,)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
ROTATE = 4  # different inputs cycled through the timed calls
REL_TOL = 2e-2  # relative (Frobenius) error allowed between two paths' bf16 outputs

# --tune: Triton grouped-GEMM configs tried for each projection at each (shape, T), replayed as
# CUDA graphs; `triton gather tuned` then runs the winners. The skewed router gives a few
# popular experts hundreds of rows (up to ~750 at 768 tokens) and most active experts a handful
# (median 4-6): each GEMM streams the active experts' weights, re-reading a popular expert's
# weight tile (from L2 at best) once per program that covers some of its rows. Each candidate is
# here for one reason; in brackets the shared memory and registers per program of its sm_90
# build (gate/up form; none spills, all fit an H200 SM: tests/test_kernels_sm90.py):
TUNE_CANDIDATES = (
    # the default (DEFAULT_CONFIGS["bf16"]), so the tuned layer never runs a config slower than
    # the untuned one by more than the timing noise [72 KB, 118 regs: 3 programs per SM]
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    # one more load in flight per program, same tile [96 KB: 2 per SM]
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    # the deepest pipeline, 8 warps to issue it [120 KB: 1 per SM]
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=5),
    # BK 128: twice the weight bytes per load [144 KB]
    KernelConfig(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3),
    # BN 256: half the column tiles, so half the programs that find no rows (the grid has E
    # spare row tiles per column tile) and the gathered x rows are read half as often [120 KB]
    KernelConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3),
    # BN 64: twice the programs, each half as long: a finer last wave [64 KB, 3 per SM]
    KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
    # BM 128: a popular expert's weight tile is read once per 128 rows, not 64 [96 KB]
    KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    # the same 128 rows per program as two 64-row tiles, so an expert with 64 rows or fewer
    # skips the second tile's MMAs [80 KB, 230 regs: 2 per SM]
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3, row_tiles=2),
    # four 64-row tiles: weights once per 256 rows for the popular experts; 8 warps hold the
    # four accumulators (with 4 warps they spill) [80 KB, 219 regs: 1 per SM]
    KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3, row_tiles=4),
    # BM 32, computed transposed (the weight tile is the wgmma's 64+-row side): an expert with
    # a few rows pads them to 32, not 64 [80 KB]
    KernelConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4, swap_ab=True),
    # the same with four 32-row tiles per program: weights once per 128 rows, padding to 32
    # [84 KB, 236 regs: 2 per SM]
    KernelConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4, row_tiles=4,
                 swap_ab=True),
)
# Split-K is not among them: at 768 tokens each GEMM already has thousands of programs with
# rows (tens per SM), so splitting K adds no parallelism that is missing, and a deterministic
# reduction of the fp32 partial sums would write and read them again (gate/up of gpt-oss-120b:
# 3072 x 5760 x 4 B = 71 MB per split, ~30 us at HBM speed, against a ~70 us gap to close).
QUICK_TUNE_CANDIDATES = (  # --quick on CUDA: the default and two others (a smoke run)
    TUNE_CANDIDATES[0], TUNE_CANDIDATES[4], TUNE_CANDIDATES[9])
TUNED = "triton gather tuned"  # "triton gather" with each projection's winning config
NOT_TUNED = {"small (trained)": "not tuned: launch-bound (its roofline is ~1 us), so tiles "
                                "do not matter there, and its E = 64 would compile every "
                                "candidate again"}
TUNE_OFF_CPU = ("not tuned: the Triton GEMM runs on CUDA only (on the CPU the Triton variants "
                "run torch ops, and the interpreter's timings say nothing about a GPU)")
TUNE_OFF = "not tuned: run with --tune to time the Triton GEMM configs"


def activation(family: str):
    """The family's expert nonlinearity on gate_up [n, 2F] (gate half first), as MoEBlock's."""
    if family == "gpt_oss":
        def act(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            gate = gate.clamp(max=SWIGLU_LIMIT)
            up = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
            return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA))
        return act

    def silu_glu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return silu_glu


def combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """MoEBlock.combine: weighted sum over K in float32, back to y's dtype."""
    return (y.float() * topk_weights.float()[..., None]).sum(dim=1).to(y.dtype)


def layer_weights(family: str, e: int, d: int, f: int, dtype, device) -> dict:
    w = {"w_gate_up": rand((e, 2 * f, d), dtype, device, d ** -0.5),
         "w_down": rand((e, d, f), dtype, device, f ** -0.5)}
    if family == "gpt_oss":
        w["b_gate_up"] = rand((e, 2 * f), dtype, device, 0.1)
        w["b_down"] = rand((e, d), dtype, device, 0.1)
    return w


def glu_spec(family: str) -> GluSpec:
    """The family's nonlinearity as a GluSpec (the same function as `activation(family)`)."""
    if family == "gpt_oss":
        return GluSpec("clamped_swiglu", SWIGLU_ALPHA, SWIGLU_LIMIT)
    return GluSpec("silu")


# The GroupedExperts variants timed: (fused bias + GLU kernel, GEMM backend, permutation).
GROUPED_VARIANTS = {
    "grouped": (False, "torch", "torch"),  # what the runtime runs by default
    "grouped fused": (True, "torch", "torch"),
    "grouped triton": (True, "triton", "torch"),
    "fused + triton permute": (True, "torch", "triton"),
    "triton + triton permute": (True, "triton", "triton"),
    "triton gather": (True, "triton", "gather"),
}
OURS = (*GROUPED_VARIANTS, TUNED)  # the GroupedExperts paths (TUNED only with --tune on CUDA)


def experts_of(family: str, w: dict, grouped: bool, *, fused: bool = False,
               backend: str = "torch", permute: str = "torch",
               gemm_configs: GemmConfigs | None = None) -> GroupedExperts:
    return GroupedExperts(w["w_gate_up"], w["w_down"], activation(family),
                          b_gate_up=w.get("b_gate_up"), b_down=w.get("b_down"), grouped=grouped,
                          glu=glu_spec(family) if fused else None, backend=backend,
                          permute=permute, gemm_configs=gemm_configs)


def tuned_experts(family: str, w: dict, configs: GemmConfigs) -> GroupedExperts:
    """The TUNED variant: "triton gather" running `configs`."""
    fused, backend, permute = GROUPED_VARIANTS["triton gather"]
    return experts_of(family, w, True, fused=fused, backend=backend, permute=permute,
                      gemm_configs=configs)


def tune_gemms(family: str, w: dict, inputs: list, k: int, candidates, time_step
               ) -> tuple[GemmConfigs, dict]:
    """The fastest of `candidates` (KernelConfigs) for each projection's Triton GEMM, as the
    TUNED layer runs it: the gate/up GEMM reading the token rows through the permutation
    index (x_index) with its bias in the epilogue, the down GEMM on the activated rows with
    its bias. `time_step(step, staged) -> seconds` times step(*staged[i]) over the rotating
    staged inputs (on CUDA: replayed as CUDA graphs). Each candidate's output on the first
    input set is first checked against the default config's (DEFAULT_CONFIGS["bf16"], the
    untuned layer's): one that differs by more than REL_TOL, or fails (e.g. too much shared
    memory), is reported and not timed. Returns (the winners, {"gate_up" / "down": {"default",
    "winner", "default_seconds", "winner_seconds", "candidates": {label: {"seconds",
    "rel_err"} or {"error"}}}, "seconds": wall time of the tuning}). Takes bf16 rows on CUDA,
    or on the CPU under TRITON_INTERPRET=1 (the tests: no timing meaning there)."""
    t0 = time.perf_counter()
    default = DEFAULT_CONFIGS["bf16"]
    candidates = list(dict.fromkeys((default, *candidates)))  # the default first, once
    w_gu = PackedWeight("bf16", tuple(w["w_gate_up"].shape), (w["w_gate_up"].contiguous(),))
    w_dn = PackedWeight("bf16", tuple(w["w_down"].shape), (w["w_down"].contiguous(),))
    b_gu, b_dn = w.get("b_gate_up"), w.get("b_down")
    probe = GroupedExperts(w["w_gate_up"], w["w_down"], activation(family))  # the sort only
    staged = {"gate_up": [], "down": []}
    with torch.no_grad():
        for x, ids, _ in inputs:
            order, _, offs = probe._permutation(ids.reshape(-1), x.device)
            token = order // k  # [T*K] token of each sorted row
            gate_up = grouped_matmul(x, w_gu, offs, bias=b_gu, x_index=token)  # [T*K, 2F]
            h = activation(family)(gate_up.float()).to(x.dtype)  # [T*K, F]
            staged["gate_up"].append((x, token, offs))
            staged["down"].append((h, offs))

    def gemm(name, cfg):
        if name == "gate_up":
            return lambda x, token, offs: grouped_matmul(x, w_gu, offs, config=cfg, bias=b_gu,
                                                         x_index=token)
        return lambda h, offs: grouped_matmul(h, w_dn, offs, config=cfg, bias=b_dn)

    winners, record = {}, {}
    for name in ("gate_up", "down"):
        with torch.no_grad():
            want = gemm(name, default)(*staged[name][0]).float()
        trials = {}
        for cfg in candidates:
            try:
                with torch.no_grad():
                    got = gemm(name, cfg)(*staged[name][0]).float()
                rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
                if not rel <= REL_TOL:
                    trials[cfg.label()] = {"error": f"differs from the default config's "
                                                    f"output (rel err {rel:.2e}): not timed"}
                    continue
                with torch.no_grad():
                    trials[cfg.label()] = {"seconds": time_step(gemm(name, cfg), staged[name]),
                                           "rel_err": rel}
            except Exception as err:  # noqa: BLE001 - a config that does not run is reported
                trials[cfg.label()] = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
        if "seconds" not in trials[default.label()]:
            raise RuntimeError(f"tune_gemms: the default config failed on the {name} GEMM: "
                               f"{trials[default.label()]}")
        timed = [c for c in candidates if "seconds" in trials[c.label()]]
        best = min(timed, key=lambda c: trials[c.label()]["seconds"])
        winners[name] = best
        record[name] = {"default": default.label(), "winner": best.label(),
                        "default_seconds": trials[default.label()]["seconds"],
                        "winner_seconds": trials[best.label()]["seconds"],
                        "candidates": trials}
    record["seconds"] = time.perf_counter() - t0
    return GemmConfigs(gate_up=winners["gate_up"], down=winners["down"]), record


def skewed_routing(gen: torch.Generator, tokens: int, e: int, k: int, device):
    """topk ids [T, K] and weights [T, K] fp32 from noise + a Zipf-like per-expert bias."""
    bias = -1.2 * torch.log(torch.arange(1, e + 1, dtype=torch.float32))  # popular experts first
    bias = bias[torch.randperm(e, generator=gen)]
    logits = torch.randn(tokens, e, generator=gen) + bias
    top, ids = torch.topk(logits, k, dim=-1)
    return ids.to(device), torch.softmax(top, dim=-1).to(device)


def hf_experts(family: str, w: dict, e: int, k: int, d: int, f: int, dtype, device):
    """transformers' experts module of the family's sparse MoE block, loaded with w; or the
    reason it is unavailable."""
    try:
        if family == "gpt_oss":
            from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as Block
            cfg = GptOssConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                               num_experts_per_tok=k, num_hidden_layers=1,
                               swiglu_limit=SWIGLU_LIMIT)
        else:
            from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import (
                Qwen3MoeSparseMoeBlock as Block,
            )
            cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=e,
                                 num_experts_per_tok=k, num_hidden_layers=1, norm_topk_prob=True)
    except ImportError as err:
        return None, f"unavailable in the installed transformers ({err})"
    try:
        with torch.device("meta"):
            block = Block(cfg)
        block = block.to(dtype).to_empty(device=device)
        ex = block.experts
        _load_hf(ex, family, w, f)
    except (TypeError, AttributeError, ValueError, RuntimeError) as err:
        return None, f"could not be built from the installed transformers ({err})"
    return ex, "ok"


def _load_hf(ex, family: str, w: dict, f: int) -> None:
    """Our weights into transformers' experts module (its layout for the family)."""
    with torch.no_grad():
        if family == "gpt_oss":  # [E, D, 2F] with gate / up columns interleaved; [E, F, D]
            gu = w["w_gate_up"].transpose(1, 2)  # [E, D, 2F], gate half first
            ex.gate_up_proj[:, :, 0::2] = gu[:, :, :f]
            ex.gate_up_proj[:, :, 1::2] = gu[:, :, f:]
            ex.gate_up_proj_bias[:, 0::2] = w["b_gate_up"][:, :f]
            ex.gate_up_proj_bias[:, 1::2] = w["b_gate_up"][:, f:]
            ex.down_proj.copy_(w["w_down"].transpose(1, 2))
            ex.down_proj_bias.copy_(w["b_down"])
        else:  # the same layout as ours
            ex.gate_up_proj.copy_(w["w_gate_up"])
            ex.down_proj.copy_(w["w_down"])


def hf_call(ex, impl: str):
    def call(x, ids, weights):
        ex.config._experts_implementation = impl
        return ex(x, ids, weights.to(x.dtype))
    return call


def _moe_call(experts: GroupedExperts):
    # combine None: the weighted sum (this file's `combine`), which the Triton permutation
    # runs as one kernel
    return lambda x, ids, weights: experts.moe(x, ids, weights)


class GraphReplay:
    """call(*inputs[i]) captured as one CUDA graph per input set (the input tensors are the
    graphs' static buffers; the graphs share one memory pool), after a warm-up of every set on
    a side stream (it compiles the Triton kernels and runs the one-time probes, which must not
    happen inside a capture). Calling the object replays the next graph (cycling, as the eager
    timing cycles its inputs); `outputs[i]` is graph i's output buffer."""

    def __init__(self, call, inputs: list) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for inp in inputs:
                call(*inp)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.outputs = [], []
        for inp in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = call(*inp)
            self.graphs.append(graph)
            self.outputs.append(out)
        self.turn = -1

    def __call__(self) -> None:
        self.turn = (self.turn + 1) % len(self.graphs)
        self.graphs[self.turn].replay()


def time_graph(call, inputs: list, timer: Timer, eager_out: torch.Tensor | None = None) -> dict:
    """{"seconds": median replay time} of `call` captured as CUDA graphs (GraphReplay), with
    "bitwise" (graph 0's output equals `eager_out`, the eager call on inputs[0]) and
    "rel_err" when eager_out is given."""
    replay = GraphReplay(call, inputs)
    res = {}
    if eager_out is not None:
        replay.graphs[0].replay()
        torch.cuda.synchronize()
        got = replay.outputs[0]
        res["bitwise"] = bool(torch.equal(got, eager_out))
        res["rel_err"] = float((got.float() - eager_out.float()).norm()
                               / eager_out.float().norm().clamp_min(1e-30))
    res["seconds"] = timer(replay)
    del replay
    return res


_NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
            "promote_types"}
_HOST_READS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select"}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run device work (not views, not bare allocations) and those
    that read a device value to the host (or need one for an output shape); ops issued from
    inside a Triton launch (the interpreter's own copies) are not counted."""

    def __init__(self, inside: list) -> None:
        super().__init__()
        self.ops, self.reads, self.inside = Counter(), Counter(), inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside[0]:
            if name in _HOST_READS:
                self.reads[name] += 1
            elif not func.is_view and name not in _NO_WORK:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> dict:
    """What one call of fn() launches: {"device_ops": aten ops that run device work (each one
    kernel or a few, e.g. a sort), "triton": Triton launches, "host_reads": reads of a device
    value to the host (item, tolist, data-dependent shapes), "ops": the aten ops by name}.
    A count of calls in Python, not of CUDA kernels: it is the same on the CPU and the GPU
    for the same code path."""
    launches, inside, reads = Counter(), [0], Counter()
    kinds = [] if triton_jit is None else [triton_jit.JITFunction]
    if triton_interpreter is not None:
        kinds.append(triton_interpreter.InterpretedFunction)
    originals = {k: k.run for k in kinds}
    tolist = torch.Tensor.tolist

    def counted(kind):
        def run(self, *args, **kwargs):
            if not inside[0]:
                launches[getattr(self, "__name__", None) or self.fn.__name__] += 1
            inside[0] += 1
            try:
                return originals[kind](self, *args, **kwargs)
            finally:
                inside[0] -= 1
        return run

    def counted_tolist(self):
        if not inside[0]:
            reads["tolist"] += 1
        return tolist(self)

    try:
        for kind in kinds:
            kind.run = counted(kind)
        torch.Tensor.tolist = counted_tolist
        with _OpCounter(inside) as counter:
            fn()
    finally:
        for kind, run in originals.items():
            kind.run = run
        torch.Tensor.tolist = tolist
    reads.update(counter.reads)
    return {"device_ops": sum(counter.ops.values()), "triton": sum(launches.values()),
            "host_reads": sum(reads.values()), "ops": {**counter.ops, **launches, **reads}}


def _rotating(call, inputs: list):
    """fn() for the timer: call on the next of `inputs` each time (cycling)."""
    state = {"i": 0}

    def fn():
        state["i"] += 1
        return call(*inputs[state["i"] % len(inputs)])
    return fn


def twin_case(family: str, d: int, f: int, k: int, device, dtype) -> dict:
    """The CPU twin's test case for a shape's D and F: 8 experts' bf16 weights on the device,
    40 fresh tokens routed top-K, and `want` [40, D], the loop twin's output (`loop_experts`
    on the CPU in float32 from the same bf16 weights, then the weighted sum)."""
    gen = torch.Generator().manual_seed(11)
    e = 8
    w = layer_weights(family, e, d, f, dtype, device)
    x = rand((40, d), dtype, device)
    ids, weights = skewed_routing(gen, 40, e, k, device)
    w32 = {n: t.float().cpu() for n, t in w.items()}
    rows = loop_experts(x.float().cpu().repeat_interleave(k, 0), ids.cpu().reshape(-1),
                        w32["w_gate_up"], w32["w_down"], activation(family),
                        w32.get("b_gate_up"), w32.get("b_down"))
    return {"w": w, "x": x, "ids": ids, "weights": weights,
            "want": combine(rows.view(40, k, d), weights.cpu())}


def twin_error(case: dict, family: str, **opts) -> float:
    """Relative error of `experts_of(family, ..., **opts).moe` on the twin case's input."""
    experts = experts_of(family, case["w"], True, **opts)
    got = experts.moe(case["x"], case["ids"], case["weights"]).float().cpu()
    return float((got - case["want"]).norm() / case["want"].norm())


def check_against_cpu_twin(family: str, d: int, f: int, k: int, device, dtype,
                           case: dict | None = None) -> tuple[float, dict]:
    """Every grouped variant on the device vs loop_experts on the CPU in float32, 8 experts,
    fresh inputs (`twin_case`, made here unless given): (the largest relative error,
    {variant: why it is left out}). The default `grouped` must run and agree (else
    AssertionError); an opt-in variant that fails to run or disagrees is left out of the
    timing and reported."""
    case = twin_case(family, d, f, k, device, dtype) if case is None else case
    worst, left_out = 0.0, {}
    for label, (fused, backend, permute) in GROUPED_VARIANTS.items():
        try:
            err = twin_error(case, family, fused=fused, backend=backend, permute=permute)
        except Exception as exc:  # noqa: BLE001 - an opt-in kernel that fails is reported
            if label == "grouped":
                raise
            left_out[label] = f"{type(exc).__name__}: {str(exc)[:160]}"
            continue
        if err > REL_TOL:
            msg = f"{family} D={d} F={f}: {label} on {device} vs CPU twin rel err {err}"
            if label == "grouped":
                raise AssertionError(msg)
            left_out[label] = msg
            continue
        worst = max(worst, err)
    for label, msg in left_out.items():
        print(f"left out {label}: {msg}", flush=True)
    return worst, left_out


def time_parts(experts: GroupedExperts, family: str, w: dict, inputs: list, timer: Timer,
               k: int, graph_timer: Timer | None = None,
               configs: GemmConfigs | None = None) -> tuple[dict, dict]:
    """Seconds of each step of the grouped layer on its own (rotating inputs, like the
    whole layer): the permutation (torch ops; the Triton kernels with and without the row
    gather), the two GEMMs (torch._grouped_mm / the Triton kernel, no bias; the Triton one
    also with the gate/up rows gathered in its loads), the bias + nonlinearity op by op and
    fused, the un-permutation and combine (torch ops; the Triton kernel). Returns (eager
    seconds, graph-replayed seconds): with graph_timer (CUDA only) each step is also
    captured as CUDA graphs over the same staged inputs and replayed (`time_graph`). With
    `configs` (the tuned GEMM configs) the gather GEMMs are also timed running them."""
    staged = []
    with torch.no_grad():
        for x, ids, weights in inputs:
            order, slot_sorted, offs = experts._permutation(ids.reshape(-1), x.device)
            token = order // k  # [T*K] token of each sorted row
            rows = x.index_select(0, token)
            gate_up = grouped_linear(rows, w["w_gate_up"], offs)
            h = activation(family)(gate_up)
            y = grouped_linear(h, w["w_down"], offs)
            inv = torch.empty_like(order).index_copy_(
                0, order, torch.arange(order.numel(), device=x.device)).view(-1, k)  # [T, K]
            staged.append((x, ids, weights, order, slot_sorted, offs, rows, gate_up, h, y, inv,
                           token))

    def permute(x, ids, *_):
        order = experts._permutation(ids.reshape(-1), x.device)[0]
        x.index_select(0, order // k)

    def gemms(backend):
        def run(*s):
            grouped_linear(s[6], w["w_gate_up"], s[5], backend=backend)
            grouped_linear(s[8], w["w_down"], s[5], backend=backend)
        return run

    b_gu = w.get("b_gate_up")
    spec = glu_spec(family)

    def act_ops(*s):
        gate_up = s[7] if b_gu is None else s[7] + b_gu.index_select(0, s[4])
        activation(family)(gate_up)

    def act_fused(*s):
        fused_glu(s[7], spec, b_gu, None if b_gu is None else s[4])

    def unpermute_combine(*s):
        y = torch.empty_like(s[9]).index_copy_(0, s[3], s[9])
        combine(y.view(s[0].shape[0], k, -1), s[2])

    n_exp = experts.num_experts

    def permute_triton(gather_rows):
        return lambda x, ids, *_: permute_kernel(x, ids, n_exp, gather_rows=gather_rows)

    def combine_triton(*s):
        combine_kernel(s[9], s[10], s[2])

    def gemms_gather(cfg: GemmConfigs):  # the gate/up GEMM reads the token rows by index
        def run(*s):
            grouped_linear(s[0], w["w_gate_up"], s[5], backend="triton", x_index=s[11],
                           config=cfg.gate_up)
            grouped_linear(s[8], w["w_down"], s[5], backend="triton", config=cfg.down)
        return run

    steps = {"permute": permute, "gemms grouped_mm": gemms("torch"),
             "gemms triton": gemms("triton"), "bias+act ops": act_ops,
             "unpermute+combine": unpermute_combine}
    if fused_glu_applies(staged[0][7]):
        steps["bias+act fused"] = act_fused
    if triton_applies(staged[0][0]):
        steps["permute triton"] = permute_triton(True)
        steps["permute triton (no rows)"] = permute_triton(False)
        steps["unpermute+combine triton"] = combine_triton
        steps["gemms triton gather"] = gemms_gather(GemmConfigs())
        if configs is not None:
            steps["gemms triton gather tuned"] = gemms_gather(configs)
    seconds, graphed = {}, {}
    with torch.no_grad():
        for name, step in steps.items():
            try:
                seconds[name] = timer(_rotating(step, staged))
            except Exception as err:  # noqa: BLE001 - a step that fails is left out, said
                print(f"step {name} left out: {type(err).__name__}: {str(err)[:160]}",
                      flush=True)
                continue
            if graph_timer is None:
                continue
            try:
                graphed[name] = time_graph(step, staged, graph_timer)["seconds"]
            except Exception as err:  # noqa: BLE001 - a step that does not capture, said
                print(f"step {name} not graph-timed: {type(err).__name__}: "
                      f"{str(err)[:160]}", flush=True)
    return seconds, graphed


GRAPHS_OFF_CPU = "not graph-timed: CUDA graphs need a CUDA device (this run is on the CPU)"
HF_EAGER_ONLY = ("not graph-timed: transformers' experts module is timed as it ships (its "
                 "eager form loops over the experts that have tokens, a host read)")


def tune_skipped(name: str, device, candidates) -> str | None:
    """Why shape `name` on `device` is not tuned (None: it is)."""
    if candidates is None:
        return TUNE_OFF
    if device.type != "cuda":
        return TUNE_OFF_CPU
    return NOT_TUNED.get(name)


def bench_shape(name: str, spec, tokens, timer: Timer, device, dtype, hw: dict,
                graph_timer: Timer | None = None, candidates=None,
                tune_timer: Timer | None = None) -> list[dict]:
    """Rows of one shape at each token count. candidates: the Triton GEMM configs to tune
    (`tune_gemms`, replayed as CUDA graphs with tune_timer) before each token count's timing,
    which then includes the TUNED variant; None: no tuning."""
    family, e, k, d, f = spec
    case = twin_case(family, d, f, k, device, dtype)
    twin_err, left_out = check_against_cpu_twin(family, d, f, k, device, dtype, case)
    w = layer_weights(family, e, d, f, dtype, device)
    paths = {label: experts_of(family, w, True, fused=fused, backend=backend, permute=permute)
             for label, (fused, backend, permute) in GROUPED_VARIANTS.items()
             if label not in left_out}
    paths["loop"] = experts_of(family, w, False)
    ex, hf_status = hf_experts(family, w, e, k, d, f, dtype, device)
    calls = {p: _moe_call(g) for p, g in paths.items()}
    if ex is not None:
        calls["hf eager"] = hf_call(ex, "eager")
        calls["hf grouped_mm"] = hf_call(ex, "grouped_mm")
    rows = []
    gen = torch.Generator().manual_seed(5)
    expert_bytes = sum(t[0].numel() * t.element_size() for t in w.values())
    for t in tokens:
        inputs = [(rand((t, d), dtype, device), *skewed_routing(gen, t, e, k, device))
                  for _ in range(ROTATE)]
        active = sum(int(torch.unique(ids).numel()) for _, ids, _ in inputs) / ROTATE
        flops = 2 * t * k * 3 * d * f
        roof = max(active * expert_bytes / hw["bandwidth"], flops / hw["matmul_flops"])
        row = {"shape": name, "family": family, "E": e, "K": k, "D": d, "F": f, "tokens": t,
               "active_experts": active, "weight_bytes_read": active * expert_bytes,
               "flops": flops, "roofline_s": roof, "hf": hf_status, "twin_rel_err": twin_err,
               "grouped_mm_used": paths["grouped"].uses_grouped_mm(), "seconds": {},
               "rel_err_vs_grouped": {}, "errors": dict(left_out), "graph_seconds": {},
               "graph_check": {}, "graph_skipped": {}, "ops_per_layer": {}}
        paths_t, calls_t, configs = dict(paths), dict(calls), None
        why_not = tune_skipped(name, device, candidates)
        if why_not is None and "triton gather" in left_out:
            why_not = f"not tuned: triton gather is left out ({left_out['triton gather']})"
        if why_not is None:
            try:
                configs, row["tuning"] = tune_gemms(
                    family, w, inputs, k, candidates,
                    lambda step, staged: time_graph(step, staged, tune_timer)["seconds"])
            except Exception as err:  # noqa: BLE001 - a failed tuning is reported, not fatal
                why_not = f"not tuned: the tuning failed ({type(err).__name__}: {str(err)[:160]})"
        if why_not is None:  # the winners against the CPU twin too, as every variant
            row["tuning"]["configs"] = configs.label()
            fused, backend, permute = GROUPED_VARIANTS["triton gather"]
            try:
                err = twin_error(case, family, fused=fused, backend=backend, permute=permute,
                                 gemm_configs=configs)
            except Exception as exc:  # noqa: BLE001 - reported, the variant left out
                err, row["errors"][TUNED] = None, f"{type(exc).__name__}: {str(exc)[:160]}"
            row["tuning"]["twin_rel_err"] = err
            if err is None or err > REL_TOL:  # the tuning kept, the variant not run
                row["errors"].setdefault(TUNED, f"vs CPU twin rel err {err}: left out")
                why_not = f"tuned, but not run: the winners failed the CPU twin ({err})"
                row["tuning"] = {"skipped": why_not, "failed": row["tuning"]}
        if why_not is None:
            tuned = tuned_experts(family, w, configs)
            paths_t = {**paths, TUNED: tuned}
            calls_t = {**calls, TUNED: _moe_call(tuned)}
        elif "tuning" not in row:
            row["tuning"] = {"skipped": why_not}
        with torch.no_grad():
            ref = calls["grouped"](*inputs[0]).float()
            untuned = None  # the "triton gather" output, which TUNED (run last) must match
            for path, call in calls_t.items():
                try:
                    raw = call(*inputs[0])
                except Exception as err:  # noqa: BLE001 - a path that fails is reported
                    row["errors"][path] = f"{type(err).__name__}: {str(err)[:160]}"
                    continue
                out = raw.float()
                rel = float((out - ref).norm() / ref.norm())
                row["rel_err_vs_grouped"][path] = rel
                if rel > REL_TOL:
                    raise AssertionError(f"{name} T={t}: {path} differs from grouped ({rel})")
                if path == "triton gather":
                    untuned = out
                if path == TUNED and untuned is None:
                    row["errors"][TUNED] = "triton gather failed: nothing to check it against"
                    continue
                if path == TUNED:  # the tuned configs against the untuned kernel, same input
                    rel = float((out - untuned).norm() / untuned.norm())
                    row["tuning"]["rel_err_vs_untuned"] = rel
                    if rel > REL_TOL:
                        raise AssertionError(f"{name} T={t}: {TUNED} differs from triton "
                                             f"gather ({rel})")
                row["seconds"][path] = timer(_rotating(call, inputs))
                if path in paths_t:
                    try:
                        row["ops_per_layer"][path] = count_ops(
                            lambda c=call, a=inputs[0]: c(*a))
                    except Exception as err:  # noqa: BLE001 - the count is a side result
                        row["errors"][f"{path} (count)"] = f"{type(err).__name__}: {err}"
                    _graph_time(row, path, paths_t[path], call, inputs, raw, graph_timer)
                else:
                    row["graph_skipped"][path] = HF_EAGER_ONLY
            del untuned
        row["vs_roofline"] = {p: s / roof for p, s in row["seconds"].items()}
        row["graph_vs_roofline"] = {p: s / roof for p, s in row["graph_seconds"].items()}
        ours = {p: sec for p, sec in row["seconds"].items() if p in OURS}
        fastest = min(ours, key=ours.get)
        row["best"] = {"path": fastest, "seconds": ours[fastest],
                       "vs_roofline": ours[fastest] / roof}
        graphed = {p: sec for p, sec in row["graph_seconds"].items() if p in OURS}
        row["graph_best"] = None
        if graphed:
            fastest = min(graphed, key=graphed.get)
            row["graph_best"] = {"path": fastest, "seconds": graphed[fastest],
                                 "vs_roofline": graphed[fastest] / roof}
        row["parts"], row["parts_graph"] = time_parts(paths["grouped"], family, w, inputs,
                                                      timer, k, graph_timer, configs)
        rows.append(row)
        times = "  ".join(f"{p} {s * 1e6:8.1f} us ({s / roof:5.2f}x)"
                          for p, s in row["seconds"].items())
        gtimes = "  ".join(f"{p} {s * 1e6:8.1f} us ({s / roof:5.2f}x)"
                           for p, s in row["graph_seconds"].items()) or "none"
        parts = "  ".join(f"{p} {s * 1e6:.1f}" for p, s in row["parts"].items())
        gparts = "  ".join(f"{p} {s * 1e6:.1f}" for p, s in row["parts_graph"].items())
        print(f"{name:16s} T={t:5d} tuning: {_tuning_line(row['tuning'])}", flush=True)
        print(f"{name:16s} T={t:5d} active={active:6.1f} roofline {roof * 1e6:8.1f} us  {times}\n"
              f"{'':16s} graph-replayed: {gtimes}\n"
              f"{'':16s} steps (us): {parts}\n"
              f"{'':16s} steps graph-replayed (us): {gparts or 'none'}", flush=True)
    del w, paths, calls, ex, paths_t, calls_t, case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _graph_time(row: dict, path: str, experts: GroupedExperts, call, inputs: list,
                eager_out: torch.Tensor, graph_timer: Timer | None) -> None:
    """Time `call` replayed as CUDA graphs into row["graph_seconds"] (with the replayed
    output's check against the eager one in row["graph_check"]), or say in
    row["graph_skipped"] / row["errors"] why not."""
    why = GRAPHS_OFF_CPU if graph_timer is None else experts.why_not_capturable(inputs[0][0])
    if why is not None:
        row["graph_skipped"][path] = why
        return
    try:
        res = time_graph(call, inputs, graph_timer, eager_out)
    except Exception as err:  # noqa: BLE001 - a capture that fails is reported
        row["errors"][f"{path} (graph)"] = f"{type(err).__name__}: {str(err)[:160]}"
        return
    row["graph_check"][path] = {"bitwise": res["bitwise"], "rel_err": res["rel_err"]}
    if res["rel_err"] > 2e-2:
        row["errors"][f"{path} (graph)"] = (f"replayed output differs from eager (rel err "
                                            f"{res['rel_err']:.2e}): not timed")
        return
    if not res["bitwise"]:
        row["errors"][f"{path} (graph)"] = (f"replayed output not bitwise equal to eager "
                                            f"(rel err {res['rel_err']:.2e})")
    row["graph_seconds"][path] = res["seconds"]


def _tuning_line(tuning: dict) -> str:
    """One line on a row's tuning: each projection's winner against the default, or why not."""
    if "skipped" in tuning:
        return tuning["skipped"]
    return ", ".join(f"{name.replace('_', '/')} {r['winner']} {r['winner_seconds'] * 1e6:.1f} us "
                     f"(default {r['default']} {r['default_seconds'] * 1e6:.1f} us)"
                     for name, r in ((n, tuning[n]) for n in ("gate_up", "down")))


def summary(rows: list[dict], tokens: int) -> list[str]:
    """Per shape at `tokens`: the best eager and the best graph-replayed ratio to the roofline."""
    lines = []
    for r in rows:
        if r["tokens"] != tokens:
            continue
        if r["graph_best"]:
            graph = f"{r['graph_best']['vs_roofline']:.2f}x ({r['graph_best']['path']})"
        elif GRAPHS_OFF_CPU in r["graph_skipped"].values():
            graph = f"n/a ({GRAPHS_OFF_CPU})"
        else:
            graph = "n/a (no variant was captured)"
        tuning = r.get("tuning", {"skipped": TUNE_OFF})
        tuned = (tuning["skipped"] if "skipped" in tuning
                 else f"GEMM configs tuned: {tuning['configs']}")
        lines.append(f"{r['shape']} at T={tokens}: best eager {r['best']['vs_roofline']:.2f}x "
                     f"({r['best']['path']}), best graph-replayed {graph} of the roofline; "
                     f"{tuned}")
    return lines


def markdown(rows: list[dict], hw: dict, meta: dict) -> str:
    paths = sorted({p for r in rows for p in r["seconds"]},
                   key=[*OURS, "loop", "hf eager", "hf grouped_mm"].index)
    lines = [f"MoE layer experts on {meta['device_name']} ({meta['dtype']}); measured bandwidth "
             f"{hw['bandwidth'] / 1e9:.1f} GB/s (copy, read+write), matmul "
             f"{hw['matmul_flops'] / 1e12:.0f} TFLOP/s; time in us (x roofline).", "",
             "| shape | T | active E | roofline us | best | " + " | ".join(paths) + " |",
             "|---|---|---|---|---|" + "---|" * len(paths)]
    for r in rows:
        cells = [f"{r['seconds'][p] * 1e6:.0f} ({r['vs_roofline'][p]:.2f}x)" if p in r["seconds"]
                 else "n/a" for p in paths]
        best = f"{r['best']['path']} ({r['best']['vs_roofline']:.2f}x)"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['active_experts']:.1f} | "
                     f"{r['roofline_s'] * 1e6:.0f} | {best} | " + " | ".join(cells) + " |")
    ours = [p for p in paths if p in OURS]
    lines += ["", "Replayed as CUDA graphs (captured once per input set, static buffers; no host "
              "launch overhead), us (x roofline); the replayed output checked against the eager "
              "one (= bitwise equal):", "",
              "| shape | T | roofline us | best eager | best graph | " + " | ".join(ours) + " |",
              "|---|---|---|---|---|" + "---|" * len(ours)]
    for r in rows:
        cells = []
        for p in ours:
            if p in r["graph_seconds"]:
                mark = " =" if r["graph_check"][p]["bitwise"] else ""
                cells.append(f"{r['graph_seconds'][p] * 1e6:.0f} "
                             f"({r['graph_vs_roofline'][p]:.2f}x){mark}")
            else:
                cells.append("n/a")
        gbest = (f"{r['graph_best']['path']} ({r['graph_best']['vs_roofline']:.2f}x)"
                 if r["graph_best"] else "n/a")
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['roofline_s'] * 1e6:.0f} | "
                     f"{r['best']['path']} ({r['best']['vs_roofline']:.2f}x) | {gbest} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Work per layer call (counted in Python: aten ops that run device work, "
              "Triton launches, host reads), same at every T:", "",
              "| shape | " + " | ".join(ours) + " |", "|---|" + "---|" * len(ours)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        r = next(r for r in rows if r["shape"] == shape)
        cells = [(f"{c['device_ops']} + {c['triton']} triton, {c['host_reads']} reads"
                  if (c := r["ops_per_layer"].get(p)) else "n/a") for p in ours]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    steps = list(dict.fromkeys(p for r in rows for p in r["parts"]))
    lines += ["", "Steps of the grouped layer timed alone, us (x roofline); the permutation and "
              "the un-permute + combine as torch ops (as `grouped`) and as Triton kernels "
              "(`permute=\"triton\"`; \"no rows\": the index maps only, as `triton gather`), "
              "the GEMMs without bias (\"gather\": the gate/up GEMM reads the token rows "
              "through the index; \"tuned\": with the --tune winners), the bias + "
              "nonlinearity op by op (as `grouped`) and fused (the other variants):", "",
              "| shape | T | " + " | ".join(steps) + " |", "|---|---|" + "---|" * len(steps)]
    for r in rows:
        cells = [f"{r['parts'][p] * 1e6:.0f} ({r['parts'][p] / r['roofline_s']:.2f}x)"
                 if p in r["parts"] else "n/a" for p in steps]
        lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + " |")
    gsteps = list(dict.fromkeys(p for r in rows for p in r["parts_graph"]))
    if gsteps:
        lines += ["", "The same steps replayed as CUDA graphs, us (x roofline):", "",
                  "| shape | T | " + " | ".join(gsteps) + " |",
                  "|---|---|" + "---|" * len(gsteps)]
        for r in rows:
            g = r["parts_graph"]
            cells = [f"{g[p] * 1e6:.0f} ({g[p] / r['roofline_s']:.2f}x)" if p in g else "n/a"
                     for p in gsteps]
            lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + " |")
    else:
        lines += ["", f"Steps replayed as CUDA graphs: {GRAPHS_OFF_CPU}."]
    lines += tuning_markdown(rows)
    notes = sorted({f"{r['shape']}: hf {r['hf']}" for r in rows if r["hf"] != "ok"}
                   | {f"{r['shape']} {p}: {m}" for r in rows for p, m in r["errors"].items()}
                   | {f"{r['shape']} {p}: {m}" for r in rows
                      for p, m in r["graph_skipped"].items() if m != GRAPHS_OFF_CPU})
    return "\n".join(lines + ([""] + notes if notes else []) + ["", *meta["summary"]]) + "\n"


def tuning_markdown(rows: list[dict]) -> list[str]:
    """The --tune tables: each projection's winner against the default per (shape, T), every
    candidate's time; or the reasons nothing was tuned."""
    tuned = [r for r in rows if "skipped" not in r.get("tuning", {"skipped": None})]
    skipped = dict.fromkeys(f"{r['shape']}: {r['tuning']['skipped']}" for r in rows
                            if "skipped" in r.get("tuning", {}))
    lines = ["", "GEMM tuning (`--tune`): each projection's Triton GEMM (gate/up reading the "
             "token rows through the index, with its bias; down with its bias) timed replayed "
             "as CUDA graphs over the rotating inputs for each candidate config, after its "
             "output was checked against the default config's; `" + TUNED + "` runs the "
             "winners (picked on the inputs the layer is then timed on, so a win within the "
             "timing noise may be luck). us per GEMM:"]
    if tuned:
        lines += ["", "| shape | T | gate/up default | gate/up winner | down default | "
                  "down winner | tuned vs untuned rel err | vs CPU twin | tuning s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tuned:
            tu = r["tuning"]
            cells = [f"{tu[n]['default_seconds'] * 1e6:.0f}" if i == 0 else
                     f"{tu[n]['winner']} {tu[n]['winner_seconds'] * 1e6:.0f}"
                     for n in ("gate_up", "down") for i in (0, 1)]
            rels = [tu.get("rel_err_vs_untuned"), tu.get("twin_rel_err")]
            lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + " | "
                         + " | ".join("n/a" if v is None else f"{v:.1e}" for v in rels)
                         + f" | {tu['seconds']:.1f} |")
        token_counts = list(dict.fromkeys(r["tokens"] for r in tuned))
        lines += ["", "Every candidate, us (or why not timed):", "",
                  "| shape | GEMM | config | " + " | ".join(f"T={t}" for t in token_counts)
                  + " |", "|---|---|---|" + "---|" * len(token_counts)]
        for shape in dict.fromkeys(r["shape"] for r in tuned):
            by_t = {r["tokens"]: r["tuning"] for r in tuned if r["shape"] == shape}
            for gemm in ("gate_up", "down"):
                labels = dict.fromkeys(c for tu in by_t.values() for c in tu[gemm]["candidates"])
                for label in labels:
                    cells = []
                    for t in token_counts:
                        c = by_t.get(t, {}).get(gemm, {}).get("candidates", {}).get(label)
                        if c is None:
                            cells.append("n/a")
                        elif "seconds" in c:
                            cells.append(f"{c['seconds'] * 1e6:.0f}")
                        else:  # one line, no cell breaks
                            cells.append(" ".join(c["error"].split())[:80].replace("|", "/"))
                    lines.append(f"| {shape} | {gemm.replace('_', '/')} | {label} | "
                                 + " | ".join(cells) + " |")
    return lines + ([""] + list(skipped) if skipped else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and token counts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tune", action="store_true",
                        help="time each candidate Triton GEMM config (TUNE_CANDIDATES; the "
                             "--quick run: three of them) per shape, token count and "
                             "projection, replayed as CUDA graphs, and add the variant '"
                             + TUNED + "' running the winners (CUDA only: on the CPU the "
                             "outputs say it was not tuned)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Manifest.start("experiments.runtime.moe_layer", argv, out=out)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    t_start = time.perf_counter()
    timer = Timer(device, warmup=1 if args.quick else 3, repeats=2 if args.quick else 10)
    # replays: warm-up and capture are done by GraphReplay; a few replays settle the clocks
    graph_timer = Timer(device, warmup=2, repeats=10) if device.type == "cuda" else None
    # tuning: more replays per candidate, since winners a percent apart are what it picks from
    tune_timer = Timer(device, warmup=2, repeats=20) if device.type == "cuda" else None
    candidates = None
    if args.tune:
        candidates = QUICK_TUNE_CANDIDATES if args.quick else TUNE_CANDIDATES
    copy = measure_copy(timer, device, (1 << 22) if args.quick else (2 << 30))
    mm = measure_matmul(timer, device, dtype, 256 if args.quick else 8192)
    hw = {"bandwidth": copy["bandwidth"], "matmul_flops": mm["flops"], "copy": copy, "matmul": mm}
    print(f"bandwidth {hw['bandwidth'] / 1e9:.1f} GB/s, bf16 matmul "
          f"{hw['matmul_flops'] / 1e12:.1f} TFLOP/s, torch._grouped_mm on {device} bf16: "
          f"{grouped_mm_available(dtype, device)}", flush=True)
    shapes, tokens = (QUICK_SHAPES, QUICK_TOKENS) if args.quick else (SHAPES, TOKENS)
    rows = []
    for name, spec in shapes.items():
        rows += bench_shape(name, spec, tokens, timer, device, dtype, hw, graph_timer,
                            candidates, tune_timer)
    meta = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "grouped_mm_bf16": grouped_mm_available(dtype, device),
            "seconds_total": time.perf_counter() - t_start,
            "tune": bool(args.tune),
            "tune_candidates": None if candidates is None else [c.label() for c in candidates],
            "tune_seconds": sum(r["tuning"].get("seconds", r["tuning"].get("failed", {}).get(
                "seconds", 0.0)) for r in rows),
            "summary": summary(rows, 768 if 768 in tokens else tokens[len(tokens) // 2])}
    md = markdown(rows, hw, meta)
    (out / "moe_layer.json").write_text(json.dumps({"meta": meta, "hardware": hw, "rows": rows},
                                                   indent=1) + "\n")
    (out / "moe_layer.md").write_text(md)
    run.write(out, [out / "moe_layer.json", out / "moe_layer.md"])
    print(md)
    print("\n".join(meta["summary"]))
    if not math.isfinite(meta["seconds_total"]):
        raise SystemExit("timing failed")


if __name__ == "__main__":
    main()
