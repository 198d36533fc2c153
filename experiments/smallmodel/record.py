"""Record routing traces from the small MoE model: chunked prefill and continuous-batching decode.

Uses probe.runtime's own model (load_model) and Recorder, on the held-out part of the corpus.

Prefill (prefill.trace.safetensors): --prefill-steps chunks; in each, every one of the G source
ranks holds --prefill-tokens-per-rank tokens, cut into sequences of 128..512 tokens from held-out
documents (a stateless pass from position 0). The chunks cycle through four domain mixes (tag):
"mixed" (any domain), "code", "prose_en" and "cjk".

Decode (decode.trace.safetensors): --decode-steps steps of continuous batching. Each of the G
ranks holds up to --per-rank live requests. A request is a held-out document cut at a random
offset: a prompt of 64..384 bytes, prefilled (not recorded) into its own KV cache when it joins,
then one token per decode step until its output length (32..256) is reached, when it leaves and
a new request joins on the rank with the fewest live requests. Before --shift-step every new
request is code (code_py, code_c, code_js, code_sh); at --shift-step every live request ends at
once and the batch refills with prose_en and cjk requests (the abrupt shift). The first batch and
the refill after the shift get random remaining lengths, so departures are spread from the start.

Decode input: with --decode-input teacher (default) the token fed at each step is the document's
real next byte (teacher forcing through the KV cache: the routing of real text in each domain,
as if the model had sampled exactly that byte); with --decode-input sample it is sampled from the
model's own next-byte distribution (--temperature). Trace gates are not stored (smaller files);
a fraction of the tokens (--*-sample-rate) is kept with every MoE layer's router input and logits
(fp16) in *.samples.safetensors for predictor training. decode_requests.json lists, per step, the
number of live requests per domain and the joins and leaves; record_info.json the arguments and
sizes; manifest.json the command, code revision, machine and files. The committed recording is
in data/recorded/smallmodel/ (the default --out; made on one H200, docs/smallmodel.md).

Run: python -m experiments.smallmodel.record   (CPU, about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.manifest import Manifest
from probe.runtime.checkpoint import load_model
from probe.runtime.record import Recorder, record_step, token_ranks
from probe.runtime.smallmodel import encode, load_corpus

CODE_DOMAINS = ("code_py", "code_c", "code_js", "code_sh")
AFTER_SHIFT_DOMAINS = ("prose_en", "cjk")
PREFILL_MIXES = ("mixed", "code", "prose_en", "cjk")


@dataclass
class Request:
    rid: int
    rank: int
    domain: str
    tokens: np.ndarray  # int64 [P + O]: prompt then the reference continuation
    prompt_len: int
    remaining: int  # decode steps left
    pos: int = 0  # index of the next token to feed
    cache: object = None
    next_token: int = -1


class DocPool:
    """Held-out documents by domain, as byte-token arrays; draws random windows."""

    def __init__(self, corpus: Path, rng: np.random.Generator) -> None:
        docs = load_corpus(corpus, split="heldout")
        if not docs:
            raise ValueError(f"{corpus}: no held-out documents")
        self.by_domain: dict[str, list[np.ndarray]] = {}
        for rec in docs:
            self.by_domain.setdefault(rec["domain"], []).append(encode(rec["text"]))
        self.rng = rng

    def domains(self, wanted) -> list[str]:
        missing = [d for d in wanted if d not in self.by_domain]
        if missing:
            raise ValueError(f"no held-out documents for domains {missing}")
        return list(wanted)

    def window(self, domain: str, length: int) -> np.ndarray:
        """A random window of up to `length` tokens (a whole document if it is shorter)."""
        docs = self.by_domain[domain]
        doc = docs[int(self.rng.integers(len(docs)))]
        if doc.shape[0] <= length:
            return doc
        start = int(self.rng.integers(doc.shape[0] - length + 1))
        return doc[start:start + length]


def record_prefill(model, pool: DocPool, args, rng: np.random.Generator) -> Recorder:
    cfg = model.cfg
    rec = Recorder(cfg, num_ranks=args.ranks, sample_rate=args.prefill_sample_rate,
                   keep_gates=False, seed=args.seed,
                   meta={"workload": "smallmodel-prefill", "tokens_per_rank":
                         args.prefill_tokens_per_rank, "mixes": list(PREFILL_MIXES)})
    all_domains = sorted(pool.by_domain)
    mix_domains = {"mixed": all_domains, "code": list(CODE_DOMAINS),
                   "prose_en": ["prose_en"], "cjk": ["cjk"]}
    for step in range(args.prefill_steps):
        mix = PREFILL_MIXES[step % len(PREFILL_MIXES)]
        domains = pool.domains(mix_domains[mix])
        seqs, ranks = [], []
        for rank in range(args.ranks):
            left = args.prefill_tokens_per_rank
            while left > 0:
                want = min(left, int(rng.integers(128, 513)))
                dom = domains[int(rng.integers(len(domains)))]
                seq = pool.window(dom, want)
                seqs.append(seq)
                ranks.append(rank)
                left -= seq.shape[0]
        lens = [int(s.shape[0]) for s in seqs]
        ids = torch.from_numpy(np.concatenate(seqs)).to(args.device)
        t0 = time.time()
        record_step(model, rec, ids, seq_lens=lens, src_rank=token_ranks(lens, ranks),
                    phase="prefill", tag=mix)
        print(f"prefill step {step:3d} {mix:9s} {sum(lens):6d} tokens in {len(lens)} sequences "
              f"({time.time() - t0:.1f} s)", flush=True)
    return rec


def record_decode(model, pool: DocPool, args, rng: np.random.Generator
                  ) -> tuple[Recorder, list[dict]]:
    cfg = model.cfg
    rec = Recorder(cfg, num_ranks=args.ranks, sample_rate=args.decode_sample_rate,
                   keep_gates=False, seed=args.seed + 1,
                   meta={"workload": "smallmodel-decode", "per_rank": args.per_rank,
                         "shift_step": args.shift_step, "decode_input": args.decode_input,
                         "before": list(CODE_DOMAINS), "after": list(AFTER_SHIFT_DOMAINS)})
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    live: list[Request] = []
    next_rid = 0
    log: list[dict] = []

    def new_request(rank: int, domains, staggered: bool) -> Request:
        nonlocal next_rid
        dom = domains[int(rng.integers(len(domains)))]
        prompt = int(rng.integers(64, 385))
        out_len = int(rng.integers(32, 257))
        if staggered:  # a request already part-way through its output
            out_len = int(rng.integers(1, out_len + 1))
        toks = pool.window(dom, prompt + out_len + 1)
        prompt = min(prompt, max(1, toks.shape[0] - 2))
        out_len = min(out_len, toks.shape[0] - prompt)
        req = Request(next_rid, rank, dom, toks, prompt, max(1, out_len))
        next_rid += 1
        return req

    def prefill(joiners: list[Request]) -> None:
        if not joiners:
            return
        for r in joiners:
            r.cache = model.new_cache()
        lens = [r.prompt_len for r in joiners]
        ids = torch.from_numpy(np.concatenate([r.tokens[:r.prompt_len] for r in joiners]))
        out = model(ids.to(args.device), seq_lens=lens, caches=[r.cache for r in joiners],
                    last_only=True)
        nxt = pick(out.logits, joiners, [r.prompt_len for r in joiners])
        for r, t in zip(joiners, nxt, strict=True):
            r.pos = r.prompt_len
            r.next_token = t

    def pick(logits: torch.Tensor, reqs: list[Request], positions: list[int]) -> list[int]:
        """Next input token per request: the document's byte, or a sample of the model."""
        if args.decode_input == "teacher":
            return [int(r.tokens[p]) if p < r.tokens.shape[0] else int(r.tokens[-1])
                    for r, p in zip(reqs, positions, strict=True)]
        probs = torch.softmax(logits.float()[:, :256] / args.temperature, dim=-1)  # [B, 256]
        return torch.multinomial(probs, 1, generator=gen).view(-1).tolist()

    t_start = time.time()
    for step in range(args.decode_steps):
        if args.max_seconds is not None and time.time() - t_start > args.max_seconds:
            print(f"stopping decode at step {step}: past --max-seconds", flush=True)
            break
        shift = step == args.shift_step
        domains = pool.domains(CODE_DOMAINS if step < args.shift_step else AFTER_SHIFT_DOMAINS)
        left = 0
        if shift:
            left = len(live)
            live = []
        per_rank = np.bincount([r.rank for r in live], minlength=args.ranks)
        joiners = []
        staggered = step == 0 or shift
        while per_rank.min() < args.per_rank:
            rank = int(np.argmin(per_rank))  # fewest live requests, lowest index on ties
            joiners.append(new_request(rank, domains, staggered))
            per_rank[rank] += 1
        prefill(joiners)
        live.extend(joiners)
        live.sort(key=lambda r: (r.rank, r.rid))  # tokens grouped by source rank

        ids = torch.tensor([r.next_token for r in live], dtype=torch.int64, device=args.device)
        out = record_step(model, rec, ids, seq_lens=[1] * len(live),
                          caches=[r.cache for r in live],
                          src_rank=np.array([r.rank for r in live], dtype=np.int16),
                          phase="decode", tag="code" if step < args.shift_step else "prose_cjk")
        nxt = pick(out.logits, live, [r.pos + 1 for r in live])
        still = []
        for r, t in zip(live, nxt, strict=True):
            r.pos += 1
            r.remaining -= 1
            r.next_token = t
            if r.remaining > 0:
                still.append(r)
            else:
                r.cache = None
                left += 1
        counts = {d: sum(r.domain == d for r in live) for d in sorted({r.domain for r in live})}
        log.append({"step": step, "live": len(live), "joined": len(joiners), "left": left,
                    "domains": counts})
        live = still
        if step % 25 == 0 or shift:
            print(f"decode step {step:4d}: {log[-1]['live']} live, {len(joiners)} joined, "
                  f"{left} left, {counts}", flush=True)
    return rec, log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("models/smallmodel"))
    ap.add_argument("--corpus", type=Path, default=Path("data/smallmodel/heldout.jsonl"),
                    help="corpus.jsonl or heldout.jsonl (only held-out records are used)")
    ap.add_argument("--out", type=Path, default=Path("data/recorded/smallmodel"))
    ap.add_argument("--ranks", type=int, default=8, help="source ranks G (ep)")
    ap.add_argument("--prefill-steps", type=int, default=16)
    ap.add_argument("--prefill-tokens-per-rank", type=int, default=1024)
    ap.add_argument("--prefill-sample-rate", type=float, default=0.005)
    ap.add_argument("--decode-steps", type=int, default=400)
    ap.add_argument("--shift-step", type=int, default=200)
    ap.add_argument("--per-rank", type=int, default=32, help="live requests per rank")
    ap.add_argument("--decode-sample-rate", type=float, default=0.015)
    ap.add_argument("--decode-input", choices=("teacher", "sample"), default="teacher")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop the decode loop (keeping what it recorded) after this long")
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.smallmodel.record", argv)
    for name in ("ranks", "decode_steps", "per_rank", "prefill_tokens_per_rank"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.temperature <= 0:
        ap.error("--temperature must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.ckpt, dtype=torch.float32, device=args.device)
    rng = np.random.default_rng(args.seed)
    pool = DocPool(args.corpus, rng)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"ckpt": str(args.ckpt), "torch": torch.__version__, "python": sys.version.split()[0],
            "device": args.device, "args": {k: str(v) for k, v in vars(args).items()}}

    t0 = time.time()
    if not args.skip_prefill:
        rec = record_prefill(model, pool, args, rng)
        rec.trace().save(args.out / "prefill.trace.safetensors")
        rec.save_samples(args.out / "prefill.samples.safetensors")
        info["prefill"] = {"steps": rec.num_steps, "tokens": rec.num_tokens,
                           "samples": rec.num_samples, "seconds": round(time.time() - t0, 1)}
    t1 = time.time()
    rec, log = record_decode(model, pool, args, rng)
    rec.trace().save(args.out / "decode.trace.safetensors")
    rec.save_samples(args.out / "decode.samples.safetensors")
    info["decode"] = {"steps": rec.num_steps, "tokens": rec.num_tokens,
                      "samples": rec.num_samples, "seconds": round(time.time() - t1, 1)}
    (args.out / "decode_requests.json").write_text(json.dumps(log, separators=(",", ":")) + "\n")
    (args.out / "record_info.json").write_text(json.dumps(info, indent=1) + "\n")
    written = ["decode.trace.safetensors", "decode.samples.safetensors", "decode_requests.json",
               "record_info.json"]
    if not args.skip_prefill:
        written += ["prefill.trace.safetensors", "prefill.samples.safetensors"]
    run.write(args.out, [args.out / name for name in written])
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
