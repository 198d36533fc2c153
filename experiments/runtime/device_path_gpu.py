"""The runtime's device planning path on one GPU (ep=1): it runs, replays its CUDA graphs, takes
no host sync inside a MoE layer, and the logits equal the model's without the runner.

    python3 -m experiments.runtime.device_path_gpu --out results/device_path_gpu

A tiny random Qwen3-MoE model (3 MoE layers, 8 experts, top-2, fp64) on CUDA, wrapped by an
`EPRunner` with one rank (DistContext without a process group: every gather is the rank's own
row), `plan_on="device"`, fixed-capacity dispatch, policy "probe", for each planner method
("greedy", "lite"), predictor ("history": the step's plans in one launch at its start;
"router": the router prior, layer by layer) and dispatch-time split ("waterfill": the true
counts split by the assignment kernel; "plan": the plan's own split, made with the plan on the
side stream): 4 steps of skewed batches. With one rank there is
nothing to move (every expert is home), so this checks the path itself on a GPU: the device
planners' and the split's CUDA graphs captured at the warm-up and replayed, the side stream,
the pinned copies and the event the issuer thread polls, and torch's sync debug mode ("error")
inside every MoE layer (a host sync raises). The multi-GPU path (NCCL on the plan group,
replicas moving) needs several GPUs: experiments/runtime/device_multigpu.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STEPS = 4


def batch(step: int):
    import torch

    g = torch.Generator().manual_seed(100 + step)
    lens = [6, 3, 7]
    ids = torch.randint(0, 64, (sum(lens),), generator=g)
    ids[: lens[0]] = 3 + step  # a repeated token: skew on a few experts
    return ids, lens


def run_case(method: str, predictor: str, split: str, device_name: str) -> dict:
    import torch

    from probe.predictor import router_prior
    from probe.runtime.config import MoEConfig, RopeConfig
    from probe.runtime.dispatch import DispatchOptions
    from probe.runtime.dist import DistContext
    from probe.runtime.engine import random_model
    from probe.runtime.pipeline import EPRunner, PipelineOptions
    from probe.runtime.syncguard import no_host_sync

    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    config = MoEConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=8, num_experts=8, top_k=2,
                       moe_intermediate_size=16, rope=RopeConfig(theta=10000.0),
                       moe_layers=(0, 1, 2), norm_topk_prob=True, qk_norm="head")
    model = random_model(config, seed=7, std=0.15, dtype=torch.float64).to(device)
    batches = [batch(s) for s in range(STEPS)]
    with torch.inference_mode():
        want = [model(ids.to(device), seq_lens=lens).logits for ids, lens in batches]
    pred = router_prior(model) if predictor == "router" else "history"
    ctx = DistContext(0, 1, None, None, device)
    t0 = time.perf_counter()
    runner = EPRunner(model, ctx, PipelineOptions(
        num_slots=2, plan_on="device", method=method, predictor=pred, default_window_s=1.0,
        dispatch=DispatchOptions("fixed", 2.0), device_split=split))
    setup_s = time.perf_counter() - t0
    diffs, errors = [], []
    for ids, lens in batches:
        runner.begin_step(num_tokens=len(ids))
        run_layer = runner.run_layer

        def guarded(layer, h, run_layer=run_layer):
            try:
                with no_host_sync(count_only=not on_cuda, cuda=on_cuda) as guard:
                    out = run_layer(layer, h)
                errors.extend(f"layer {layer}: {name}" for name in guard.calls)
                return out
            except Exception as exc:  # a host sync raises in torch's "error" mode
                errors.append(f"layer {layer}: {type(exc).__name__}: {exc}"[:300])
                return run_layer(layer, h)

        runner.run_layer = guarded
        with torch.inference_mode():
            got = model(ids.to(device), seq_lens=lens).logits
        runner.run_layer = run_layer
        runner.end_step()
        diffs.append(got)
    max_diff = max(float((g - w).abs().max()) for g, w in zip(diffs, want, strict=True))
    planner = runner.balancer.device_planner
    row = {"method": method, "predictor": predictor, "split": split, "steps": STEPS,
           "planner": type(planner).__name__, "planner_graph": bool(planner.graph),
           "split_graph": bool(runner.splitter.graph) if runner.splitter else None,
           "setup_s": round(setup_s, 2),
           "max_abs_logit_diff": max_diff, "sync_errors": errors,
           "ok": max_diff <= 1e-10 and not errors}
    runner.close()
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from experiments.manifest import Manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/device_path_gpu", help="output folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the same path on CPU tensors (the CPU twins; no graphs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_path_gpu needs a GPU (or --device cpu)")
    run = Manifest.start("experiments.runtime.device_path_gpu", argv)
    rows = []
    for method in ("greedy", "lite"):
        for predictor in ("history", "router"):
            for split in ("waterfill", "plan"):
                try:
                    row = run_case(method, predictor, split, args.device)
                except Exception as exc:  # recorded, and the run goes on
                    row = {"method": method, "predictor": predictor, "split": split,
                           "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"gpu": gpu, "utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                         time.gmtime()),
              "command": " ".join(["python3 -m experiments.runtime.device_path_gpu",
                                   *sys.argv[1:]]),
              "rows": rows, "ok": all(r["ok"] for r in rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "device_path_gpu.json"
    path.write_text(json.dumps(report, indent=1))
    run.write(out, [path], name="device_path_gpu.manifest.json")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from experiments.planner.gpu_harness import exit_after

    exit_after(main)
