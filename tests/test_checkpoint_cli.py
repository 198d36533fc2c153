"""`probe checkpoint random` / `info`, random checkpoints of every family, and the loader's errors
for broken checkpoint files (one line naming the file and the problem, no traceback)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from probe.cli import _register_all, app
from probe.runtime.checkpoint import CheckpointError, load_config, load_model
from probe.runtime.families import SUPPORTED
from probe.runtime.random_checkpoint import (
    ARCHITECTURES,
    RandomCheckpointSpec,
    write_random_checkpoint,
)

_register_all()


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    """Exit code 1, one line of output, no traceback, and every needle in that line."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random qwen3_moe checkpoint; tests copy it before breaking it."""
    return write_random_checkpoint("qwen3_moe", tmp_path_factory.mktemp("tiny") / "ckpt")


def _copy(src, dst):
    dst.mkdir(exist_ok=True)
    for file in src.iterdir():
        shutil.copy(file, dst / file.name)
    return dst


def _shard(path, num_shards: int = 2):
    """Turn path's model.safetensors into `num_shards` shards and an index."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::num_shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


# ------------------------------------------------------------------------- random checkpoints


def test_every_supported_family_has_a_random_architecture():
    from probe.runtime.checkpoint_cli import _ARCHS

    assert set(ARCHITECTURES) == set(_ARCHS) == set(SUPPORTED)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_random_checkpoint_loads_and_runs(arch, tmp_path):
    spec = RandomCheckpointSpec(num_layers=3, num_experts=6, top_k=2, hidden_size=32,
                                expert_width=16)
    path = write_random_checkpoint(arch, tmp_path / arch, spec, seed=3, std=0.3)
    cfg = load_config(path)
    assert (cfg.model_type, cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.hidden_size,
            cfg.moe_intermediate_size) == (arch, 3, 6, 2, 32, 16)
    model = load_model(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    assert out.logits.shape == (2, 9, cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert len(out.routing) == cfg.num_moe_layers >= 2
    # The weights are random, not constant: routing spreads over several experts.
    assert out.routing[-1].topk_ids.unique().numel() >= 3

    transformers = pytest.importorskip("transformers")
    model_cls = getattr(transformers, json.loads((path / "config.json").read_text())[
        "architectures"][0])
    ref, info = model_cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    with torch.no_grad():
        ref_logits = ref.eval()(ids).logits
    # fp32 on both sides, added in different orders (transformers 5.25 runs gpt-oss's experts
    # as one grouped matmul; the max difference was 1.5e-5 on logits up to 6.9): a bound
    # relative to the logits' scale, 1e-5 of it; a wrong weight, op or layout is far above.
    scale = max(1.0, ref_logits.abs().max().item())
    assert (out.logits - ref_logits).abs().max().item() <= 1e-5 * scale


def test_random_checkpoint_is_seeded(tmp_path):
    a = write_random_checkpoint("olmoe", tmp_path / "a", seed=1)
    b = write_random_checkpoint("olmoe", tmp_path / "b", seed=1)
    c = write_random_checkpoint("olmoe", tmp_path / "c", seed=2)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]
    bf16 = write_random_checkpoint("olmoe", tmp_path / "d", seed=1, dtype="bf16")
    assert load_file(bf16 / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert load_model(bf16).cfg == load_model(a).cfg


def test_random_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of qwen3_moe.*got 'llama'"):
        write_random_checkpoint("llama", tmp_path / "x")
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds num_experts \(8\)"):
        RandomCheckpointSpec(top_k=9)
    with pytest.raises(ValueError, match=r"hidden_size \(20\) must be a multiple of 2 \* "
                                         r"num_heads \(8\)"):
        RandomCheckpointSpec(hidden_size=20)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        RandomCheckpointSpec(num_layers=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_random_checkpoint("mixtral", tmp_path / "x", dtype="int8")
    path = write_random_checkpoint("mixtral", tmp_path / "y")
    with pytest.raises(FileExistsError, match="is not empty"):
        write_random_checkpoint("mixtral", path)
    write_random_checkpoint("gpt_oss", path, overwrite=True)
    assert load_config(path).model_type == "gpt_oss"


def test_cli_random_then_info_run(tmp_path):
    out = tmp_path / "tiny-moe"
    result = invoke("checkpoint", "random", "--arch", "deepseek_v3", "--out", out,
                    "--layers", "3", "--experts", "4", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: random deepseek_v3, 3 layers (2 MoE), 4 experts, top-2" in (
        result.output)
    result = invoke("checkpoint", "info", out, "--run")
    assert result.exit_code == 0, result.output
    assert "4 / 2" in result.output and "finite=True" in result.output
    assert_one_line_error(invoke("checkpoint", "random", "--arch", "deepseek_v3", "--out", out),
                          str(out), "not empty")
    assert_one_line_error(invoke("checkpoint", "random", "--arch", "qwen3_moe", "--out",
                                 tmp_path / "z", "--experts", "1"), "top_k (2) exceeds")


def test_generate_reads_a_prompt_with_the_random_checkpoint(tiny):
    result = invoke("generate", "--model", tiny, "--prompt", "def add(a, b):",
                    "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "text: " in result.output and "TTFT" in result.output


# ---------------------------------------------------------------------------- broken files


def test_truncated_single_file(tiny, tmp_path):
    path = _copy(tiny, tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"^{file}: truncated: {len(data) // 2} bytes") as e:
        load_model(path)
    assert isinstance(e.value, ValueError) and e.value.path == file
    assert_one_line_error(invoke("checkpoint", "info", path), str(file), "truncated")
    assert_one_line_error(invoke("checkpoint", "info", path, "--run"), str(file), "truncated")
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated: 5 bytes, too short"):
        load_model(path)


def test_bad_header_and_trailing_bytes(tiny, tmp_path):
    path = _copy(tiny, tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    file.write_bytes(data[:8] + b"[" * header_len + data[8 + header_len:])
    with pytest.raises(CheckpointError, match=f"^{file}: bad header"):
        load_model(path)
    assert_one_line_error(invoke("checkpoint", "info", path), str(file), "bad header")
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)
    file.write_bytes(data + b"xx")
    with pytest.raises(CheckpointError, match="2 bytes past the last tensor"):
        load_model(path)


def test_truncated_and_missing_shards(tiny, tmp_path):
    path = _shard(_copy(tiny, tmp_path / "ckpt"))
    assert torch.equal(load_model(path).lm_head.weight, load_model(tiny).lm_head.weight)
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"^{shard}: truncated"):
        load_model(path)
    assert_one_line_error(invoke("checkpoint", "info", path), str(shard), "truncated")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard files that do not exist: {shard}"):
        load_model(path)
    assert_one_line_error(invoke("checkpoint", "info", path), str(shard), "do not exist")


def test_index_names_a_tensor_its_shard_lacks(tiny, tmp_path):
    path = _shard(_copy(tiny, tmp_path / "ckpt"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    shard = index["weight_map"][name]
    other = next(f for f in index["weight_map"].values() if f != shard)
    index["weight_map"][name] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"^{path / other}: missing tensor: .*{name}"):
        load_model(path)
    assert_one_line_error(invoke("checkpoint", "info", path), str(path / other), name)
    (path / "model.safetensors.index.json").write_text("{not json")
    assert_one_line_error(invoke("checkpoint", "info", path), "model.safetensors.index.json",
                          "bad index")


def test_shape_mismatch_and_missing_tensor_name_the_file(tiny, tmp_path):
    path = _copy(tiny, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*model.norm.weight has shape "
                                              r"\[3\], config implies \[64\] "
                                              r"\(in model.safetensors\)"):
        load_model(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    file = path / "model.safetensors"
    with pytest.raises(CheckpointError, match=f"^{file}: missing 1 tensor.*model.norm.weight"):
        load_model(path)
    assert_one_line_error(invoke("checkpoint", "info", path), str(file), "model.norm.weight")


def test_missing_folder_config_and_weights(tiny, tmp_path):
    assert_one_line_error(invoke("checkpoint", "info", tmp_path / "nope"),
                          f"checkpoint directory not found: {tmp_path / 'nope'}")
    assert_one_line_error(invoke("checkpoint", "info", tmp_path),
                          f"checkpoint has no config.json: {tmp_path / 'config.json'}")
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    assert_one_line_error(invoke("checkpoint", "info", tmp_path), f"no weights in {tmp_path}")
    (tmp_path / "config.json").write_text("{")
    assert_one_line_error(invoke("checkpoint", "info", tmp_path),
                          str(tmp_path / "config.json"), "not valid JSON")


def test_generate_names_a_missing_checkpoint(tmp_path):
    assert_one_line_error(invoke("generate", "--model", tmp_path / "nope", "--ids", "1,2"),
                          f"checkpoint directory not found: {tmp_path / 'nope'}")
