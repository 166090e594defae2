"""Writing a trained causal LM as one GGUF file that llama.cpp-family tools (llama.cpp, llama-cpp-python, Ollama,
LM Studio) run, with the `gguf` package's `GGUFWriter` and its quantizer.

What llama.cpp expects, and how each piece is produced here:
  - tensor names: llama.cpp's (`token_embd.weight`, `blk.N.attn_q.weight`, `output_norm.weight`, …), looked up
    in gguf's own `TensorNameMap` from the transformers names; a tied `lm_head` is not written (no `output.weight`
    means tied).
  - Llama's rotary layout: transformers rotates the two halves of each head (`rotate_half`), llama.cpp's "normal"
    rope rotates adjacent pairs, so Q and K rows are reordered per head (`interleave_rotary_rows`): row 2j takes
    half-row j and row 2j+1 takes half-row d/2 + j. Qwen2 uses the half layout in llama.cpp too ("neox" rope):
    no reordering. transformers' GGUF reader undoes exactly this reordering, which the read-back tests check.
  - hyperparameters under `<arch>.*` (context length, width, layers, heads, KV heads, head dim, FFN width, RMS-norm
    epsilon, rope base), the tokenizer under `tokenizer.ggml.*` (`models/gguf_vocab.py`) and the chat template.
  - tensor types by `outtype`: f32 everything; f16 and q8_0 for matrices (q8_0: blocks of 32 int8 with one f16
    scale; a matrix whose rows are not a multiple of 32 falls back to f16), norms and biases always f32, as
    llama.cpp's converter does.

Only the `llama` and `qwen2` architectures are written (SmolLM2 and the built-in tiny models); others are refused
in one line. The file is written beside its destination and renamed into place, so a failed export leaves no
half-written file.
Not here: loading the run directory and the CLI (`posttrain/export.py`), reading GGUF (`models/gguf.py`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from posttrain.errors import UserError

OUTTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # transformers model_type → gguf.MODEL_ARCH member
_PERMUTED = ("llama",)  # architectures whose Q/K rows llama.cpp wants interleaved


def interleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads·d, in) rows in transformers' half-split rotary order → llama.cpp's adjacent-pair order, per head."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def check_exportable(config) -> str:
    """The gguf architecture name for `config`, or a one-line error saying why it cannot be exported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export supports the {' and '.join(ARCHITECTURES)} architectures; this model is "
                        f"{model_type!r}. Convert it with llama.cpp's convert_hf_to_gguf.py instead.")
    if not any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or ["ForCausalLM"])):
        raise UserError(f"GGUF export writes language models; this checkpoint is a {config.architectures[0]} "
                        "(a reward or value model), which llama.cpp cannot run as a chat model.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export writes plain rotary embeddings; this model uses rope scaling "
                        f"{rope.get('rope_type', rope.get('type'))!r}, which posttrain does not export.")
    return model_type


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hyperparameters(writer, config, name: str, file_type) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _tensor_type(array: np.ndarray, outtype: str):
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32" or array.ndim < 2:
        return Q.F32
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def gguf_tensors(model, arch: str):
    """(llama.cpp name, float32 array) for every weight of `model`, in state-dict order."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch]), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"No GGUF name for tensor {hf_name!r} of this {arch} model; GGUF export covers the "
                            "standard layers of the architecture only.")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if arch in _PERMUTED and name.endswith("attn_q.weight"):
            array = interleave_rotary_rows(array, config.num_attention_heads)
        elif arch in _PERMUTED and name.endswith("attn_k.weight"):
            array = interleave_rotary_rows(array, n_kv)
        yield name, array


def export_gguf(model, tokenizer, out_path: str, outtype: str = "f16", name: str | None = None) -> dict:
    """Write `model` (a plain causal LM, adapters already merged) with `tokenizer` to `out_path`.

    Returns {"path", "bytes", "tensors", "types": {ggml type: count}, "pre"}.
    """
    from posttrain.models.gguf import require_gguf_package

    require_gguf_package()
    import gguf

    from posttrain.models.gguf_vocab import gguf_vocab, write_vocab

    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}.")
    arch = check_exportable(model.config)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    types: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_hyperparameters(writer, model.config, name or os.path.splitext(os.path.basename(out_path))[0],
                               file_types[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        for tensor_name, array in gguf_tensors(model, arch):
            qtype = _tensor_type(array, outtype)
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
            types[qtype.name] = types.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out_path, "bytes": os.path.getsize(out_path), "tensors": sum(types.values()), "types": types,
            "pre": vocab.pre}
