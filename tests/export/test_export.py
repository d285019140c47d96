"""HF export of every family: the transformers model computes the megatron model's logits, its
KV cache decodes what the uncached model decodes, sharded safetensors load, bad input is refused,
a table shared by every memory layer is stored once and converts back exactly."""

import json
import pickle
import shutil

import pytest
import torch

from tests.training.conftest import ROOT
from ultramem_megatron.config import load_config
from ultramem_megatron.export import ConversionError, export_checkpoint, export_model, import_hf
from ultramem_megatron.export.checkpoints import single_process_model
from ultramem_megatron.export.convert import exported_keys, from_hf, to_hf
from ultramem_megatron.export.hf_dir import read_hf_dir

TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["model.hidden_size=64", "model.num_layers=4", "model.ffn_hidden_size=96",
         "model.num_attention_heads=4", "model.seq_length=64"]
VARIANTS = {
    "dense": ["model.family=dense"],
    "dense-swiglu-layernorm-learned": ["model.family=dense", "model.swiglu=true",
                                       "model.normalization=LayerNorm",
                                       "model.position_embedding=learned_absolute"],
    "moe": ["model.family=moe", "model.moe.num_experts=4", "model.moe.topk=2"],
    "moe-top1-swiglu": ["model.family=moe", "model.moe.num_experts=4", "model.moe.topk=1",
                        "model.swiglu=true"],
    "pkm": ["model.family=pkm", "model.memory_spans=0:2"],
    "ultramem": ["model.family=ultramem", "model.memory_spans=0:1/2:3"],
    "ultramem-conv-layernorm": ["model.family=ultramem", "model.ultramem.query_conv_kernel=3",
                                "model.ultramem.qk_norm=layernorm", "model.ultramem.query_batchnorm=true",
                                "model.ultramem.phase1_topk=24", "model.ultramem.expansion=9",
                                "model.ultramem.num_cores=1", "model.ultramem.tucker_rank=3"],
    "ultramem_v2": ["model.family=ultramem_v2", "model.memory_spans=all"],
    "ultramem_v2-per-group-gelu-conv": [
        "model.family=ultramem_v2", "model.memory_spans=0:1/2:3",
        "model.ultramem_v2.value_projection=per_group", "model.ultramem_v2.expansion=4",
        "model.ultramem_v2.pre_value_activation=gelu", "model.ultramem_v2.query_conv_kernel=3",
        "model.ultramem_v2.query_batchnorm=true", "model.ultramem_v2.qk_norm=layernorm",
        "model.ultramem_v2.num_heads=2", "model.ultramem_v2.phase1_topk=20"],
    "ultramem_v2-one-query-no-pre-values": [
        "model.family=ultramem_v2", "model.memory_spans=1:1/3:3",
        "model.ultramem_v2.query_per_rank=false", "model.ultramem_v2.pre_value_dim=0",
        "model.ultramem_v2.share_ratio=1.0", "model.ultramem_v2.tucker_rank=3",
        "model.ultramem_v2.num_cores=1"],
    "memory_plus": ["model.family=memory_plus", "model.memory_spans=0:1/2:3"],
    "memory_plus-all-bias-query-norm": ["model.family=memory_plus", "model.memory_spans=all",
                                        "model.memory_plus.qk_norm=query",
                                        "model.memory_plus.query_bias=true"],
}


