"""vLLM colocate backend against a stand-in `vllm` module (the real one needs a CUDA GPU): sampling options are
translated, each prompt is sent once with n=G, outputs become a Rollout with EOS masking, and weights are pushed
once per optimizer step with PEFT prefixes removed. Not a test of vLLM itself."""

import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.builtin import builtin_model_path
from posttrain.rollout.engine import engine_name, sampling_options
from posttrain.rollout.vllm import VLLMColocate


class _FakeLLM:
    instances: list["_FakeLLM"] = []

    def __init__(self, **options):
        self.options, self.requests, self.loaded, self.resets = options, [], [], 0
        _FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.requests.append((prompts, params))
        eos = 2
        outs = []
        for i, p in enumerate(prompts):
            n = params[i].n if isinstance(params, list) else params.n
            seqs = []
            for k in range(n):  # vLLM's logprobs=0 form: per position {sampled id: Logprob}
                ids = [7] * (k + 1) + ([eos] if k % 2 == 0 else [])
                logprobs = [{t: types.SimpleNamespace(logprob=-0.5 - 0.1 * j)} for j, t in enumerate(ids)]
                seqs.append(types.SimpleNamespace(token_ids=ids, logprobs=logprobs))
            outs.append(types.SimpleNamespace(outputs=seqs))
        return outs

    def apply_model(self, fn):
        model = types.SimpleNamespace(load_weights=lambda weights: self.loaded.append([n for n, _ in weights]))
        return fn(model)

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # what building an engine sets; restored afterwards
    _FakeLLM.instances.clear()
    return module


def test_sampling_options():
    assert sampling_options({"do_sample": False}) == {"temperature": 0.0}
    opts = sampling_options({"do_sample": True, "temperature": 0.7, "top_k": None, "min_p": None, "stop": ["\n"]})
    assert opts == {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                    "stop": ["\n"]}


def test_colocate_generate_and_weight_sync(fake_vllm):
    path = builtin_model_path("posttrain/tiny")
    policy = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    backend = VLLMColocate(path, gpu_memory_utilization=0.2, seed=3)
    llm = _FakeLLM.instances[0]
    assert llm.options["gpu_memory_utilization"] == 0.2 and llm.options["tensor_parallel_size"] == 1
    rollout = backend.generate(policy, tok, [[5, 6, 7], [8]], 3, 10, {"do_sample": True, "temperature": 0.9}, step=0)
    prompts, params = llm.requests[0]
    assert [p["prompt_token_ids"] for p in prompts] == [[5, 6, 7], [8]]  # each prompt once, n = G
    assert params.n == 3 and params.max_tokens == 10 and params.temperature == 0.9
    assert rollout.completion_ids.shape == (6, 4) and rollout.prompt_ids.shape == (6, 3)
    assert tok.eos_token_id == 2  # what the stand-in engine emits to finish a completion
    ends_with_eos = [k % 2 == 0 for k in range(3)] * 2
    lengths = [(k + 1) + (1 if e else 0) for k, e in zip([0, 1, 2] * 2, ends_with_eos)]
    assert rollout.completion_mask.sum(1).tolist() == lengths
    assert rollout.is_truncated.tolist() == [not e for e in ends_with_eos]
    assert rollout.prompt_mask[3].tolist() == [0, 0, 1]  # left padding
    assert params.logprobs == 0 and llm.options["logprobs_mode"] == "processed_logprobs"
    # the sampled tokens' log-probs come back aligned with the tokens, NaN on padding
    assert rollout.sampler_logps[2, :4].tolist() == pytest.approx([-0.5, -0.6, -0.7, -0.8])
    assert torch.isnan(rollout.sampler_logps[0, 2:]).all()
    uneven = backend.generate(policy, tok, [[5], [6, 7]], [1, 3], 4, {}, step=0)  # a process's slice of groups
    assert [p.n for p in llm.requests[1][1]] == [1, 3] and uneven.prompt_ids[:, -1].tolist() == [5, 7, 7, 7]
    assert len(llm.loaded) == 1 and llm.resets == 1  # same optimizer step: no second push
    backend.generate(policy, tok, [[5]], 2, 4, {}, step=1)
    assert len(llm.loaded) == 2 and "model.embed_tokens.weight" in llm.loaded[1]


def test_peft_names_are_stripped():
    assert engine_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert engine_name("lm_head.weight") == "lm_head.weight"


def test_without_vllm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    with pytest.raises(ImportError, match=r"pip install 'posttrain\[vllm\]'"):
        VLLMColocate("x")


