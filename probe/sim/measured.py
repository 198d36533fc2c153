"""Read what experiments/runtime/device_multigpu.sh measured: the runtime's runs, one per policy.

The script writes, under its output folder DIR:

    DIR/a2a.json                the link bench (probe.sim.links reads it)
    DIR/rt_policies.tar.gz      rt/<policy>.json, the runtime's summary (`python -m probe.runtime
                                --out`), and rt/<policy>.steps.npz, its step log (--step-log,
                                format in probe/runtime/steplog.py); or the folder DIR/rt/
                                itself before it is packed

A summary names its log in "step_log" (relative to the summary's folder). `read_runs(DIR)`
returns one `MeasuredRun` per summary found, validated: the fields the replay reads are present,
the log's arrays have consistent shapes [N, L, S, E] / [N, L, G, P] with S = G = the summary's
world_size, E and top-k as in its config, times finite and >= 0, and every source rank's pairs
a multiple of top-k. Errors name the file and the problem.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = ["MeasuredRun", "StepLog", "read_runs", "read_step_log"]

STEP_LOG_FORMAT = "probe-step-log"
PHASES = ("attention", "route_plan", "dispatch", "experts", "combine")

_LOG_ARRAYS = {  # name -> (dtype kind, shape in terms of N, L, G, E, P)
    "counts": ("i", "NLGE"), "phase_s": ("f", "NLGP"), "step_s": ("f", "N"),
    "tokens": ("i", "N"), "prefill_tokens": ("i", "N"), "decode_tokens": ("i", "N"),
    "layer_ir": ("f", "NL"), "pairs_per_rank": ("i", "NLG"), "replan_s": ("f", "N"),
    "replicas_planned": ("i", "NL"), "replicas_arrived": ("i", "NL"),
    "fallback_pairs": ("i", "NL"), "layer_exposed_s": ("f", "NL"), "layer_plan_s": ("f", "NL"),
    "layer_predict_s": ("f", "NL"), "layer_split_s": ("f", "NL"),
}
_SUMMARY_KEYS = ("world_size", "policy", "extra_slots", "resident_slots", "per_step_slots",
                 "config", "dtype", "args")
_CONFIG_KEYS = ("num_experts", "top_k", "hidden_size", "moe_intermediate_size")
_ARGS_KEYS = ("replan_interval", "replan_window", "hardware", "method", "predictor")


@dataclass(frozen=True)
class StepLog:
    """The arrays of one step log (probe/runtime/steplog.py), validated; `arrays[name]`."""

    arrays: dict

    def __getattr__(self, name: str):
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N steps, L MoE layers, G ranks, E experts)."""
        return tuple(int(x) for x in self.arrays["counts"].shape)


@dataclass(frozen=True)
class MeasuredRun:
    """One runtime run: its summary JSON (`summary`), step log and where they came from."""

    name: str
    summary: dict
    log: StepLog

    @property
    def policy(self) -> str:
        return str(self.summary["policy"])


