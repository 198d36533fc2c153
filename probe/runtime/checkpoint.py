"""Load a Hugging Face MoE checkpoint (config.json + safetensors, single file or sharded) into
`probe.runtime.model.MoETransformer`, without network access.

>>> model = load_model("path/to/ckpt", dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
>>> part = load_model("path/to/ckpt", expert_ids=[0, 1, 2, 3])  # doctest: +SKIP

The model is built on the meta device and filled with `load_state_dict(..., assign=True)`, so no
memory is spent on a random initialisation. With `expert_ids`, each MoE layer holds only those
experts (stacked in that order) and only their tensors are read from disk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from probe.runtime.config import MoEConfig
from probe.runtime.families import Recipe, checkpoint_plan, fp32_params, ignorable
from probe.runtime.model import MoETransformer

__all__ = ["CheckpointReader", "load_config", "load_model", "read_hf_config",
           "verify_checkpoint"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHOW = 5  # names listed in an error message


def _few(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json dict of checkpoint directory `path`."""
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint has no config.json: {file}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def load_config(path: str | Path) -> MoEConfig:
    """MoEConfig of checkpoint directory `path`."""
    return MoEConfig.from_hf(read_hf_config(path))


class CheckpointReader:
    """Tensor names, shapes and data of a safetensors checkpoint (one file or an index + shards).

    Files are opened lazily and memory-mapped; `read` touches only the requested tensor (rows).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in self.file_of.values() if not f.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: "
                                        f"{_few(missing)}")
        elif single.is_file():
            self.file_of = {}
            with safe_open(single, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    self.file_of[name] = single
        else:
            raise FileNotFoundError(
                f"no weights in {self.path}: expected model.safetensors or "
                "model.safetensors.index.json")
        self._open: dict[Path, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def _handle(self, name: str) -> Any:
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape stored in the file header for tensor `name`."""
        if name not in self._shapes:
            try:
                self._shapes[name] = tuple(self._handle(name).get_slice(name).get_shape())
            except Exception as err:  # a shard listed in the index but lacking the tensor
                raise ValueError(f"{self.file_of[name]}: cannot read tensor {name} ({err})"
                                 ) from None
        return self._shapes[name]

    def read(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its dim-0 `rows` (in the given order)."""
        handle = self._handle(name)
        if rows is None:
            return handle.get_tensor(name)
        part = handle.get_slice(name)
        # Read maximal runs of consecutive rows, one slice each.
        pieces, start = [], 0
        rows = list(rows)
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            pieces.append(part[rows[start]:rows[end - 1] + 1])
            start = end
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _check_expert_ids(expert_ids: Sequence[int] | None, num_experts: int) -> tuple[int, ...] | None:
    if expert_ids is None:
        return None
    if isinstance(expert_ids, (str, bytes)) or not isinstance(expert_ids, Sequence) and not (
            isinstance(expert_ids, torch.Tensor)):
        raise TypeError("expert_ids must be a sequence of ints or None")
    ids = tuple(int(e) for e in expert_ids)
    if not ids:
        raise ValueError("expert_ids must not be empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"expert_ids has duplicates: {list(ids)}")
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"expert_ids out of range [0, {num_experts}): {bad[:_SHOW]}")
    return ids


def _verify(plan: list[Recipe], full_plan: list[Recipe], reader: CheckpointReader,
            cfg: MoEConfig) -> None:
    """Raise a ValueError naming a few tensors when the checkpoint does not fit the plan."""
    present = reader.names
    needed = {s.name for r in plan for s in r.sources}
    missing = needed - present
    if missing:
        raise ValueError(
            f"checkpoint {reader.path} is missing {len(missing)} tensor(s) that a "
            f"{cfg.model_type} model with this config needs: {_few(missing)}")
    known = {s.name for r in full_plan for s in r.sources}
    unexpected = {n for n in present - known if not ignorable(cfg, n)}
    if unexpected:
        raise ValueError(
            f"checkpoint {reader.path} has {len(unexpected)} tensor(s) that a {cfg.model_type} "
            f"model with this config does not use: {_few(unexpected)}")
    wrong = []
    for recipe in plan:
        for s in recipe.sources:
            found = reader.shape(s.name)
            if found != s.shape:
                wrong.append(f"{s.name} has shape {list(found)}, config implies {list(s.shape)}")
    if wrong:
        more = f" (and {len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        raise ValueError(f"config.json does not match the tensors of {reader.path}: "
                         + "; ".join(wrong[:_SHOW]) + more)


def _prepare(path: str | Path, expert_ids: Sequence[int] | None
             ) -> tuple[MoEConfig, tuple[int, ...] | None, CheckpointReader, list[Recipe]]:
    cfg = load_config(path)
    ids = _check_expert_ids(expert_ids, cfg.num_experts)
    reader = CheckpointReader(path)
    names = reader.names
    plan = checkpoint_plan(cfg, names, ids)
    full_plan = plan if ids is None else checkpoint_plan(cfg, names, None)
    _verify(plan, full_plan, reader, cfg)
    return cfg, ids, reader, plan


def verify_checkpoint(path: str | Path, *, expert_ids: Sequence[int] | None = None
                      ) -> MoEConfig:
    """Check that checkpoint `path` loads (config, tensor names, shapes) without reading any
    tensor data; return its MoEConfig. Raises the errors `load_model` would raise."""
    return _prepare(path, expert_ids)[0]


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu",
               expert_ids: Sequence[int] | None = None) -> MoETransformer:
    """Build the model of checkpoint directory `path` and load its weights.

    Args:
        path: directory with config.json and model.safetensors (or an index and shards).
        dtype: parameter dtype: torch.float32, torch.bfloat16 or torch.float16.
        device: where the parameters go.
        expert_ids: global ids of the experts each MoE layer holds, in slot order (distinct,
            in [0, E)); None holds all E experts.
    Returns:
        MoETransformer in eval mode with requires_grad disabled.
    """
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    cfg, ids, reader, plan = _prepare(path, expert_ids)
    with torch.device("meta"):
        model = MoETransformer(cfg, ids)
    state = {}
    for recipe in plan:
        parts = [reader.read(s.name, s.rows) for s in recipe.sources]
        target_dtype = torch.float32 if fp32_params(cfg, recipe.target) else dtype
        state[recipe.target] = recipe.build(parts).to(device=device, dtype=target_dtype)
    expected = set(model.state_dict())
    if set(state) != expected:  # a family plan out of step with the model: our bug
        raise RuntimeError(f"internal: plan/model mismatch: missing {_few(expected - set(state))}"
                           f", extra {_few(set(state) - expected)}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model
