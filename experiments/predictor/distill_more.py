"""Distil the lookahead predictors on far more tokens: teacher-forced passes over the corpus.

Three subcommands (CPU is enough: a batched pass of the small model runs at 5-9 k tokens/s on
2 cores, a training step of all 7 predictors at 10-20 k tokens/s):

  check    replay the decode recording's requests from its RNG (the same draws as
           experiments/smallmodel/record.py), confirm the replay against decode_requests.json,
           confirm that a teacher-forced prefill pass over a replayed request reproduces the
           recorded decode samples, and check by text that no evaluated request occurs in the
           predictor training text (the corpus' train split).
  collect  stream random windows of the corpus' train split through the model, batched, and
           write the (router input, router logits) pairs of every MoE layer (the Recorder's
           layout, fp16) to memmaps on disk.
  train    distil fresh predictors on the first --tokens pairs (chunked minibatches, cosine
           lr), then score them on the decode recording's samples with the study's split: the
           held-out steps (the report's test set) and the training steps (never trained on
           here, so a validation set for choosing settings). Appends one JSON line per run.

  python -m experiments.predictor.distill_more check
  python -m experiments.predictor.distill_more collect --tokens 2000000 --out /tmp/pairs
  python -m experiments.predictor.distill_more train --pairs /tmp/pairs \
      --tokens 1000000 --hidden 1024 --epochs 2 --out-weights W.safetensors --log runs.jsonl

collect and finalize write manifest.json into --out; train writes its manifest beside --log
(runs.jsonl -> runs.manifest.json), or beside --out-weights without --log; check only prints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from experiments.manifest import Manifest
from probe.predictor.evaluate import fidelity
from probe.predictor.model import PredictorSet
from probe.predictor.samples import load_samples, split_steps
from probe.predictor.stream import (
    PairFile,
    PairWriter,
    router_pairs,
    train_streaming,
)
from probe.runtime.smallmodel import encode, load_corpus

# Token shares of the decode recording: steps 0-79 code (4 code domains drawn uniformly), steps
# 80-159 prose_en and cjk (drawn uniformly).
DECODE_MIX = {"code_py": 1, "code_c": 1, "code_js": 1, "code_sh": 1, "prose_en": 2, "cjk": 2}


def _record_module():
    from experiments.smallmodel import record

    return record


# ---- check ------------------------------------------------------------------------------------
def replay_decode(heldout: Path, *, seed: int, ranks: int, per_rank: int, steps: int,
                  shift_step: int) -> tuple[dict, list[dict], list[list[tuple[int, int]]]]:
    """The decode recording's requests, from the same RNG draws as record.py (teacher input).

    Returns (requests rid -> {"domain", "tokens", "prompt_len"}, per-step log like
    decode_requests.json, rows: per step the (rid, position) of each token row in order).
    """
    rec = _record_module()
    rng = np.random.default_rng(seed)
    pool = rec.DocPool(heldout, rng)
    live, log, rows_by_step, reqs = [], [], [], {}
    next_rid = 0
    for step in range(steps):
        shift = step == shift_step
        domains = pool.domains(rec.CODE_DOMAINS if step < shift_step
                               else rec.AFTER_SHIFT_DOMAINS)
        left = 0
        if shift:
            left, live = len(live), []
        count = np.bincount([r["rank"] for r in live], minlength=ranks)
        joiners, staggered = [], step == 0 or shift
        while count.min() < per_rank:
            rank = int(np.argmin(count))
            dom = domains[int(rng.integers(len(domains)))]
            prompt = int(rng.integers(64, 385))
            out_len = int(rng.integers(32, 257))
            if staggered:
                out_len = int(rng.integers(1, out_len + 1))
            toks = pool.window(dom, prompt + out_len + 1)
            prompt = min(prompt, max(1, toks.shape[0] - 2))
            out_len = min(out_len, toks.shape[0] - prompt)
            req = {"rid": next_rid, "rank": rank, "domain": dom, "tokens": toks,
                   "prompt_len": prompt, "remaining": max(1, out_len), "pos": prompt}
            reqs[next_rid] = req
            next_rid += 1
            joiners.append(req)
            count[rank] += 1
        live.extend(joiners)
        live.sort(key=lambda r: (r["rank"], r["rid"]))
        rows_by_step.append([(r["rid"], r["pos"]) for r in live])
        still = []
        for r in live:
            r["pos"] += 1
            r["remaining"] -= 1
            if r["remaining"] > 0:
                still.append(r)
            else:
                left += 1
        doms = {d: sum(r["domain"] == d for r in live) for d in sorted({r["domain"]
                                                                          for r in live})}
        log.append({"step": step, "live": len(live), "joined": len(joiners), "left": left,
                    "domains": doms})
        live = still
    return reqs, log, rows_by_step


def cmd_check(args) -> None:
    info = json.loads((args.rec / "record_info.json").read_text())["args"]
    reqs, log, rows = replay_decode(Path(info["corpus"]), seed=int(info["seed"]),
                                    ranks=int(info["ranks"]), per_rank=int(info["per_rank"]),
                                    steps=int(info["decode_steps"]),
                                    shift_step=int(info["shift_step"]))
    recorded = json.loads((args.rec / "decode_requests.json").read_text())
    same_log = recorded == log
    print(f"replayed {len(reqs)} requests over {len(log)} steps; per-step log identical to "
          f"decode_requests.json: {same_log}")
    samples = load_samples(args.rec / "decode.samples.safetensors")
    _, test = split_steps(samples.step, held_out=0.25, block=8, seed=0)
    test_steps = set(np.unique(samples.step[test]).tolist())
    evaluated = sorted({rid for s in test_steps for rid, _ in rows[s]})
    all_used = sorted({rid for s in range(len(rows)) for rid, _ in rows[s]})
    print(f"{len(evaluated)} requests have tokens in the {len(test_steps)} held-out steps; "
          f"{len(all_used)} in all steps")

    # Does a prefill pass over the request's bytes give the recorded decode pairs?
    from probe.runtime.checkpoint import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, dtype=torch.float32)
    step_of = {}
    for s, row in enumerate(rows):
        for i, (rid, pos) in enumerate(row):
            step_of.setdefault(rid, []).append((s, i, pos))
    key = {(int(s), int(t)): n for n, (s, t) in enumerate(zip(samples.step, samples.token,
                                                                strict=True))}
    rng = np.random.default_rng(0)
    dh, dz, agree, n_tok = [], [], 0, 0
    for rid in rng.choice(all_used, size=min(args.check_requests, len(all_used)),
                          replace=False):
        req = reqs[int(rid)]
        last = max(pos for _, _, pos in step_of[int(rid)])
        hid, lgt = router_pairs(model, [req["tokens"][:last + 1]])
        for s, i, pos in step_of[int(rid)]:
            n = key[(s, i)]
            dh.append(np.abs(hid[pos].astype(np.float32) - samples.hidden[n]).max())
            dz.append(np.abs(lgt[pos].astype(np.float32) - samples.logits[n]).max())
            top_a = np.sort(np.argsort(-lgt[pos].astype(np.float32), axis=-1)[:, :4], axis=-1)
            top_b = np.sort(np.argsort(-samples.logits[n].astype(np.float32), axis=-1)[:, :4],
                            axis=-1)
            agree += int((top_a == top_b).all(axis=-1).sum())
            n_tok += top_a.shape[0]
    print(f"teacher-forced prefill vs recorded decode, {len(dh)} tokens of "
          f"{args.check_requests} requests: max |dh| {max(dh):.4f} (median {np.median(dh):.5f}),"
          f" max |dlogit| {max(dz):.4f} (median {np.median(dz):.5f}), same top-4 set in "
          f"{agree}/{n_tok} (token, layer) pairs")

    # Text overlap: the training text is the corpus' train split.
    train_docs = load_corpus(args.corpus, split="train")
    blob = b"\x00".join(r["text"].encode("utf-8") for r in train_docs)
    whole = piece_hits = pieces = 0
    for rid in all_used:
        req = reqs[rid]
        raw = bytes(int(t) for t in req["tokens"] if t < 256)
        whole += raw in blob
        for a in range(0, len(raw) - args.piece + 1, args.piece):
            pieces += 1
            piece_hits += raw[a:a + args.piece] in blob
    print(f"text overlap with the corpus train split ({len(blob) / 1e6:.1f} MB): whole request "
          f"windows found {whole}/{len(all_used)}; {args.piece}-byte pieces found "
          f"{piece_hits}/{pieces} ({piece_hits / max(1, pieces):.2%})")
    if args.pairs is not None:
        used = np.load(args.pairs / "windows.npy")
        texts = [bytes(int(t) for t in encode(train_docs[int(d)]["text"])[a:a + n] if t < 256)
                 for d, a, n in used]
        used_blob = b"\x00".join(texts)
        whole = sum(bytes(int(t) for t in reqs[rid]["tokens"] if t < 256) in used_blob
                    for rid in all_used)
        hits = total = 0
        for rid in all_used:
            raw = bytes(int(t) for t in reqs[rid]["tokens"] if t < 256)
            for a in range(0, len(raw) - 32 + 1, 32):
                total += 1
                hits += raw[a:a + 32] in used_blob
        print(f"windows actually trained on ({args.pairs}, {len(used)} windows, "
              f"{len(used_blob) / 1e6:.1f} MB): whole requests found {whole}/{len(all_used)}, "
              f"32-byte request pieces found {hits}/{total}")
    held_ids = {r["id"] for r in load_corpus(args.corpus, split="heldout")}
    print(f"held-out document ids also in the train split: "
          f"{len(held_ids & {r['id'] for r in train_docs})}")


# ---- collect ----------------------------------------------------------------------------------
def _request_bytes(rec_dir: Path) -> list[bytes]:
    """Text (bytes) of every request of the decode recording in rec_dir (replayed)."""
    info = json.loads((rec_dir / "record_info.json").read_text())["args"]
    reqs, _, _ = replay_decode(Path(info["corpus"]), seed=int(info["seed"]),
                               ranks=int(info["ranks"]), per_rank=int(info["per_rank"]),
                               steps=int(info["decode_steps"]),
                               shift_step=int(info["shift_step"]))
    return [bytes(int(t) for t in r["tokens"] if t < 256) for r in reqs.values()]


def _request_grams(rec_dir: Path, k: int) -> set[bytes]:
    return {raw[i:i + k] for raw in _request_bytes(rec_dir)
            for i in range(len(raw) - k + 1)}


def _shares_gram(tokens: np.ndarray, banned: set[bytes], k: int) -> bool:
    raw = bytes(int(t) for t in tokens if t < 256)
    return any(raw[i:i + k] in banned for i in range(len(raw) - k + 1))


def _corpus_stream(args) -> tuple[dict, list[str], np.ndarray, dict, set[bytes]]:
    """(docs by domain, domains, weights, doc_index by domain, banned substrings)."""
    mix = DECODE_MIX if args.mix == "decode" else None
    docs: dict[str, list[np.ndarray]] = {}
    doc_index: dict[str, list[int]] = {}  # position of each doc in the train split's list
    for i, rec in enumerate(load_corpus(args.corpus, split="train")):
        if mix is None or rec["domain"] in mix:
            docs.setdefault(rec["domain"], []).append(encode(rec["text"]))
            doc_index.setdefault(rec["domain"], []).append(i)
    banned = _request_grams(args.exclude_rec, args.exclude_k) if args.exclude_rec else set()
    domains = sorted(docs)
    if mix is None:  # natural mix: domains weighted by their bytes
        weights = np.array([sum(d.shape[0] for d in docs[k]) for k in domains], np.float64)
    else:
        weights = np.array([mix[k] for k in domains], np.float64)
    return docs, domains, weights / weights.sum(), doc_index, banned


def _window_batches(args, docs, domains, weights, doc_index, banned):
    """Batches of training windows, drawn from one seeded generator (collect and finalize
    draw identically): yields (windows, [(doc, start, length)], domains, rejected, perm)."""
    rng = np.random.default_rng(args.seed)
    while True:
        windows, used, doms, rejected = [], [], [], 0
        while len(windows) < args.batch_windows:
            dom = domains[int(rng.choice(len(domains), p=weights))]
            pool = docs[dom]
            j = int(rng.integers(len(pool)))
            doc, start = pool[j], 0
            if doc.shape[0] > args.window:
                start = int(rng.integers(doc.shape[0] - args.window + 1))
                doc = doc[start:start + args.window]
            if doc.shape[0] <= args.min_pos:
                continue
            if banned and _shares_gram(doc, banned, args.exclude_k):
                rejected += 1
                continue
            windows.append(doc)
            used.append((doc_index[dom][j], start, doc.shape[0]))
            doms.append(dom)
        rows = sum(w.shape[0] - args.min_pos for w in windows)
        perm = rng.permutation(rows)  # mixes the windows' tokens within the batch
        yield windows, used, doms, rejected, perm


def _collect_meta(args) -> dict:
    return {"ckpt": str(args.ckpt), "corpus": str(args.corpus), "split": "train",
            "mix": args.mix, "window": args.window, "min_pos": args.min_pos, "seed": args.seed,
            "batch_windows": args.batch_windows, "exclude_rec": str(args.exclude_rec),
            "exclude_k": args.exclude_k,
            "layout": "hidden [N, L, D] router inputs, logits [N, L, E], fp16, as "
                      "probe.runtime.record.Recorder"}


def _finish(args, count, used, per_domain, rejected, seconds=None) -> dict:
    np.save(args.out / "windows.npy", np.array(used, np.int64))  # [n, 3] doc, start, length
    meta = {**_collect_meta(args), "tokens_per_domain": per_domain, "windows": len(used),
            "windows_rejected_for_overlap": rejected, "count": count}
    if seconds is not None:
        meta["seconds"] = round(seconds, 1)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def cmd_collect(args) -> None:
    from probe.runtime.checkpoint import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, dtype=torch.float32)
    cfg = model.cfg
    docs, domains, weights, doc_index, banned = _corpus_stream(args)
    print(f"{len(banned)} distinct {args.exclude_k}-byte substrings of the decode requests "
          "banned from training windows")
    print("domain shares: " + ", ".join(f"{k} {w:.3f}" for k, w in zip(domains, weights,
                                                                        strict=True)))
    writer = PairWriter(args.out, args.tokens, cfg.num_moe_layers, cfg.hidden_size,
                        cfg.num_experts, meta=_collect_meta(args))
    t0 = time.time()
    per_domain = dict.fromkeys(domains, 0)
    used, rejected = [], 0
    batches = _window_batches(args, docs, domains, weights, doc_index, banned)
    while not writer.full:
        if args.max_seconds is not None and time.time() - t0 > args.max_seconds:
            print("stopping: past --max-seconds", flush=True)
            break
        windows, u, doms, rej, perm = next(batches)
        hid, lgt = router_pairs(model, windows, min_pos=args.min_pos)
        writer.add(hid[perm], lgt[perm])
        used += u
        rejected += rej
        for w, d in zip(windows, doms, strict=True):
            per_domain[d] += w.shape[0] - args.min_pos
        rate = writer.count / (time.time() - t0)
        print(f"{writer.count:9d} / {args.tokens} pairs, {rate:.0f} tokens/s", flush=True)
    writer.hidden.flush()
    writer.logits.flush()
    _finish(args, writer.count, used, per_domain, rejected, time.time() - t0)
    print(f"{len(used)} windows used, {rejected} rejected for sharing a {args.exclude_k}-byte "
          f"substring with a decode request; wrote {args.out} in {time.time() - t0:.0f} s")


def cmd_finalize(args) -> None:
    """Write windows.npy and meta.json for a collect that was stopped after --count rows
    (a batch boundary from its log), by drawing the same windows again without the model."""
    docs, domains, weights, doc_index, banned = _corpus_stream(args)
    per_domain = dict.fromkeys(domains, 0)
    used, rejected, count = [], 0, 0
    batches = _window_batches(args, docs, domains, weights, doc_index, banned)
    while count < args.count:
        windows, u, doms, rej, perm = next(batches)
        used += u
        rejected += rej
        for w, d in zip(windows, doms, strict=True):
            per_domain[d] += w.shape[0] - args.min_pos
        count += perm.size
    args.out.mkdir(parents=True, exist_ok=True)
    # A count inside the last batch (a capacity cut) keeps that batch's windows: a superset.
    _finish(args, args.count, used, per_domain, rejected)
    print(f"finalized {args.out}: {args.count} rows, {len(used)} windows, {rejected} rejected")


# ---- train ------------------------------------------------------------------------------------
def _score(pset, data, mask, prior=False) -> dict:
    sub = data.subset(mask)
    rows = fidelity(pset, sub.hidden, sub.logits, step=sub.step, src_rank=sub.src_rank,
                    num_ranks=8, prior=prior)
    keys = ("topk_acc", "half_hit", "recall_2k", "full_recall_2k", "expert_load_err")
    return {"mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
            "layers": {str(r["layer"]): {k: r[k] for k in keys} for r in rows}}


def cmd_train(args) -> None:
    from probe.runtime.checkpoint import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.init is not None:  # continue from saved predictors (e.g. only to fine-tune)
        pset = PredictorSet.load(args.init)
    else:
        routers = load_model(args.ckpt, expert_ids=[0])
        pset = PredictorSet.from_model(routers, hidden=args.hidden)
    if (args.pairs / "meta.json").is_file():
        pairs = PairFile(args.pairs)
        hidden, logits, meta, avail = pairs.hidden, pairs.logits, pairs.meta, len(pairs)
    else:  # a collect still running: its first --available rows are written
        if args.available is None:
            raise SystemExit(f"{args.pairs} has no meta.json: pass --available ROWS")
        hidden = np.load(args.pairs / "hidden.npy", mmap_mode="r")[:args.available]
        logits = np.load(args.pairs / "logits.npy", mmap_mode="r")[:args.available]
        meta, avail = {"partial": True}, args.available
    data = load_samples(args.samples)
    train_mask, test_mask = split_steps(data.step, held_out=0.25, block=8, seed=0)
    n = avail if args.tokens is None else args.tokens
    if args.sample == "random":  # n rows drawn over all available windows, read into RAM
        rows = np.sort(np.random.default_rng(args.seed).choice(avail, size=n, replace=False))
        hidden, logits = np.asarray(hidden[rows]), np.asarray(logits[rows])

    def progress(seen, loss):
        print(f"  {seen:9d} tokens seen, loss {loss:.4f}", flush=True)

    res = {"seconds": 0.0, "tokens_seen": 0, "loss": []}
    if args.epochs > 0:
        res = train_streaming(pset, hidden, logits, num_tokens=n, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr,
                              margin_weight=args.margin_weight, margin=args.margin,
                              weight_decay=args.weight_decay, seed=args.seed, chunk=args.chunk,
                              callback=progress, callback_every=max(1, n // args.batch_size // 4))
    if args.finetune_epochs:
        from probe.predictor.distill import train_offline

        tr = data.subset(train_mask)
        train_offline(pset, torch.from_numpy(tr.hidden), torch.from_numpy(tr.logits),
                      epochs=args.finetune_epochs, batch_size=256, lr=args.finetune_lr,
                      seed=args.seed)
    out = {"run": args.name, "init": str(args.init), "tokens": n, "epochs": args.epochs,
           "hidden": pset.hidden, "lr": args.lr, "batch_size": args.batch_size,
           "margin_weight": args.margin_weight,
           "margin": args.margin, "weight_decay": args.weight_decay,
           "finetune_epochs": args.finetune_epochs, "pairs": str(args.pairs),
           "sample": args.sample, "pairs_meta": {k: v for k, v in meta.items()
                                                 if k != "layout"},
           "train_seconds": round(res["seconds"], 1), "tokens_seen": res["tokens_seen"],
           "loss": res["loss"],
           "heldout": _score(pset, data, test_mask),
           "decode_train_steps": _score(pset, data, train_mask)}
    print(f"{args.name}: held-out top-k {out['heldout']['mean']['topk_acc']:.4f} half "
          f"{out['heldout']['mean']['half_hit']:.4f} 2k {out['heldout']['mean']['recall_2k']:.4f}"
          f" | decode train steps top-k {out['decode_train_steps']['mean']['topk_acc']:.4f} | "
          f"{res['seconds']:.0f} s")
    if args.log is not None:
        with args.log.open("a") as fh:
            fh.write(json.dumps(out) + "\n")
    if args.out_weights is not None:
        pset.save(args.out_weights)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("models/smallmodel"))
    ap.add_argument("--corpus", type=Path, default=Path("data/smallmodel/corpus.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--rec", type=Path, default=Path("/tmp/predrec"))
    c.add_argument("--check-requests", type=int, default=6)
    c.add_argument("--piece", type=int, default=64)
    c.add_argument("--pairs", type=Path, default=None,
                   help="a collect folder: check its windows.npy against the requests too")
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tokens", type=int, default=1_000_000)
    c.add_argument("--window", type=int, default=640)
    c.add_argument("--min-pos", type=int, default=64)
    c.add_argument("--batch-windows", type=int, default=32)
    c.add_argument("--mix", choices=("decode", "all"), default="decode")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--exclude-rec", type=Path, default=Path("/tmp/predrec"),
                   help="decode recording whose requests' text must not be trained on")
    c.add_argument("--exclude-k", type=int, default=32,
                   help="reject a window sharing any substring of this many bytes with them")
    c.add_argument("--max-seconds", type=float, default=None,
                   help="stop early (at a batch boundary) and close the files")
    f = sub.add_parser("finalize", help="windows.npy + meta.json of a stopped collect")
    for a in c._actions[1:]:
        if a.dest not in ("tokens", "max_seconds"):
            f._add_action(a)
    f.add_argument("--count", type=int, required=True, help="rows written (from the log)")
    c = sub.add_parser("train")
    c.add_argument("--pairs", type=Path, required=True)
    c.add_argument("--samples", type=Path, default=Path("/tmp/predrec/decode.samples.safetensors"))
    c.add_argument("--tokens", type=int, default=None)
    c.add_argument("--available", type=int, default=None,
                   help="rows already written, for a collect folder still being filled")
    c.add_argument("--sample", choices=("prefix", "random"), default="prefix",
                   help="train on the first --tokens rows, or on --tokens rows drawn at random")
    c.add_argument("--epochs", type=float, default=1.0)
    c.add_argument("--hidden", type=int, default=1024)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--batch-size", type=int, default=1024)
    c.add_argument("--chunk", type=int, default=65536)
    c.add_argument("--margin-weight", type=float, default=0.0)
    c.add_argument("--margin", type=float, default=1.0)
    c.add_argument("--weight-decay", type=float, default=0.0)
    c.add_argument("--init", type=Path, default=None,
                   help="start from these saved predictors (with --epochs 0: fine-tune only)")
    c.add_argument("--finetune-epochs", type=int, default=0,
                   help="then this many epochs on the decode recording's training steps")
    c.add_argument("--finetune-lr", type=float, default=1e-3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--name", default="run")
    c.add_argument("--log", type=Path, default=None)
    c.add_argument("--out-weights", type=Path, default=None)
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.predictor.distill_more", argv)
    {"check": cmd_check, "collect": cmd_collect, "finalize": cmd_finalize,
     "train": cmd_train}[args.cmd](args)
    if args.cmd in ("collect", "finalize"):
        run.write(args.out, [args.out])
    elif args.cmd == "train" and (args.log or args.out_weights):
        first = args.log or args.out_weights
        run.write(first.parent, [p for p in (args.log, args.out_weights) if p is not None],
                  name=first.with_suffix(".manifest.json").name)


if __name__ == "__main__":
    main()
