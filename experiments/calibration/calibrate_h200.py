"""Calibrate the simulator's cost model on one GPU (meant for one H200; runs tiny on CPU too).

Measures, with device events, warm-up and medians over random (never zero) inputs:
  * HBM bandwidth: a large device-to-device copy, bytes read + bytes written over time;
  * bf16 matmul peak: an 8192^3 product (FLOP/s);
  * grouped-GEMM time vs tokens per expert for the expert shapes of GPT-OSS-120B
    (D=2880, F=2880) and Qwen3-235B-A22B (D=4096, F=1536): E_loc local experts (16, what one
    rank of 8 holds of 128) each with n tokens, x @ W_gate_up -> SiLU-gate -> @ W_down;
    through torch._grouped_mm where it works, else a batched matmul (equal n per expert);
  * attention time per layer (q/k/v projection + scaled_dot_product_attention + o projection)
    with each model's head configuration: decode (per-rank batch b, KV length `kv_len`, one
    query token per request) and chunked prefill (one causal chunk of c tokens).
Fits T_expert(n) = alpha + beta * n (least squares, relative error, n >= 64) and reports
eta(n) = n * F / (T_expert(n) * peak) with peak the measured matmul rate.

Writes calibration.json and manifest.json to --out. Shape legend: E_loc local experts, n tokens
per expert, D hidden, F expert FFN width, b decode batch, c prefill chunk, H heads, d head dim.

    python3 -m experiments.calibration.calibrate_h200 --device cuda --out "$OUT"   # on the H200
    python -m experiments.calibration.calibrate_h200 --device cpu --tiny --out /tmp/cal   # here
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from experiments.manifest import Manifest

# Expert and attention shapes of the two paper models (published Hugging Face configs).
MODELS = {
    "gpt-oss-120b": {"hidden": 2880, "expert_ffn": 2880, "num_heads": 64, "num_kv_heads": 8,
                     "head_dim": 64},
    "qwen3-235b-a22b": {"hidden": 4096, "expert_ffn": 1536, "num_heads": 64, "num_kv_heads": 4,
                        "head_dim": 128},
}
TOKENS_PER_EXPERT = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                     4096, 6144, 8192]
DECODE_BATCH = [64, 128, 256, 512, 768, 1024, 1536, 2048]
PREFILL_CHUNK = [1024, 2048, 4096, 8192, 16384, 32768]


class Timer:
    """Median seconds of fn() over `repeats` timed runs after `warmup` runs."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn, inner: int = 1) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.repeats):
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3 / inner)
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)


def rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def measure_copy(timer: Timer, device, num_bytes: int) -> dict:
    src = torch.randint(1, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sec = timer(lambda: dst.copy_(src), inner=5)
    assert torch.equal(dst, src), "copy mismatch"
    return {"bytes": num_bytes, "seconds": sec, "bandwidth": 2 * num_bytes / sec}


def measure_matmul(timer: Timer, device, dtype, size: int) -> dict:
    a = rand((size, size), dtype, device)
    b = rand((size, size), dtype, device)
    out = torch.empty((size, size), dtype=dtype, device=device)
    sec = timer(lambda: torch.matmul(a, b, out=out), inner=3)
    ref = (a[:64].double() @ b.double()).float()
    err = float((out[:64].float() - ref).norm() / ref.norm())
    return {"size": size, "seconds": sec, "flops": 2 * size**3 / sec, "rel_err": err}


def _grouped_mm_ok(device, dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = rand((32, 32), dtype, device)
        w = rand((2, 32, 16), dtype, device)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
        w_cm = w.transpose(-2, -1).contiguous().transpose(-2, -1)
        y = torch._grouped_mm(x, w_cm, offs=offs)
        ref = torch.cat([x[:16] @ w[0], x[16:] @ w[1]])
        return bool(torch.allclose(y.float(), ref.float(), rtol=3e-2, atol=3e-2))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


def measure_experts(timer: Timer, device, dtype, hidden: int, ffn: int, num_local: int,
                    tokens: list[int], use_grouped: bool) -> list[dict]:
    """Time of one layer's expert GEMMs on one rank with num_local experts x n tokens each."""
    # [E_loc, D, 2F] and [E_loc, F, D], column-major per expert as grouped mm prefers.
    w1 = rand((num_local, 2 * ffn, hidden), dtype, device, hidden**-0.5).transpose(-2, -1)
    w2 = rand((num_local, hidden, ffn), dtype, device, ffn**-0.5).transpose(-2, -1)
    rows = []
    for n in tokens:
        x = rand((num_local * n, hidden), dtype, device)  # [E_loc * n, D]
        if use_grouped:
            offs = torch.arange(1, num_local + 1, device=device, dtype=torch.int32) * n

            def run(x=x, offs=offs):
                h = torch._grouped_mm(x, w1, offs=offs)  # [E_loc * n, 2F]
                a = F.silu(h[:, :ffn]) * h[:, ffn:]
                return torch._grouped_mm(a, w2, offs=offs)  # [E_loc * n, D]
        else:
            def run(x=x, n=n):
                h = torch.bmm(x.view(num_local, n, hidden), w1)  # [E_loc, n, 2F]
                a = F.silu(h[..., :ffn]) * h[..., ffn:]
                return torch.bmm(a, w2).view(num_local * n, hidden)
        backend = "torch._grouped_mm" if use_grouped else "torch.bmm"
        try:
            out = run()
        except RuntimeError as err:  # a shape grouped mm rejects: use the batched matmul
            print(f"  grouped mm failed at n={n} ({err}); using bmm", flush=True)
            backend = "torch.bmm"

            def run(x=x, n=n):
                h = torch.bmm(x.view(num_local, n, hidden), w1)  # [E_loc, n, 2F]
                a = F.silu(h[..., :ffn]) * h[..., ffn:]
                return torch.bmm(a, w2).view(num_local * n, hidden)
            out = run()
        # Correctness on the first expert against float64.
        x0 = x[:n].double()
        h0 = x0 @ w1[0].double()
        ref = (F.silu(h0[:, :ffn]) * h0[:, ffn:]) @ w2[0].double()
        err = float((out[:n].double() - ref).norm() / ref.norm())
        inner = 1 if num_local * n >= 16384 else 5
        sec = timer(run, inner=inner)
        rows.append({"tokens_per_expert": n, "seconds_layer": sec, "backend": backend,
                     "seconds_per_expert": sec / num_local, "rel_err": err})
        del x
    return rows


def fit_alpha_beta(rows: list[dict], min_tokens: int) -> tuple[float, float]:
    """Least squares of T(n) = alpha + beta n with relative weights, over n >= min_tokens."""
    pts = [(r["tokens_per_expert"], r["seconds_per_expert"]) for r in rows
           if r["tokens_per_expert"] >= min_tokens]
    # Weighted by 1/T so small and large n count alike (relative error).
    sw = sxx = sx = sy = sxy = 0.0
    for n, t in pts:
        w = 1.0 / (t * t)
        sw += w
        sx += w * n
        sy += w * t
        sxx += w * n * n
        sxy += w * n * t
    det = sw * sxx - sx * sx
    beta = (sw * sxy - sx * sy) / det
    alpha = (sy - beta * sx) / sw
    return max(alpha, 0.0), beta


def measure_attention(timer: Timer, device, dtype, cfg: dict, decode_batch: list[int],
                      kv_len: int, prefill_chunk: list[int]) -> dict:
    hidden, hq, hkv, hd = cfg["hidden"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    group = hq // hkv
    w_qkv = rand(((hq + 2 * hkv) * hd, hidden), dtype, device, hidden**-0.5)
    w_o = rand((hidden, hq * hd), dtype, device, (hq * hd) ** -0.5)
    decode = []
    for b in decode_batch:
        x = rand((b, hidden), dtype, device)  # [b, D]
        k_cache = rand((b, hkv, kv_len, hd), dtype, device)  # [b, Hkv, kv, d]
        v_cache = rand((b, hkv, kv_len, hd), dtype, device)

        def run(x=x, k_cache=k_cache, v_cache=v_cache, b=b):
            qkv = x @ w_qkv.T  # [b, (Hq + 2 Hkv) d]
            q = qkv[:, : hq * hd].view(b, hkv, group, hd)  # query heads of one KV head as rows
            o = F.scaled_dot_product_attention(q, k_cache, v_cache)  # [b, Hkv, group, d]
            return o.reshape(b, hq * hd) @ w_o.T  # [b, D]
        run()
        decode.append({"batch": b, "kv_len": kv_len, "seconds": timer(run, inner=3)})
        del x, k_cache, v_cache
    prefill = []
    for c in prefill_chunk:
        x = rand((c, hidden), dtype, device)  # [c, D]

        def run(x=x, c=c):
            qkv = x @ w_qkv.T  # [c, (Hq + 2 Hkv) d]
            q = qkv[:, : hq * hd].view(c, hq, hd).transpose(0, 1)[None]  # [1, Hq, c, d]
            k = qkv[:, hq * hd: (hq + hkv) * hd].view(c, hkv, hd).transpose(0, 1)
            v = qkv[:, (hq + hkv) * hd:].view(c, hkv, hd).transpose(0, 1)
            k = k.repeat_interleave(group, dim=0)[None]  # [1, Hq, c, d]
            v = v.repeat_interleave(group, dim=0)[None]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [1, Hq, c, d]
            return o[0].transpose(0, 1).reshape(c, hq * hd) @ w_o.T  # [c, D]
        run()
        prefill.append({"chunk": c, "seconds": timer(run, inner=1 if c >= 8192 else 3)})
        del x
    return {"decode": decode, "prefill": prefill}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="folder for calibration.json")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--num-local", type=int, default=16, help="local experts per rank")
    parser.add_argument("--kv-len", type=int, default=2048, help="decode KV length")
    args = parser.parse_args(argv)
    run = Manifest.start("experiments.calibration.calibrate_h200", argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = torch.bfloat16
    if args.tiny:
        models = {"gpt-oss-120b": {**MODELS["gpt-oss-120b"], "hidden": 64, "expert_ffn": 64,
                                   "num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
                  "qwen3-235b-a22b": {**MODELS["qwen3-235b-a22b"], "hidden": 64,
                                      "expert_ffn": 32, "num_heads": 4, "num_kv_heads": 1,
                                      "head_dim": 16}}
        tokens, batches, chunks = [1, 4, 16, 64, 128], [8, 16], [64, 128]
        copy_bytes, mm_size, num_local, kv_len = 1 << 20, 256, 4, 64
        timer = Timer(device, warmup=1, repeats=3)
    else:
        models, tokens, batches, chunks = MODELS, TOKENS_PER_EXPERT, DECODE_BATCH, PREFILL_CHUNK
        copy_bytes, mm_size, num_local, kv_len = 4 << 30, 8192, args.num_local, args.kv_len
        timer = Timer(device, warmup=3, repeats=15)
    t_start = time.perf_counter()
    result: dict = {
        "command": " ".join(["python3", "-m", "experiments.calibration.calibrate_h200",
                             *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "dtype": "bfloat16", "tiny": args.tiny,
        "num_local_experts": num_local,
    }
    result["copy"] = measure_copy(timer, device, copy_bytes)
    print(f"copy: {result['copy']['bandwidth'] / 1e12:.3f} TB/s", flush=True)
    result["matmul"] = measure_matmul(timer, device, dtype, mm_size)
    peak = result["matmul"]["flops"]
    print(f"matmul {mm_size}^3: {peak / 1e12:.1f} TFLOP/s "
          f"(rel err {result['matmul']['rel_err']:.1e})", flush=True)
    use_grouped = _grouped_mm_ok(device, dtype)
    result["grouped_backend"] = "torch._grouped_mm" if use_grouped else "torch.bmm"
    result["models"] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        (out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
        run.write(out, [out / "calibration.json"])

    write()
    for name, cfg in models.items():
        try:
            calibrate_model(result, name, cfg, timer, device, dtype, peak, num_local, tokens,
                            use_grouped, batches, kv_len, chunks, args.tiny)
        except Exception as err:  # noqa: BLE001 - keep the other model's numbers
            print(f"ERROR calibrating {name}: {err!r}", file=sys.stderr, flush=True)
            result["models"][name] = {"error": repr(err)}
        write()
    print(f"wrote {out / 'calibration.json'} in {result['elapsed_s']:.1f} s")
    return 0


def calibrate_model(result, name, cfg, timer, device, dtype, peak, num_local, tokens,
                    use_grouped, batches, kv_len, chunks, tiny) -> None:
    hidden, ffn = cfg["hidden"], cfg["expert_ffn"]
    rows = measure_experts(timer, device, dtype, hidden, ffn, num_local, tokens, use_grouped)
    flops_per_token = 2 * 3 * hidden * ffn
    for r in rows:
        r["eta"] = r["tokens_per_expert"] * flops_per_token / (r["seconds_per_expert"] * peak)
    alpha, beta = fit_alpha_beta(rows, min_tokens=64 if not tiny else 4)
    attn = measure_attention(timer, device, dtype, cfg, batches, kv_len, chunks)
    result["models"][name] = {
        "shape": cfg, "flops_per_token": flops_per_token,
        "expert_bytes": 3 * hidden * ffn * 2, "experts": rows,
        "fit": {"alpha": alpha, "beta": beta, "min_tokens": 64,
                "eta_inf": flops_per_token / (beta * peak)},
        "attention": attn,
    }
    worst = max(r["rel_err"] for r in rows)
    print(f"{name}: alpha {alpha * 1e6:.1f} us, beta {beta * 1e9:.2f} ns/token, "
          f"eta_inf {flops_per_token / (beta * peak):.3f}, max rel err {worst:.1e}", flush=True)
    for r in rows:
        print(f"  n={r['tokens_per_expert']:5d}  {r['seconds_per_expert'] * 1e6:9.2f} us/expert"
              f"  eta {r['eta']:.3f}", flush=True)
    for r in attn["decode"]:
        print(f"  decode b={r['batch']:5d} kv={r['kv_len']}: {r['seconds'] * 1e6:8.1f} us",
              flush=True)
    for r in attn["prefill"]:
        print(f"  prefill c={r['chunk']:6d}: {r['seconds'] * 1e6:9.1f} us", flush=True)
    if any(not math.isfinite(r["rel_err"]) or r["rel_err"] > 3e-2 for r in rows):
        print(f"WARNING: {name} expert GEMM error above bf16 tolerance", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