def read_step_log(data: bytes | str | Path, *, name: str = "step log", world_size: int,
                  num_experts: int, top_k: int) -> StepLog:
    """Validate a step log (.npz bytes or path) against its run's G, E and top-k."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data,
                     allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"step log not found: {data}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: not a readable .npz file ({err})") from None
    if str(arrays.get("format", "")) != STEP_LOG_FORMAT:
        raise ValueError(f"{name}: field 'format' must be {STEP_LOG_FORMAT!r} (written by "
                         "python -m probe.runtime --step-log)")
    if int(arrays.get("version", 0)) != 1:
        raise ValueError(f"{name}: unsupported version {arrays.get('version')!r} (reads 1)")
    if tuple(str(x) for x in arrays.get("phases", ())) != PHASES:
        raise ValueError(f"{name}: field 'phases' must be {list(PHASES)}")
    for key in _LOG_ARRAYS:
        if key not in arrays:
            raise ValueError(f"{name}: lacks array {key!r}")
    counts = arrays["counts"]
    if counts.ndim != 4:
        raise ValueError(f"{name}: counts must be [N, L, S, E], got shape {counts.shape}")
    num_steps, num_layers, num_src, num_e = counts.shape
    if num_steps < 1 or num_layers < 1:
        raise ValueError(f"{name}: counts holds no step or no layer (shape {counts.shape})")
    if num_src != world_size:
        raise ValueError(f"{name}: counts has {num_src} source ranks, the run {world_size}")
    if num_e != num_experts:
        raise ValueError(f"{name}: counts has {num_e} experts, the run's config {num_experts}")
    sizes = {"N": num_steps, "L": num_layers, "G": world_size, "E": num_experts,
             "P": len(PHASES)}
    for key, (kind, dims) in _LOG_ARRAYS.items():
        a = arrays[key]
        want = tuple(sizes[d] for d in dims)
        if a.shape != want:
            raise ValueError(f"{name}: {key} must have shape {want} ({', '.join(dims)}), got "
                             f"{a.shape}")
        if a.dtype.kind not in (("i", "u") if kind == "i" else ("f",)):
            raise ValueError(f"{name}: {key} must be {'integer' if kind == 'i' else 'float'}, "
                             f"got {a.dtype}")
        if kind == "f" and not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[0].tolist()
            raise ValueError(f"{name}: {key} holds a non-finite value at index {bad}")
        if np.any(a < 0):
            raise ValueError(f"{name}: {key} holds a negative value")
    pairs = counts.sum(axis=3)  # [N, L, S]
    if np.any(pairs % top_k):
        n, layer, s = np.argwhere(pairs % top_k)[0].tolist()
        raise ValueError(f"{name}: source rank {s}'s pairs at step {n}, layer {layer} "
                         f"({pairs[n, layer, s]}) are not a multiple of top_k = {top_k}")
    return StepLog(arrays)


def _check_summary(summary, name: str) -> dict:
    if not isinstance(summary, dict):
        raise ValueError(f"{name}: expected a JSON object")
    for key in _SUMMARY_KEYS:
        if key not in summary:
            raise ValueError(f"{name}: lacks field {key!r} (a summary of python -m "
                             "probe.runtime --out, from a version that writes it)")
    world = summary["world_size"]
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"{name}: world_size must be an int >= 2 (an expert-parallel run), "
                         f"got {world!r}")
    for key in _CONFIG_KEYS:
        value = summary["config"].get(key) if isinstance(summary["config"], dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: config.{key} must be a positive int, got {value!r}")
    for key in _ARGS_KEYS:
        if not isinstance(summary["args"], dict) or key not in summary["args"]:
            raise ValueError(f"{name}: args lacks {key!r}")
    if not summary.get("step_log"):
        raise ValueError(f"{name}: no 'step_log': rerun the runtime with --step-log PATH (the "
                         "replay needs the routing counts and per-layer times it writes)")
    return summary


class _Folder:
    """Files of the runs: a folder, or a .tar.gz read in memory (members by posix path)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.members: dict[str, bytes] | None = None
        if root.is_file():
            try:
                with tarfile.open(root, "r:*") as tar:
                    self.members = {m.name.removeprefix("./"): tar.extractfile(m).read()
                                    for m in tar.getmembers() if m.isfile()}
            except tarfile.TarError as err:
                raise ValueError(f"{root}: not a readable tar archive ({err})") from None

    def summaries(self) -> list[str]:
        if self.members is not None:
            names = [n for n in self.members if n.endswith(".json")]
        else:
            names = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*.json")]
        return sorted(names)

    def read(self, name: str) -> bytes:
        if self.members is not None:
            if name not in self.members:
                raise FileNotFoundError(f"{self.root}: has no member {name}")
            return self.members[name]
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        return path.read_bytes()

    def label(self, name: str) -> str:
        return f"{self.root}:{name}" if self.members is not None else str(self.root / name)


def _source(measured: Path) -> _Folder:
    """DIR/rt_policies.tar.gz, DIR/rt/, or DIR itself when it is a tarball or holds summaries."""
    if measured.is_file():
        return _Folder(measured)
    if not measured.is_dir():
        raise FileNotFoundError(f"measured results not found: {measured}")
    for candidate in (measured / "rt_policies.tar.gz", measured / "rt"):
        if candidate.exists():
            return _Folder(candidate)
    return _Folder(measured)


def read_runs(measured: str | Path) -> list[MeasuredRun]:
    """Every runtime run under `measured` (module doc), sorted by name. A .json there that is
    not a runtime summary (no "world_size" and "metrics") is skipped; one that is but lacks what
    the replay needs raises ValueError."""
    folder = _source(Path(measured))
    runs = []
    for member in folder.summaries():
        label = folder.label(member)
        try:
            summary = json.loads(folder.read(member))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{label}: not valid JSON ({err})") from None
        if not (isinstance(summary, dict) and "world_size" in summary and "metrics" in summary):
            continue
        summary = _check_summary(summary, label)
        log_name = (PurePosixPath(member).parent / summary["step_log"]).as_posix()
        if log_name.startswith("./"):
            log_name = log_name[2:]
        try:
            raw = folder.read(log_name)
        except FileNotFoundError:
            raw = None
        if raw is None:  # an absolute or outside path as the runtime was given it
            path = Path(summary["step_log"])
            if not path.is_file():
                raise FileNotFoundError(f"{label}: its step log {summary['step_log']!r} is "
                                        "neither beside it nor at that path")
            raw = path.read_bytes()
        cfg = summary["config"]
        log = read_step_log(raw, name=folder.label(log_name), world_size=summary["world_size"],
                            num_experts=cfg["num_experts"], top_k=cfg["top_k"])
        runs.append(MeasuredRun(name=label, summary=summary, log=log))
    if not runs:
        raise ValueError(f"{measured}: no runtime summary found (expected rt_policies.tar.gz "
                         "or rt/<policy>.json from experiments/runtime/device_multigpu.sh)")
    return runs
