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
