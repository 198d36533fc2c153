"""How much of layer L's routing is knowable before layer L's attention runs? (diagnostic)

For MoE layer L of the small model (decoder layer = attention, then MoE):

    x_L      residual stream entering layer L (after layer L-1's attention and MoE)
    h_L      = mlp_norm_L(x_L + attn_L(attn_norm_L(x_L)))   layer L's router input
    h_{L-1}  layer L-1's router input (the lookahead predictor's input)

Three predictors of layer L's top-k are compared on the same corpus tokens (teacher-forced
windows of the corpus' train split, as distill_more.py collect; a separate validation draw):

- `prev`: the lookahead predictor (frozen router clone + SiLU residual) on h_{L-1};
- `skip_attn_prior`: layer L's router applied to mlp_norm_L(x_L), untrained: layer L
  with its attention left out;
- `skip_attn`: the same predictor architecture distilled on mlp_norm_L(x_L): it sees layer
  L-1's MoE output exactly and misses only layer L's attention (which mixes in other tokens).

`skip_attn` is not a proof of an upper bound for `prev` (a learner could do worse or, in
principle, otherwise), but it measures how much routing information layer L's attention adds
on top of everything the token's own residual stream carries.

  python -m experiments.predictor.info_bound --train-tokens 200000 --out J.json
Writes --out and its manifest (--out with .manifest.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from experiments.manifest import Manifest
from probe.predictor.metrics import topk_accuracy
from probe.predictor.model import PredictorSet
from probe.predictor.stream import train_streaming


def collect(model, windows, min_pos):
    """(h [n, L, D] router inputs, s [n, L, D] mlp_norm_L(x_L), z [n, L, E] logits), fp16."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, inp, i=i: seen.__setitem__(i, mod.mlp_norm(inp[0])))
        for i, layer in enumerate(model.layers)]
    lens = [w.shape[0] for w in windows]
    ids = torch.from_numpy(np.concatenate(windows))
    with torch.no_grad():
        out = model(ids, seq_lens=lens, return_routing=True)
    for hk in hooks:
        hk.remove()
    keep = torch.from_numpy(np.flatnonzero(np.concatenate([np.arange(t) >= min_pos
                                                           for t in lens])))
    h = torch.stack([r.hidden[keep] for r in out.routing], 1)
    s = torch.stack([seen[r.layer][keep] for r in out.routing], 1)
    z = torch.stack([r.logits[keep] for r in out.routing], 1)
    return [t.half().numpy() for t in (h, s, z)]


def draw(args, rng, docs, domains, weights, tokens, model):
    parts, count = [], 0
    while count < tokens:
        windows = []
        for _ in range(args.batch_windows):
            dom = domains[int(rng.choice(len(domains), p=weights))]
            doc = docs[dom][int(rng.integers(len(docs[dom])))]
            if doc.shape[0] > args.window:
                a = int(rng.integers(doc.shape[0] - args.window + 1))
                doc = doc[a:a + args.window]
            if doc.shape[0] > args.min_pos:
                windows.append(doc)
        parts.append(collect(model, windows, args.min_pos))
        count += parts[-1][0].shape[0]
        print(f"  {count} / {tokens} tokens", flush=True)
    return [np.concatenate([p[i] for p in parts])[:tokens] for i in range(3)]


def main(argv=None) -> None:
    from probe.runtime.checkpoint import load_model
    from probe.runtime.smallmodel import encode, load_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("models/smallmodel"))
    ap.add_argument("--corpus", type=Path, default=Path("data/smallmodel/corpus.jsonl"))
    ap.add_argument("--train-tokens", type=int, default=200_000)
    ap.add_argument("--val-tokens", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=640)
    ap.add_argument("--min-pos", type=int, default=64)
    ap.add_argument("--batch-windows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    manifest = Manifest.start("experiments.predictor.info_bound", argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    mix = {"code_py": 1, "code_c": 1, "code_js": 1, "code_sh": 1, "prose_en": 2, "cjk": 2}
    docs: dict[str, list[np.ndarray]] = {}
    for rec in load_corpus(args.corpus, split="train"):
        if rec["domain"] in mix:
            docs.setdefault(rec["domain"], []).append(encode(rec["text"]))
    domains = sorted(docs)
    weights = np.array([mix[d] for d in domains], np.float64)
    weights /= weights.sum()
    model = load_model(args.ckpt, dtype=torch.float32)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    train = draw(args, rng, docs, domains, weights, args.train_tokens, model)
    val = draw(args, rng, docs, domains, weights, args.val_tokens, model)
    print(f"collected in {time.time() - t0:.0f} s", flush=True)
    k = model.cfg.top_k
    layers = range(1, model.cfg.num_moe_layers)

    def top(z, la):
        return torch.topk(torch.from_numpy(z[:, la]).float(), k).indices.numpy()
    routers = [b.router_weight.detach() for b in model.moe_blocks]
    res: dict = {"config": {k2: str(v) for k2, v in vars(args).items()}, "layers": {}}

    def score(pset, feats, shift, z, prior=False):
        out = {}
        for la in layers:
            x = torch.from_numpy(feats[:, la - shift]).float()
            with torch.no_grad():
                logit = pset[la].prior_logits(x) if prior else pset[la](x)
            out[la] = topk_accuracy(torch.topk(logit, k).indices.numpy(), top(z, la))
        return out

    # feats[:, l - shift]: prev uses h[:, l-1] (shift 1), skip_attn uses s[:, l] (shift 0).
    for name, feat_i, shift in (("prev", 0, 1), ("skip_attn", 1, 0)):
        pset = PredictorSet.from_routers(routers, top_k=k, hidden=args.hidden)
        prior = score(pset, val[feat_i], shift, val[2], prior=True)
        tr_feat = train[feat_i]
        if shift == 0:  # train_streaming pairs feature[:, l-1] with logits[:, l]: shift by one
            tr_feat = np.concatenate([tr_feat[:, 1:], tr_feat[:, :1]], axis=1)
        run = train_streaming(pset, tr_feat, train[2], epochs=args.epochs, batch_size=1024,
                              lr=args.lr, seed=args.seed)
        dist = score(pset, val[feat_i], shift, val[2])
        n = args.val_tokens
        train_acc = score(pset, train[feat_i][:n], shift, train[2][:n])
        print(f"{name}: prior {np.mean(list(prior.values())):.4f} distilled "
              f"{np.mean(list(dist.values())):.4f} ({run['seconds']:.0f} s)", flush=True)
        for la in layers:
            res["layers"].setdefault(str(la), {}).update({
                f"{name}_prior": prior[la], f"{name}_distilled": dist[la]})
        res[f"{name}_train_topk_first_tokens"] = float(np.mean(list(train_acc.values())))
    res["mean"] = {key: float(np.mean([v[key] for v in res["layers"].values()]))
                   for key in next(iter(res["layers"].values()))}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    manifest.write(args.out.parent, [args.out], name=args.out.with_suffix(".manifest.json").name)
    print(json.dumps(res["mean"], indent=1))


if __name__ == "__main__":
    main()
