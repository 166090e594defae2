"""Test-wide settings: offline, a private cache for built-in models, few threads, deterministic seeds."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def _posttrain_cache(tmp_path_factory):
    if "POSTTRAIN_CACHE" not in os.environ:
        os.environ["POSTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("posttrain-cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """`tiny_gguf(name, outtype)`: the path of built-in model `name` exported to GGUF (written once per session), so
    the GGUF tests need no download."""
    pytest.importorskip("gguf")
    made: dict[tuple[str, str], str] = {}

    def make(name: str = "posttrain/tiny-llama", outtype: str = "f32") -> str:
        if (name, outtype) not in made:
            from posttrain.models import loading
            from posttrain.models.gguf_export import export_gguf

            path = str(tmp_path_factory.mktemp("gguf") / f"{name.split('/')[-1]}-{outtype}.gguf")
            export_gguf(loading.load_pretrained_model(name), loading.load_tokenizer(name), path, outtype)
            made[name, outtype] = path
        return made[name, outtype]

    return make


@pytest.fixture
def tiny_moe():
    """`tiny_moe()`: a random-init 2-layer Mixtral (4 experts, top-2, config router_aux_loss_coef 0.02) with the
    built-in tiny model's tokenizer, for the Mixture-of-Experts router-loss tests."""

    def make():
        import torch
        from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

        from posttrain.models.builtin import builtin_model_path

        tok = AutoTokenizer.from_pretrained(builtin_model_path("posttrain/tiny"))
        config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, router_aux_loss_coef=0.02, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        return MixtralForCausalLM(config), tok

    return make
