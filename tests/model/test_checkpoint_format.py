"""One checkpoint format: the local spec saves exactly the keys megatron's Transformer Engine spec saves."""

from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ultramem_megatron import megatron_compat
from ultramem_megatron.config import load_config
from ultramem_megatron.model.capabilities import Capabilities
from ultramem_megatron.model.gpt import build_model
from ultramem_megatron.training.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parents[2]
TE = megatron_compat.transformer_engine_available()

# TE's naming contract, as data: the keys megatron-core's get_gpt_layer_with_transformer_engine_spec
# (0.16 to 0.19) saves. TELayerNormColumnParallelLinear carries the fused norm as
# layer_norm_weight / layer_norm_bias (no bias under RMSNorm); a dense FFN's pre-FFN norm is fused
# into fc1, an MoE layer's is a TENorm of its own; SequentialMLP experts save one tensor per
# projection, sharded over the expert axis. Keys marked LN exist only with LayerNorm.
TE_MODEL_KEYS = ["embedding.word_embeddings.weight", "output_layer.weight",
                 "decoder.final_layernorm.weight", "LN decoder.final_layernorm.bias"]
TE_POSITION_KEYS = ["embedding.position_embeddings.weight"]   # learned_absolute only
TE_ATTENTION_KEYS = ["self_attention.linear_qkv.layer_norm_weight",
                     "LN self_attention.linear_qkv.layer_norm_bias",
                     "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"]
TE_DENSE_FFN_KEYS = ["mlp.linear_fc1.layer_norm_weight", "LN mlp.linear_fc1.layer_norm_bias",
                     "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
TE_MOE_FFN_KEYS = ["pre_mlp_layernorm.weight", "LN pre_mlp_layernorm.bias", "mlp.router.weight",
                   "mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight"]


def _expected(run) -> set[str]:
    model = run.model
    layer = TE_ATTENTION_KEYS + (TE_MOE_FFN_KEYS if model.family == "moe" else TE_DENSE_FFN_KEYS)
    keys = TE_MODEL_KEYS + (TE_POSITION_KEYS if model.position_embedding != "rope" else [])
    keys += [f"decoder.layers.{i}.{key}" if not key.startswith("LN ")
             else f"LN decoder.layers.{i}.{key[3:]}" for i in range(model.num_layers) for key in layer]
    layer_norm = model.normalization == "LayerNorm"
    return {key[3:] if key.startswith("LN ") else key for key in keys
            if layer_norm or not key.startswith("LN ")}


def _checkpoint_keys(model) -> set[str]:
    """Checkpoint keys of everything but the memory layers (ours, the same under both specs)."""
    sharded = megatron_compat.model_sharded_state_dict(model)
    return {item.key for item in sharded.values() if ".mlp.memory." not in item.key}


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    megatron_compat.initialize_single_process()


@pytest.mark.parametrize("family", ["dense", "moe", "pkm", "ultramem"])
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_checkpoint_keys_follow_the_te_contract(family, norm, spec):
    """Span blocks included (tiny.yaml's span 1:2 at 4 blocks, plus a span starting at 0)."""
    if spec == "te" and not TE:
        pytest.skip("Transformer Engine does not import here; the local spec is checked against "
                    "TE's contract written as data")
    caps = Capabilities(transformer_engine=spec == "te", cuda=spec == "te")
    for spans, position in (("1:2", "rope"), ("0:1/2:3", "learned_absolute")):
        run = load_config(ROOT / "configs/tiny.yaml", [
            f"model.family={family}", f"model.normalization={norm}",
            f"model.memory_spans={spans}", f"model.position_embedding={position}"])
        with torch.device("meta"):
            model = build_model(run.model, run.parallel, torch.float32, caps)
        assert _checkpoint_keys(model) == _expected(run)


def test_te_checkpoint_loads_into_the_local_model(tmp_path):
    """A checkpoint as the TE spec writes it (the contract's keys plus TE's `_extra_state` FP8
    metadata) loads into the local-spec model the exporter builds, tensor for tensor."""
    megatron_compat.initialize_distributed(1, seed=1234)   # what train.py and the exporter run
    run = load_config(ROOT / "configs/tiny.yaml", ["model.family=ultramem", "model.num_layers=3"])
    writer = build_model(run.model, run.parallel, torch.float32, Capabilities())
    sharded = megatron_compat.model_sharded_state_dict(writer)
    for key in ("decoder.layers.0.self_attention.linear_qkv._extra_state",
                "decoder.layers.1.mlp.linear_fc1._extra_state"):
        sharded[key] = ShardedObject(key, {"fp8_meta": "scale"}, (1,), (0,), replica_id=0)
    dist_checkpointing.save(sharded, str(tmp_path))
    reader = build_model(run.model, run.parallel, torch.float32, Capabilities())
    for param in reader.parameters():
        torch.nn.init.zeros_(param)
    load_model_weights(tmp_path, reader)
    written, read = writer.state_dict(), reader.state_dict()
    tensors = [k for k, v in written.items() if torch.is_tensor(v)]
    assert len(tensors) > 20
    for key in tensors:
        assert torch.equal(written[key], read[key]), key


def test_te_span_start_unfused_norm_saves_under_the_fused_name():
    """The TE branch of a span's first block, run without TE (megatron's TE extension imports
    with placeholder classes): a TE-shaped layer (pre-FFN norm fused into fc1, IdentityOp in its
    place) gets a TENorm of its own and a plain TE fc1, and its norm still saves as
    'mlp.linear_fc1.layer_norm_*', the key the fused layer has."""
    import copy

    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp

    layer = copy.deepcopy(get_gpt_layer_local_spec())
    layer.submodules.pre_mlp_layernorm = IdentityOp            # as TE's spec has it
    layer.submodules.sharded_state_dict_keys_map = {}
    megatron_compat.unfuse_pre_mlp_norm(layer)
    megatron_compat.canonical_norm_keys(layer, moe=False)
    mlp = layer.submodules.mlp
    fc1 = (mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules).linear_fc1
    assert layer.submodules.pre_mlp_layernorm is TENorm and fc1 is TEColumnParallelLinear
    keys = layer.submodules.sharded_state_dict_keys_map
    assert keys["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"
    assert keys["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