def trained_looking_model(run):
    """The run's megatron model with every weight moved off its init (norm gains, the identity
    query conv, BatchNorm running statistics), so no mapping error can hide behind a 1 or a 0."""
    torch.manual_seed(0)
    model = single_process_model(run)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or "query_conv" in name:
                param.add_(0.1 * torch.randn_like(param))
        model.train()
        model(torch.randint(0, 50000, (2, 16)), torch.arange(16).expand(2, -1), None)
        model.refresh_rank1()
    return model.eval()


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                local_files_only=True).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_logits_and_cached_generation_match(tmp_path, variant):
    run = load_config(TINY, SMALL + VARIANTS[variant])
    model = trained_looking_model(run)
    out = export_model(model, run, tmp_path / variant.replace("-", "_"),
                       max_shard_size="1MB" if variant == "dense" else "5GB")
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    if variant == "dense":   # sharded: an index and several shards
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    hf = load_hf(out)
    torch.manual_seed(1)
    tokens = torch.randint(0, 50000, (3, 40))
    with torch.no_grad():
        reference = model(tokens, torch.arange(40).expand(3, -1), None)   # [b, s, V]
        logits = hf(tokens, use_cache=False).logits
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-4
    with torch.no_grad():   # forward with the cache by hand: 30 tokens, then one at a time
        out = hf(tokens[:, :30], use_cache=True)
        for position in range(30, 40):
            cache = out[1]   # the output's cache, whatever this transformers release calls it
            out = hf(tokens[:, position:position + 1], past_key_values=cache, use_cache=True)
            assert (out.logits[:, 0] - reference[:, position]).abs().max().item() < 1e-4

    prompt = tokens[:2, :6]
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
        uncached = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
        # the megatron model's own greedy continuation, one full forward per token
        sequence = prompt[:1]
        for _ in range(16):
            step = model(sequence, torch.arange(sequence.shape[1]).unsqueeze(0), None)
            sequence = torch.cat([sequence, step[:, -1:].argmax(-1)], dim=1)
        # beam search reorders the cache (with the query conv's history riding in it)
        beams = [hf.generate(prompt, max_new_tokens=8, do_sample=False, num_beams=3,
                             use_cache=use_cache) for use_cache in (True, False)]
    assert cached.shape == (2, 22)
    assert torch.equal(cached, uncached)
    assert torch.equal(beams[0], beams[1])
    assert torch.equal(cached[:1], sequence)


def test_import_refuses_bad_exports(tmp_path):
    run = load_config(TINY, SMALL + VARIANTS["ultramem"])
    good = export_model(single_process_model(run), run, tmp_path / "good", tokenizer="")

    edited = tmp_path / "edited"
    shutil.copytree(good, edited)
    config = json.loads((edited / "config.json").read_text())
    config["hidden_size"] = 128
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="hidden_size disagree"):
        import_hf(edited, tmp_path / "m1")

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickled weights are never loaded"):
        import_hf(pickled, tmp_path / "m2")

    foreign = tmp_path / "foreign"
    shutil.copytree(good, foreign)
    del config["megatron_model_config"]
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="no megatron_model_config"):
        import_hf(foreign, tmp_path / "m3")

    from safetensors.torch import save_file
    _, state = read_hf_dir(good)
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(edited / "model.safetensors"))
    shutil.copyfile(good / "config.json", edited / "config.json")
    with pytest.raises(ConversionError, match=r"shape \(3, 3\)"):
        import_hf(edited, tmp_path / "m4")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    run = load_config(TINY, SMALL + VARIANTS["pkm"])
    out = export_model(trained_looking_model(run), run, tmp_path / "pkm_nopickle")

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled data while loading an export")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    hf = load_hf(out)
    config, state = read_hf_dir(out)
    assert set(state) == set(hf.state_dict())


@pytest.mark.parametrize("variant", ["ultramem_v2", "memory_plus"])
def test_shared_table_is_stored_once_and_converts_back(tmp_path, variant):
    run = load_config(TINY, SMALL + VARIANTS[variant])
    model = trained_looking_model(run)
    state = model.state_dict()
    memory, hidden = run.model.memory, run.model.hidden_size
    rows = memory.table_rows if variant == "ultramem_v2" else memory.num_values
    hf_state = to_hf(state, run.model)
    tables = sorted(k for k in hf_state if k.endswith(("values", "pre_values")))
    expected = {"model.memory_tables.values": (rows, memory.resolved_value_dim(hidden))}
    if variant == "ultramem_v2":
        expected["model.memory_tables.pre_values"] = (rows, memory.resolved_pre_value_dim(hidden))
    assert {k: tuple(hf_state[k].shape) for k in tables} == expected
    back = from_hf(hf_state, single_process_model(run).state_dict(), run.model)
    assert sorted(back) == sorted(exported_keys(state))
    assert all(torch.equal(back[k], state[k]) for k in back)

    assert not [k for k in state if ".memory.values.values" in k]   # held by the model once

    out = export_model(model, run, tmp_path / "hf", tokenizer="")
    _, written = read_hf_dir(out)
    assert set(written) == set(hf_state) == set(load_hf(out).state_dict())
    import_hf(out, tmp_path / "megatron")
    _, again = read_hf_dir(export_checkpoint(tmp_path / "megatron", tmp_path / "again",
                                             tokenizer=""))
    assert sorted(again) == sorted(written)
    assert all(torch.equal(again[k], written[k]) for k in written)
