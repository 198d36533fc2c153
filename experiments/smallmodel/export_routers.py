"""Export the small model's router weights (a few hundred KB) so they can be committed.

The checkpoint itself (54 MB) is git-ignored; the routers are all that the frozen next-layer
router baseline of the predictor needs. Writes a safetensors file with `router.{l}` float32
[E, D] for MoE layer l (l = 0..L-1 in MoE-layer order) and the checkpoint's config in the header.

Writes --out (default data/recorded/smallmodel/routers.safetensors) and its manifest (--out
with .manifest.json in place of .safetensors).

Run: python -m experiments.smallmodel.export_routers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from experiments.manifest import Manifest
from probe.runtime.checkpoint import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("models/smallmodel"))
    ap.add_argument("--out", type=Path,
                    default=Path("data/recorded/smallmodel/routers.safetensors"))
    args = ap.parse_args(argv)
    run = Manifest.start("experiments.smallmodel.export_routers", argv)
    model = load_model(args.ckpt, expert_ids=[0])  # the routers are all we need
    arrays = {f"router.{i}": np.ascontiguousarray(b.router_weight.float().numpy())
              for i, b in enumerate(model.moe_blocks)}
    config = json.loads((args.ckpt / "config.json").read_text())
    save_file(arrays, str(args.out), metadata={"config": json.dumps(config, sort_keys=True)})
    run.write(args.out.parent, [args.out], name=args.out.with_suffix(".manifest.json").name)
    print(f"wrote {len(arrays)} routers {arrays['router.0'].shape} to {args.out}")


if __name__ == "__main__":
    main()
