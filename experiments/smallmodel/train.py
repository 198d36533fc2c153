"""Train the small byte-level Qwen3-MoE test-bench model on the mixed-domain corpus.

The model is transformers' own Qwen3MoeForCausalLM built from a plain Qwen3MoeConfig
(probe.runtime.smallmodel.SMALL_ARCH), so the result is an ordinary Hugging Face checkpoint
(config.json + safetensors) that probe.runtime's loader reads. Training is deliberately simple:
AdamW, linear warm-up then cosine decay, bf16 autocast, random windows of seq_len+1 tokens drawn
from the packed train split, loss = cross-entropy + router_aux_loss_coef * load-balancing loss
(transformers' own aux loss, with output_router_logits=True).

The run length is given in minutes (--minutes): a few timed steps fix the step count, so the
schedule is a plain function of the step. Writes to --out:
    config.json, model*.safetensors   the checkpoint (bf16, sharded at --max-shard)
    loss.csv                          step, tokens, elapsed_s, lr, train_ce, aux, val_ce
    train_summary.json                arguments, sizes, throughput, final losses per domain
    manifest.json                     the command, code revision, machine and files

Run (GPU): python -m experiments.smallmodel.train --minutes 4.5
Run (CPU smoke test): ... --arch tiny --steps 5 --batch 2 --seq 64 --device cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.manifest import Manifest
from probe.runtime.smallmodel import (
    SMALL_ARCH,
    TINY_ARCH,
    load_corpus,
    pack_documents,
    qwen3_moe_config_kwargs,
)


# Same width, experts and top-k as SMALL_ARCH but 2.5x the layers, to test whether the lookahead
# predictor's accuracy ceiling (results/predictor/report.md) is a matter of depth
# (results/deepmodel/report.md).
DEEP_ARCH: dict = {**SMALL_ARCH, "num_hidden_layers": 20}


def build_model(arch: dict, experts_impl: str | None, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs = qwen3_moe_config_kwargs(arch)
    torch.manual_seed(seed)
    try:
        config = (Qwen3MoeConfig(**kwargs, experts_implementation=experts_impl)
                  if experts_impl else Qwen3MoeConfig(**kwargs))
    except TypeError:  # an older transformers without the experts_implementation switch
        config = Qwen3MoeConfig(**kwargs)
    return Qwen3MoeForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to peak over `warmup` steps, then cosine decay to floor * peak at total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


class WindowSampler:
    """Random windows of seq_len+1 tokens from a packed token stream, on the target device."""

    def __init__(self, tokens: np.ndarray, seq_len: int, device: torch.device, seed: int):
        if tokens.shape[0] <= seq_len + 1:
            raise ValueError(f"token stream ({tokens.shape[0]}) shorter than seq_len+1")
        self.tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)  # [N]
        self.seq_len = seq_len
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1, device=device)  # [T+1]

    def batch(self, batch_size: int) -> torch.Tensor:
        hi = self.tokens.shape[0] - self.seq_len - 1
        starts = torch.randint(0, hi, (batch_size,), generator=self.gen).to(self.tokens.device)
        return self.tokens[starts[:, None] + self.offsets[None, :]]  # [B, T+1]


def step_loss(model, window: torch.Tensor, aux_coef: float, autocast: bool):
    """Cross-entropy (mean over tokens) and aux loss for a [B, T+1] window batch."""
    inp, tgt = window[:, :-1], window[:, 1:]
    with torch.autocast(device_type=window.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=inp, output_router_logits=True, use_cache=False)
    logits = out.logits.float()  # [B, T, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros((), device=ce.device)
    return ce, aux, ce + aux_coef * aux


@torch.no_grad()
def eval_ce(model, windows: torch.Tensor, autocast: bool, micro: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], micro):
        ce, _, _ = step_loss(model, windows[i:i + micro], 0.0, autocast)
        total += float(ce) * windows[i:i + micro].shape[0]
        n += windows[i:i + micro].shape[0]
    model.train()
    return total / n


def fixed_windows(tokens: np.ndarray, seq_len: int, count: int, seed: int) -> np.ndarray:
    """`count` evenly spread (seeded jitter) windows of seq_len+1 tokens, int64 [count, T+1]."""
    hi = tokens.shape[0] - seq_len - 1
    if hi <= 0:
        raise ValueError("held-out stream shorter than one window")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, hi, size=count))
    return np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/smallmodel/corpus.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("models/smallmodel"))
    ap.add_argument("--arch", choices=("small", "deep", "tiny"), default="small",
                    help="small: 8 layers; deep: 20 layers, otherwise as small; tiny: CPU tests")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training time budget; sets --steps from a timed warm-up")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=None,
                    help="router aux loss coefficient (default: the arch's)")
    ap.add_argument("--experts-impl", default="auto",
                    help="transformers experts implementation: eager, grouped_mm or auto "
                         "(time both for a few steps and keep the faster)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard", default="15MB")
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.smallmodel.train", argv)
    if (args.minutes is None) == (args.steps is None):
        ap.error("give exactly one of --minutes and --steps")

    device = torch.device(args.device)
    autocast = device.type == "cuda"
    arch = dict({"small": SMALL_ARCH, "deep": DEEP_ARCH, "tiny": TINY_ARCH}[args.arch])
    if args.aux_coef is not None:
        arch["router_aux_loss_coef"] = args.aux_coef
    aux_coef = arch["router_aux_loss_coef"]
    torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.time()
    train_tokens, _, _ = pack_documents(load_corpus(args.corpus, split="train"))
    held_docs = load_corpus(args.corpus, split="heldout")
    held_tokens, _, _ = pack_documents(held_docs)
    domains = sorted({d["domain"] for d in held_docs})
    val = torch.from_numpy(fixed_windows(held_tokens, args.seq, args.eval_windows,
                                         args.seed)).to(device)
    per_domain_val = {}
    for dom in domains:
        toks, _, _ = pack_documents([d for d in held_docs if d["domain"] == dom])
        if toks.shape[0] > args.seq + 1:
            count = max(1, min(16, toks.shape[0] // (args.seq + 1)))
            per_domain_val[dom] = torch.from_numpy(
                fixed_windows(toks, args.seq, count, args.seed)).to(device)
    sampler = WindowSampler(train_tokens, args.seq, device, args.seed)
    print(f"corpus: train {train_tokens.shape[0] / 1e6:.2f} M tokens, held-out "
          f"{held_tokens.shape[0] / 1e6:.2f} M ({time.time() - t0:.1f} s)", flush=True)

    def make(impl):
        m = build_model(arch, None if impl == "default" else impl, args.seed).to(device)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                weight_decay=args.weight_decay, fused=device.type == "cuda")
        return m, opt

    def timed_steps(m, opt, n):
        times = []
        for _ in range(n):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts = time.time()
            _, _, loss = step_loss(m, sampler.batch(args.batch), aux_coef, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - ts)
        return float(np.median(times[1:])) if len(times) > 1 else times[0]

    impl = args.experts_impl
    bench = {}
    if impl == "auto":
        for cand in ("grouped_mm", "eager"):
            try:
                m, opt = make(cand)
                bench[cand] = timed_steps(m, opt, 4)
            except Exception as exc:  # noqa: BLE001 (any failure just rules the candidate out)
                print(f"experts_implementation={cand} failed: {type(exc).__name__}: {exc}",
                      flush=True)
            finally:
                m = opt = None
        if not bench:
            raise SystemExit("no experts implementation worked")
        impl = min(bench, key=bench.get)
        print(f"step time by experts implementation: {bench}; using {impl}", flush=True)
        sampler = WindowSampler(train_tokens, args.seq, device, args.seed)  # reset the stream

    model, opt = make(impl)
    n_params = sum(p.numel() for p in model.parameters())
    if args.minutes is not None:
        step_time = bench.get(impl) or timed_steps(*make(impl), 4)
        total_steps = max(10, int(args.minutes * 60 / step_time))
        print(f"step time {step_time * 1e3:.1f} ms -> {total_steps} steps for {args.minutes} min",
              flush=True)
    else:
        total_steps = args.steps
    print(f"model: {n_params / 1e6:.2f} M parameters; {total_steps} steps of "
          f"{args.batch}x{args.seq} tokens", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    # Safety net: a step time misjudged by the warm-up must not run the device call past its limit.
    hard_limit = None if args.minutes is None else 1.3 * args.minutes * 60
    t_start = time.time()
    ce_acc = torch.zeros((), device=device)
    aux_acc = torch.zeros((), device=device)
    n_acc = 0
    for step in range(total_steps):
        lr = lr_at(step, total_steps, args.lr, min(args.warmup, max(1, total_steps // 10)))
        for group in opt.param_groups:
            group["lr"] = lr
        ce, aux, loss = step_loss(model, sampler.batch(args.batch), aux_coef, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce_acc += ce.detach()
        aux_acc += aux.detach()
        n_acc += 1
        over_time = hard_limit is not None and time.time() - t_start > hard_limit
        if over_time:
            print(f"stopping at step {step + 1}: past the hard time limit", flush=True)
        last = step == total_steps - 1 or over_time
        if (step + 1) % args.log_every == 0 or last:
            do_eval = (step + 1) % args.eval_every == 0 or last
            val_ce = eval_ce(model, val, autocast, args.batch) if do_eval else float("nan")
            row = {"step": step + 1, "tokens": (step + 1) * args.batch * args.seq,
                   "elapsed_s": round(time.time() - t_start, 2), "lr": lr,
                   "train_ce": float(ce_acc) / n_acc, "aux": float(aux_acc) / n_acc,
                   "val_ce": val_ce}
            rows.append(row)
            ce_acc.zero_()
            aux_acc.zero_()
            n_acc = 0
            print(f"step {row['step']:5d} {row['elapsed_s']:7.1f}s lr {lr:.2e} "
                  f"ce {row['train_ce']:.4f} aux {row['aux']:.4f} val {val_ce:.4f}", flush=True)
        if over_time:
            break
    train_s = time.time() - t_start

    with (args.out / "loss.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    domain_ce = {dom: eval_ce(model, w, autocast, args.batch) for dom, w in per_domain_val.items()}
    print("held-out CE (nats/byte) per domain: "
          + ", ".join(f"{k} {v:.3f}" for k, v in domain_ce.items()), flush=True)

    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size=args.max_shard)
    import transformers

    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "arch": arch, "experts_impl": impl, "impl_bench_s": bench, "params": n_params,
        "steps": rows[-1]["step"], "planned_steps": total_steps,
        "tokens": rows[-1]["tokens"],
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(rows[-1]["tokens"] / train_s, 1),
        "final_train_ce": rows[-1]["train_ce"], "final_val_ce": rows[-1]["val_ce"],
        "val_ce_by_domain": domain_ce,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    run.write(args.out, [args.out])
    print(f"saved checkpoint to {args.out} ({train_s:.0f} s of training)", flush=True)
    return summary


if __name__ == "__main__":
    main()