def test_config_checks_vllm_modes(monkeypatch):
    from posttrain.configs import grpo, online

    monkeypatch.setattr(online, "_has_vllm", lambda: False)
    config = grpo.GRPOConfig(output_dir="x", use_vllm=True)  # a config may be written without vLLM …
    with pytest.raises(ValueError, match="use_vllm=True needs the vllm package .*vllm_mode='server'"):
        online.check_vllm_use(config)  # … the trainer that would use it says what is missing
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size applies to vLLM generation only"):
        online.check_vllm_use(grpo.GRPOConfig(output_dir="x", vllm_tensor_parallel_size=2))
    with pytest.raises(ValueError, match="vllm_model_impl is an option of the generation server"):
        online.check_vllm_use(grpo.GRPOConfig(output_dir="x", use_vllm=True, vllm_mode="server",
                                              vllm_model_impl="transformers"))
    with pytest.raises(ValueError, match="vllm_group_port=1234: .*HTTP"):
        grpo.GRPOConfig(output_dir="x", use_vllm=True, vllm_group_port=1234)
    # server mode needs no vllm in the training process
    args = grpo.GRPOConfig(output_dir="x", use_vllm=True, vllm_mode="server")
    assert (args.vllm_server_base_url, args.vllm_server_host, args.vllm_server_port, args.vllm_server_timeout) == \
        (None, "0.0.0.0", 8000, 240.0)
    for kwargs, needle in [({"vllm_server_base_url": "10.0.0.2:8000"}, "must start with http:// or https://"),
                           ({"vllm_server_port": 0}, r"vllm_server_port must be in \[1, 65535\]"),
                           ({"vllm_server_timeout": 0}, "vllm_server_timeout must be > 0"),
                           ({"vllm_mode": "remote"}, "vllm_mode must be one of colocate, server")]:
        with pytest.raises(ValueError, match=needle):
            grpo.GRPOConfig(output_dir="x", use_vllm=True, **{"vllm_mode": "server", **kwargs})
    monkeypatch.setattr(online, "_has_vllm", lambda: True)
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\)"):
        grpo.GRPOConfig(output_dir="x", use_vllm=True, vllm_gpu_memory_utilization=1.5)
    assert grpo.GRPOConfig(output_dir="x", use_vllm=True).vllm_mode == "colocate"


def test_server_flags_reach_the_config(tmp_path):
    from posttrain.cli import parse_command_args

    for command in ("grpo", "rloo", "online_dpo", "ppo"):
        _, _, args = parse_command_args(command, [
            "--output_dir", str(tmp_path), "--use_vllm", "true", "--vllm_mode", "server",
            "--vllm_server_base_url", "http://gen:9000", "--vllm_server_timeout", "5"])
        assert (args.vllm_mode, args.vllm_server_base_url, args.vllm_server_timeout) == ("server", "http://gen:9000",
                                                                                       5.0)


def test_grpo_trains_on_vllm_rollouts(fake_vllm, monkeypatch, tmp_path):
    """use_vllm=True: the trainer samples through the engine (n=G per prompt) and pushes weights every step."""
    from posttrain.configs import grpo, online
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.trainers.grpo import GRPOTrainer

    monkeypatch.setattr(online, "_has_vllm", lambda: True)
    args = grpo.GRPOConfig(output_dir=str(tmp_path), use_vllm=True, num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=6, max_steps=2, learning_rate=1e-3, report_to="none",
                           save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = GRPOTrainer("posttrain/tiny", reward_funcs=lambda completion_ids, **kw: [len(c) for c in completion_ids],
                          args=args, train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    trainer.train()
    llm = _FakeLLM.instances[0]
    assert len(llm.requests) == 2 and all(len(prompts) == 2 for prompts, _ in llm.requests)  # 2 prompts × G=4
    assert len(llm.loaded) == 2  # weights pushed before each step's rollout
    assert trainer.state.log_history[0]["completions/mean_length"] == pytest.approx((2 + 2 + 4 + 4) / 4)  # [7, EOS], [7, 7], …


def test_grpo_applies_the_sampler_correction(fake_vllm, monkeypatch, tmp_path):
    """use_vllm with vllm_importance_sampling_correction: old log-probs are computed even on-policy, the weight
    π_old/π_vLLM of each sequence (the stand-in engine's log-probs differ from the model's) reaches the loss, and
    the sampling/* metrics are logged."""
    from posttrain.configs import grpo, online
    from posttrain.data.arith import load_builtin_dataset
    from posttrain.trainers.grpo import GRPOTrainer

    monkeypatch.setattr(online, "_has_vllm", lambda: True)
    args = grpo.GRPOConfig(output_dir=str(tmp_path), use_vllm=True, num_generations=4, per_device_train_batch_size=8,
                           max_completion_length=6, max_steps=1, report_to="none", save_strategy="no",
                           disable_tqdm=True, logging_steps=1, vllm_importance_sampling_mode="token_truncate",
                           vllm_importance_sampling_clip_max=2.0)
    trainer = GRPOTrainer("posttrain/tiny", reward_funcs=lambda completion_ids, **kw: [len(c) for c in completion_ids],
                          args=args, train_dataset=load_builtin_dataset("posttrain/arith-prompts", split="train[:8]"))
    assert trainer.needs_old_logps() and trainer.use_vllm
    rows = [trainer.train_dataset[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]
    trainer.model.train()
    batches = trainer._cycle_batches(rows)
    ratio = batches[0]["sampler_ratio"]
    mask = batches[0]["completion_mask"].bool()
    expected = torch.exp(batches[0]["old_logps"] - batches[0]["sampler_logps"]).clamp(max=2.0)
    torch.testing.assert_close(ratio[mask], expected[mask])
    assert torch.isfinite(trainer.compute_loss(trainer.model, batches[0]).detach())
    trainer.train()
    assert "sampling/importance_sampling_ratio/mean" in trainer.state.log_history[0]
