"""Bad checkpoints get clear errors that name the file and the tensor."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache.safetensors_file import CheckpointError
from engine.loader import load_model
from tests.tiny import make_tiny_mixtral

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_mixtral(str(tmp_path_factory.mktemp("mix")))


@pytest.fixture
def copy(tiny: str, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(tiny, dst)
    return dst


def test_missing_directory_and_config(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope"), CPU)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path), CPU)


def test_missing_weights_file(copy: str) -> None:
    os.remove(os.path.join(copy, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(copy, CPU)


def test_truncated_file_names_the_tensor(copy: str) -> None:
    path = os.path.join(copy, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(copy, CPU)


def test_corrupt_header(copy: str) -> None:
    path = os.path.join(copy, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{{{{garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(copy, CPU)


def test_shape_mismatch_names_file_and_tensor(copy: str) -> None:
    path = os.path.join(copy, "model.safetensors")
    sd = load_file(path)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*shape"):
        load_model(copy, CPU)


def test_missing_expert_tensor(copy: str) -> None:
    path = os.path.join(copy, "model.safetensors")
    sd = load_file(path)
    del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight"):
        load_model(copy, CPU)


def test_unsupported_model_type_lists_supported(copy: str) -> None:
    cfg_path = os.path.join(copy, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt9000"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"gpt9000.*supported: .*mixtral"):
        load_model(copy, CPU)


def test_sharded_checkpoint_loads_like_single_file(tiny: str, tmp_path) -> None:
    from transformers import MixtralForCausalLM
    sharded = str(tmp_path / "sharded")
    MixtralForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = load_model(tiny, CPU), load_model(sharded, CPU)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert [s.nbytes for s in a.experts] == [s.nbytes for s in b.experts]


def test_stacked_expert_layout_gives_the_same_experts(tiny: str, copy: str) -> None:
    """experts.gate_up_proj [E, 2I, H] / experts.down_proj [E, H, I] (transformers v5 in memory)."""
    from cache.provider import read_tensor
    path = os.path.join(copy, "model.safetensors")
    sd = load_file(path)
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gu = [torch.cat([sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight")]) for e in range(4)]
        down = [sd.pop(f"{p}.{e}.w2.weight") for e in range(4)]
        sd[f"{p}.gate_up_proj"] = torch.stack(gu)
        sd[f"{p}.down_proj"] = torch.stack(down)
    save_file(sd, path)
    a, b = load_model(tiny, CPU), load_model(copy, CPU)
    assert len(a.experts) == len(b.experts) == 8
    for sa, sb in zip(a.experts, b.experts):
        for ra, rb in ((sa.gate, sb.gate), (sa.up, sb.up), (sa.down, sb.down)):
            assert torch.equal(read_tensor(ra), read_tensor(rb))


@pytest.mark.parametrize("name", ["glm4_moe", "deepseek_v3"])
def test_multi_token_prediction_layer_is_skipped_quietly(tmp_path, caplog: pytest.LogCaptureFixture,
                                                          name: str) -> None:
    """GLM-4.5 and DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last
    decoder layer (model.layers.{num_hidden_layers}.*, experts included); decoding does not use
    it, so it is skipped with an info line, not reported as unused, and the model computes as
    without it."""
    from tests.engine.tiny_families import add_mtp_layer, make_family_checkpoint
    plain = make_family_checkpoint(name, str(tmp_path / "plain"))
    with_mtp = str(tmp_path / "mtp")
    added = add_mtp_layer(plain, with_mtp)
    n = json.load(open(os.path.join(plain, "config.json")))["num_hidden_layers"]
    with caplog.at_level("INFO", logger="moeserve.loader"):
        lm = load_model(with_mtp, CPU, torch.float32, context_length=32)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"{added} tensors under model.layers.{n} are not used" in caplog.text
    ref = load_model(plain, CPU, torch.float32, context_length=32)
    assert len(lm.experts) == len(ref.experts) == 2 * 8 and lm.model.skipped_prefixes == (f"model.layers.{n}.",)
    for a, b in zip(lm.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)


def test_ernie_multi_token_prediction_tensors_are_skipped_quietly(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Baidu's ERNIE checkpoints keep theirs under model.mtp_* (not model.layers.N)."""
    from tests.engine.tiny_families import make_family_checkpoint
    path = make_family_checkpoint("ernie4_5_moe", str(tmp_path / "ernie"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    extra = {"model.mtp_linear_proj.0.weight": torch.zeros(64, 128), "model.mtp_emb_norm.0.weight": torch.ones(64),
             "model.mtp_block.0.mlp.experts.0.gate_proj.weight": torch.zeros(32, 64)}
    save_file({**tensors, **extra}, os.path.join(path, "model.safetensors"))
    with caplog.at_level("INFO", logger="moeserve.loader"):
        load_model(path, CPU, torch.float32, context_length=32)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "3 tensors under" in caplog.text


def test_loading_skips_the_initialisers_and_restores_them(tiny: str) -> None:
    """The model is built on the meta device with torch.nn.init's functions skipped (on meta they
    import torch._dynamo: 1.6 s at every engine start): a fresh process that loads a model has not
    imported it, and the functions are torch's own again afterwards, after a failed build too."""
    import subprocess
    import sys

    from torch.nn import init
    code = ("import sys, torch\nfrom engine.loader import load_model\n"
            f"load_model({tiny!r}, torch.device('cpu'), torch.float32, context_length=32)\n"
            "print('torch._dynamo' in sys.modules)")
    from bench.common import REPO
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
    before = {n: getattr(init, n) for n in ("normal_", "uniform_", "kaiming_uniform_", "zeros_")}
    from engine.models import skeleton
    from engine.models.base import HFConfig
    with pytest.raises(Exception):
        skeleton(HFConfig({"model_type": "mixtral"}), 16)              # no sizes: the build fails
    assert {n: getattr(init, n) for n in before} == before
    load_model(tiny, torch.device("cpu"), torch.float32, context_length=32)
    assert {n: getattr(init, n) for n in before} == before
    assert float(torch.nn.Linear(8, 8).weight.detach().abs().sum()) > 0      # initialised as torch does
