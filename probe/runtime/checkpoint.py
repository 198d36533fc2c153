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
from probe.runtime.families import (
    FP8_SCALE_SUFFIX,
    Recipe,
    Source,
    checkpoint_plan,
    config_from_hf,
    fp32_params,
    ignorable,
)
from probe.runtime.model import MoETransformer
from probe.runtime.quant import FP8_BLOCK, MXFP4_BLOCK, PackedWeight, dequantize_fp8_block

__all__ = ["CheckpointError", "CheckpointReader", "load_config", "load_model", "read_hf_config",
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
    return config_from_hf(read_hf_config(path))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong
    (truncated, bad header, missing tensor, wrong shape). `path` is that file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with safetensors file `file`, read from its size and header; None when
    the header looks sound (then the safetensors library's own message is all there is)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, too short for a safetensors header"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return (f"truncated or not a safetensors file: its header length ({header_len} "
                    f"bytes) runs past the end of the file ({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as err:
        return f"bad header: not a safetensors JSON header ({type(err).__name__}: {err})"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return (f"truncated: {size} bytes, but its header describes {expected} bytes "
                f"({expected - size} missing)")
    if size > expected:
        return (f"bad file size: {size - expected} bytes past the last tensor its header "
                f"describes ({expected} bytes)")
    return None


def _open_safetensors(file: Path) -> Any:
    """safe_open(file), with a CheckpointError naming the file and the problem on failure."""
    try:
        return safe_open(file, framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError (not a ValueError)
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {file}") from None
        problem = _safetensors_problem(file) or f"not a readable safetensors file ({err})"
        raise CheckpointError(file, problem) from None


class CheckpointReader:
    """Tensor names, shapes and data of a safetensors checkpoint (one file or an index + shards).

    Every file's header is read (and checked) when the reader is made; the files are
    memory-mapped and `read` touches only the requested tensor (rows). Broken files raise
    `CheckpointError` naming the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        self._open: dict[Path, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.listing = index if index.is_file() else single  # the file that lists the tensors
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (ValueError, AttributeError) as err:
                raise CheckpointError(index, f"bad index: not a JSON object ({err})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(index, "bad index: no weight_map")
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in self.file_of.values() if not f.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: "
                                        f"{_few(missing)}")
            for file in sorted(set(self.file_of.values())):
                held = set(self._handle_of(file).keys())
                absent = [n for n, f in self.file_of.items() if f == file and n not in held]
                if absent:
                    raise CheckpointError(file, f"missing tensor: {index.name} puts "
                                          f"{len(absent)} tensor(s) in this shard that it does "
                                          f"not hold: {_few(absent)}")
        elif single.is_file():
            self.file_of = dict.fromkeys(self._handle_of(single).keys(), single)
        else:
            raise FileNotFoundError(
                f"no weights in {self.path}: expected model.safetensors or "
                "model.safetensors.index.json")

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def _handle_of(self, file: Path) -> Any:
        if file not in self._open:
            self._open[file] = _open_safetensors(file)
        return self._open[file]

    def _handle(self, name: str) -> Any:
        return self._handle_of(self.file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape stored in the file header for tensor `name`."""
        if name not in self._shapes:
            try:
                self._shapes[name] = tuple(self._handle(name).get_slice(name).get_shape())
            except Exception as err:  # noqa: BLE001 - safetensors' own error type
                raise CheckpointError(self.file_of[name],
                                      f"cannot read tensor {name} ({err})") from None
        return self._shapes[name]

    def read(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its dim-0 `rows` (in the given order)."""
        handle = self._handle(name)
        try:
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
        except Exception as err:  # noqa: BLE001 - safetensors' own error type
            raise CheckpointError(self.file_of[name],
                                  f"cannot read tensor {name} ({err})") from None
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _read_dense(reader: CheckpointReader, source: Source) -> torch.Tensor:
    """A recipe source as a dense tensor: block-scaled FP8 weights (DeepSeek-V3's release) are
    dequantized with their `<name>_scale_inv`."""
    part = reader.read(source.name, source.rows)
    if part.dtype != torch.float8_e4m3fn:
        return part
    scale = source.name + FP8_SCALE_SUFFIX
    if scale not in reader.names:
        raise CheckpointError(reader.file_of[source.name],
                              f"fp8 tensor {source.name} has no {scale}")
    try:
        return dequantize_fp8_block(part, reader.read(scale, source.rows))
    except ValueError as err:
        raise CheckpointError(reader.file_of[scale], str(err)) from None


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
    """Raise a CheckpointError naming a few tensors when the checkpoint does not fit the plan."""
    present = reader.names
    needed = {s.name for r in plan for s in r.sources}
    missing = needed - present
    if missing:
        raise CheckpointError(reader.listing, (
            f"missing {len(missing)} tensor(s) that a {cfg.model_type} model with this config "
            f"needs: {_few(missing)}"))
    known = {s.name for r in full_plan for s in r.sources}
    unexpected = {n for n in present - known if not ignorable(cfg, n)}
    if unexpected:
        raise CheckpointError(reader.listing, (
            f"has {len(unexpected)} tensor(s) that a {cfg.model_type} model with this config "
            f"does not use: {_few(unexpected)}"))
    wrong = []
    for recipe in plan:
        for s in recipe.sources:
            found = reader.shape(s.name)
            if found != s.shape:
                wrong.append(f"{s.name} has shape {list(found)}, config implies {list(s.shape)} "
                             f"(in {reader.file_of[s.name].name})")
    if wrong:
        more = f" (and {len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        raise CheckpointError(reader.path / "config.json",
                              "shape mismatch: config.json does not match the tensors: "
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


def _packed_experts(recipe: Recipe, reader: CheckpointReader,
                    device: str | torch.device) -> PackedWeight | None:
    """A MoE layer's stacked expert matrix kept in its stored format, or None when it is
    stored in plain floats. MXFP4 (GPT-OSS: `*_blocks` / `*_scales`, gate and up rows
    interleaved, as in the dense release) and block-scaled FP8 (DeepSeek-V3: one
    `weight` + `weight_scale_inv` per expert and projection; gate and up are stacked, which
    keeps whole 128-row tiles only when the expert width is a multiple of 128)."""
    if not recipe.target.endswith((".w_gate_up", ".w_down")):
        return None
    first = recipe.sources[0]
    if first.name.endswith("_blocks"):
        blocks = reader.read(first.name, first.rows)  # [E, rows, cols / 32, 16]
        scales = reader.read(recipe.sources[1].name, recipe.sources[1].rows)  # [E, rows, cols/32]
        if recipe.target.endswith(".w_gate_up"):  # interleaved gate, up rows -> gate, then up
            order = torch.cat((torch.arange(0, blocks.shape[1], 2),
                               torch.arange(1, blocks.shape[1], 2)))
            blocks, scales = blocks[:, order], scales[:, order]
        shape = (blocks.shape[0], blocks.shape[1], blocks.shape[2] * MXFP4_BLOCK)
        return PackedWeight("mxfp4", shape, (blocks.contiguous().to(device),
                                             scales.contiguous().to(device)))
    parts = [reader.read(s.name, s.rows) for s in recipe.sources]
    if parts[0].dtype != torch.float8_e4m3fn:
        return None
    rows = parts[0].shape[0]
    if recipe.target.endswith(".w_gate_up") and rows % FP8_BLOCK:
        raise CheckpointError(reader.file_of[first.name], (
            f"keep_format: expert width {rows} is not a multiple of {FP8_BLOCK}, so gate and "
            "up cannot be stacked in whole FP8 tiles; load with keep_format=False"))
    scales = [reader.read(s.name + FP8_SCALE_SUFFIX, s.rows) for s in recipe.sources]
    if recipe.target.endswith(".w_gate_up"):  # E gate sources, then E up sources
        half = len(parts) // 2
        weight = torch.cat((torch.stack(parts[:half]), torch.stack(parts[half:])), dim=1)
        scale = torch.cat((torch.stack(scales[:half]), torch.stack(scales[half:])), dim=1)
    else:
        weight, scale = torch.stack(parts), torch.stack(scales)
    return PackedWeight("fp8_block", tuple(weight.shape), (weight.to(device), scale.to(device)))


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu",
               expert_ids: Sequence[int] | None = None,
               keep_format: bool = False) -> MoETransformer:
    """Build the model of checkpoint directory `path` and load its weights.

    Args:
        path: directory with config.json and model.safetensors (or an index and shards).
        dtype: parameter dtype: torch.float32, torch.bfloat16 or torch.float16.
        device: where the parameters go.
        expert_ids: global ids of the experts each MoE layer holds, in slot order (distinct,
            in [0, E)); None holds all E experts.
        keep_format: keep MXFP4 / block-scaled FP8 expert weights in that format
            (`MoEBlock.packed`, probe.runtime.quant.PackedWeight) instead of dequantizing them;
            the dense expert parameters are then left on the meta device, so any path that
            does not support packed experts fails loudly. Plain-float checkpoints load as usual.
    Returns:
        MoETransformer in eval mode with requires_grad disabled.
    """
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    cfg, ids, reader, plan = _prepare(path, expert_ids)
    with torch.device("meta"):
        model = MoETransformer(cfg, ids)
    state, packed = {}, {}
    for recipe in plan:
        kept = _packed_experts(recipe, reader, device) if keep_format else None
        if kept is not None:
            packed[recipe.target] = kept
            state[recipe.target] = torch.empty(kept.shape, dtype=dtype, device="meta")
            continue
        parts = [_read_dense(reader, s) for s in recipe.sources]
        target_dtype = torch.float32 if fp32_params(cfg, recipe.target) else dtype
        state[recipe.target] = recipe.build(parts).to(device=device, dtype=target_dtype)
    expected = set(model.state_dict())
    if set(state) != expected:  # a family plan out of step with the model: our bug
        raise RuntimeError(f"internal: plan/model mismatch: missing {_few(expected - set(state))}"
                           f", extra {_few(set(state) - expected)}")
    model.load_state_dict(state, strict=True, assign=True)
    for target, weight in packed.items():  # "layers.{i}.moe.w_gate_up" -> that block's pair
        block = model.get_submodule(target.rsplit(".", 1)[0])
        gate_up, down = block.packed or (None, None)
        block.packed = (weight, down) if target.endswith(".w_gate_up") else (gate_up, weight)
    model.eval()
    model.requires_grad_(False)
    return model
