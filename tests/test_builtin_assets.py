"""Built-in offline assets: the shipped tokenizer and chat templates, the tiny models, the arithmetic data sets."""

import os
import re
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.data import arith
from posttrain.data.arith import BUILTIN_DATASETS, extract_answer, is_builtin_dataset, load_builtin_dataset
from posttrain.models import builtin
from posttrain.models.builtin import BUILTIN_MODELS, builtin_model_path, builtin_tokenizer_path, is_builtin_model

TEMPLATES = os.path.join(builtin.ASSETS_DIR, "chat_templates")
PARAMS = {"posttrain/tiny": 1_016_960, "posttrain/tiny-llama": 1_016_448, "posttrain/tiny-4m": 4_198_656,
          "posttrain/tiny-15m": 12_916_992}
ENGLISH = ["The quick brown fox jumps over the lazy dog.",
           "It's a dog's life, isn't it?\n\n    Indented\ttext (with parens) and \"quotes\"; end.",
           "Return a new list containing all items from the iterable in ascending order."]
ARITH = ["Question: Mia has 7 apples and buys 15 more. How many apples does Mia have now?\n"
         "Answer: 7 + 15 = 22\n#### 22",
         "12345 * 678 = 8369910\n#### 8369910", "The answer is \\boxed{42}."]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "4 * 4?"},
     {"role": "assistant", "content": "4 * 4 = 16\n#### 16"}],
    [{"role": "user", "content": "Only a question, héllo 🙂"}],
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private POSTTRAIN_CACHE for this module, so model materialisation is observed from scratch."""
    path = tmp_path_factory.mktemp("builtin-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(builtin_tokenizer_path())


def _template(name):
    with open(os.path.join(TEMPLATES, name)) as f:
        return f.read()


# ---- tokenizer --------------------------------------------------------------------------------------------------

def test_tokenizer_settings(tok):
    assert tok.is_fast and len(tok) == 4096
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.bos_token is None and tok.unk_token is None
    assert tok.model_max_length == 2048 and tok.padding_side == "right"
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1  # specials are single tokens; nothing added around


@pytest.mark.parametrize("text", ENGLISH + ARITH + ["héllo wörld — 日本語 🙂 ∑", ""])
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_english_tokenizes_reasonably(tok):
    text = ENGLISH[2]
    assert len(tok(text)["input_ids"]) < len(text) / 3


def test_digits_are_single_tokens(tok):
    tokens = tok.convert_ids_to_tokens(tok("12345 + 67890 = 80235, 3.14 and x1y22")["input_ids"])
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens)
    assert "".join(digit_tokens) == "123456789080235314122"


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1][:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "generation %}" not in tok.chat_template
    assert _template("chatml.jinja") == tok.chat_template


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_training_template_renders_identically(tok, messages, add_generation_prompt):
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    training = _template("chatml_training.jinja")
    assert "{%- generation %}" in training
    assert tok.apply_chat_template(messages, chat_template=training, **kwargs) == \
        tok.apply_chat_template(messages, **kwargs)


def test_training_template_assistant_mask(tok):
    messages = CONVERSATIONS[1]
    out = tok.apply_chat_template(messages, chat_template=_template("chatml_training.jinja"), tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert tok.decode(masked) == expected
    # Each trained span ends on <|im_end|> and the newline after it is not trained.
    ends = [k for k in range(len(ids)) if mask[k] and (k + 1 == len(ids) or not mask[k + 1])]
    assert len(ends) == 2 and all(ids[k] == tok.eos_token_id and mask[k + 1] == 0 for k in ends)


# ---- models -----------------------------------------------------------------------------------------------------

def test_registry_names():
    assert set(BUILTIN_MODELS) == set(PARAMS)
    assert all(is_builtin_model(n) for n in PARAMS) and not is_builtin_model("posttrain/huge")
    with pytest.raises(ValueError, match="posttrain/tiny-4m"):
        builtin_model_path("posttrain/huge")


@pytest.mark.parametrize("name", list(PARAMS))
def test_model_materialises_and_runs(cache, tok, name):
    path = builtin_model_path(name)
    assert path == os.path.join(str(cache), "models", name.replace("/", "--"))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == BUILTIN_MODELS[name]["architectures"][0]
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PARAMS[name]) <= 0.05 * PARAMS[name]
    assert f"{PARAMS[name]:,}" in builtin.__doc__  # the documented count is the real one
    cfg = model.config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (tok.pad_token_id, tok.eos_token_id, None)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 2048 and cfg.vocab_size % 64 == 0
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    batch = tok(["Question: 2 + 2?\nAnswer:", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["posttrain/tiny", "posttrain/tiny-4m"])
def test_model_dir_tokenizer_matches_shipped(cache, tok, name):
    # AutoTokenizer picks Qwen2Tokenizer for a qwen2 directory; it must tokenise exactly as the shipped files do.
    model_tok = AutoTokenizer.from_pretrained(builtin_model_path(name))
    for text in ENGLISH + ARITH + ["  spaces\r\n\ttabs '' ''s 'S 1,000.5"]:
        assert model_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert model_tok.chat_template == tok.chat_template and model_tok.eos_token == "<|im_end|>"
    assert model_tok.pad_token == "<|endoftext|>" and model_tok.bos_token is None


def test_sequence_classification_loads(cache, tok):
    model = AutoModelForSequenceClassification.from_pretrained(builtin_model_path("posttrain/tiny"), num_labels=1)
    batch = tok(["a longer first sentence", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


def test_weights_are_deterministic(cache, tmp_path, monkeypatch):
    path = builtin_model_path("posttrain/tiny")
    first = AutoModelForCausalLM.from_pretrained(path).state_dict()
    again = AutoModelForCausalLM.from_pretrained(builtin_model_path("posttrain/tiny")).state_dict()
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))  # a fresh build elsewhere gives the same weights
    fresh = load_file(os.path.join(builtin_model_path("posttrain/tiny"), "model.safetensors"))
    for name, tensor in load_file(os.path.join(path, "model.safetensors")).items():
        assert torch.equal(tensor, fresh[name]) and torch.equal(first[name], again[name])


def test_materialising_keeps_caller_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    builtin_model_path("posttrain/tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def _leftovers(root):
    return [e for e in os.listdir(os.path.join(root, "models")) if e.startswith(".")]


def test_write_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    real = builtin._write_model

    def crash(name, out, fingerprint):
        real(name, out, fingerprint)
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtin, "_write_model", crash)
    with pytest.raises(RuntimeError):
        builtin_model_path("posttrain/tiny")
    assert os.listdir(os.path.join(tmp_path, "models")) == []  # neither a half model nor a temp dir
    monkeypatch.setattr(builtin, "_write_model", real)
    path = builtin_model_path("posttrain/tiny")
    assert os.path.isfile(os.path.join(path, "model.safetensors")) and not _leftovers(tmp_path)


def test_concurrent_callers_share_one_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    results, barrier = [], threading.Barrier(3)

    def call():
        barrier.wait()
        results.append(builtin_model_path("posttrain/tiny"))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert os.listdir(os.path.join(tmp_path, "models")) == ["posttrain--tiny"]
    AutoModelForCausalLM.from_pretrained(results[0])


def test_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    path = builtin_model_path("posttrain/tiny")
    with open(os.path.join(path, builtin._STAMP), "w") as f:
        f.write('{"fingerprint": "old"}')
    assert builtin_model_path("posttrain/tiny") == path
    assert builtin._is_current(path, builtin._fingerprint("posttrain/tiny")) and not _leftovers(tmp_path)


# ---- data sets --------------------------------------------------------------------------------------------------

COLUMNS = {
    "posttrain/arith-lm": {"standard": ["text", "answer"], "conversational": ["messages", "answer"]},
    "posttrain/arith-sft": ["prompt", "completion", "answer"],
    "posttrain/arith-pref": ["prompt", "chosen", "rejected", "answer"],
    "posttrain/arith-pref-implicit": ["chosen", "rejected", "answer"],
    "posttrain/arith-kto": ["prompt", "completion", "label", "answer"],
    "posttrain/arith-prompts": ["prompt", "answer", "solution"],
}
TEXT_COLUMNS = {"text", "messages", "prompt", "completion", "chosen", "rejected"}


def _columns(name, config):
    cols = COLUMNS[name]
    return cols[config] if isinstance(cols, dict) else cols


@pytest.mark.parametrize("config", ["standard", "conversational"])
@pytest.mark.parametrize("name", list(COLUMNS))
def test_dataset_columns_and_sizes(name, config):
    data = load_builtin_dataset(name, config)
    assert set(data) == {"train", "test"} and (len(data["train"]), len(data["test"])) == (2000, 1000)
    assert data["train"].column_names == _columns(name, config)
    row = data["train"][0]
    for col in TEXT_COLUMNS & set(row):
        if config == "standard":
            assert isinstance(row[col], str)
        else:
            assert isinstance(row[col], list) and {"role", "content"} <= set(row[col][0])
    assert re.fullmatch(r"\d+", row["answer"])


def test_registry_matches_columns():
    assert set(BUILTIN_DATASETS) == set(COLUMNS)
    assert all(is_builtin_dataset(n) for n in COLUMNS) and not is_builtin_dataset("posttrain/arith")


def test_standard_formats():
    row = load_builtin_dataset("posttrain/arith-sft", split="train[:1]")[0]
    assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
    assert row["completion"].startswith(" ") and row["completion"].endswith(f"\n#### {row['answer']}")
    lm = load_builtin_dataset("posttrain/arith-lm", split="train[:1]")[0]
    assert lm["text"] == row["prompt"] + row["completion"]
    implicit = load_builtin_dataset("posttrain/arith-pref-implicit", split="test[:1]")[0]
    pref = load_builtin_dataset("posttrain/arith-pref", split="test[:1]")[0]
    assert implicit["chosen"] == pref["prompt"] + pref["chosen"] and implicit["rejected"].startswith(pref["prompt"])


def test_conversational_formats():
    row = load_builtin_dataset("posttrain/arith-pref", "conversational", split="test[:1]")[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    lm = load_builtin_dataset("posttrain/arith-lm", "conversational", split="test[:1]")[0]
    assert lm["messages"] == row["prompt"] + row["chosen"]


def test_solutions_are_right_and_rejections_wrong():
    for row in load_builtin_dataset("posttrain/arith-pref")["train"]:
        a, op, b, c = re.match(r" (\d+) ([-+*]) (\d+) = (\d+)\n", row["chosen"]).groups()
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
        assert int(a) <= 20 and int(b) <= 20
        assert extract_answer(row["chosen"]) == row["answer"] != extract_answer(row["rejected"])
        assert int(extract_answer(row["rejected"])) >= 0


def test_kto_labels_balanced_and_truthful():
    data = load_builtin_dataset("posttrain/arith-kto")["train"]
    assert 0.4 < sum(data["label"]) / len(data) < 0.6
    for row in data.select(range(200)):
        assert (extract_answer(row["completion"]) == row["answer"]) == row["label"]


def test_prompts_for_online_rl():
    row = load_builtin_dataset("posttrain/arith-prompts", "conversational", split="test[:1]")[0]
    assert row["prompt"][-1]["role"] == "user" and extract_answer(row["solution"]) == row["answer"]


@pytest.mark.parametrize("name", ["posttrain/arith-sft", "posttrain/arith-prompts"])
def test_train_and_test_are_disjoint(name):
    data = load_builtin_dataset(name)
    assert not set(data["train"]["prompt"]) & set(data["test"]["prompt"])
    assert len(set(data["train"]["prompt"])) == 2000


def test_each_stage_trains_on_its_own_questions():
    """SFT, preference and RL-prompt train splits hold disjoint questions; every data set shares one test split."""
    def questions(name, split):
        return {row["prompt"] for row in load_builtin_dataset(name, split=split)}

    sft, pref, prompts = (questions(n, "train") for n in
                          ("posttrain/arith-sft", "posttrain/arith-pref", "posttrain/arith-prompts"))
    test = questions("posttrain/arith-sft", "test")
    assert len(test) == 1000 and all(len(q) == 2000 for q in (sft, pref, prompts))
    assert not (sft & pref or sft & prompts or pref & prompts or (sft | pref | prompts) & test)
    assert questions("posttrain/arith-prompts", "test") == questions("posttrain/arith-pref", "test") == test
    kto = load_builtin_dataset("posttrain/arith-kto", split="train")["prompt"]
    assert set(kto) == pref  # unpaired preference data: the same questions as the pairs


def test_loading_is_deterministic():
    for config in ("standard", "conversational"):
        first = load_builtin_dataset("posttrain/arith-kto", config)
        second = load_builtin_dataset("posttrain/arith-kto", config)
        assert first["train"].to_list() == second["train"].to_list()
        assert first["test"].to_list() == second["test"].to_list()
    assert arith.generate_problems(50) == arith.generate_problems(50)


def test_split_selection():
    full = load_builtin_dataset("posttrain/arith-sft")
    assert load_builtin_dataset("posttrain/arith-sft", split="test").to_list() == full["test"].to_list()
    head = load_builtin_dataset("posttrain/arith-sft", split="train[:100]")
    assert len(head) == 100 and head.to_list() == full["train"].select(range(100)).to_list()
    middle = load_builtin_dataset("posttrain/arith-sft", split="test[10:20]")
    assert middle.to_list() == full["test"].select(range(10, 20)).to_list()
    assert len(load_builtin_dataset("posttrain/arith-sft", split="train[:10%]")) == 200
    assert len(load_builtin_dataset("posttrain/arith-sft", split="train[-5:]")) == 5


@pytest.mark.parametrize("kwargs,names", [
    (dict(name="posttrain/arith"), "posttrain/arith-sft"),
    (dict(name="posttrain/arith-sft", config="chat"), "conversational"),
    (dict(name="posttrain/arith-sft", split="validation"), "train"),
    (dict(name="posttrain/arith-sft", split="validation[:5]"), "test"),
])
def test_unknown_names_raise_clear_errors(kwargs, names):
    with pytest.raises(ValueError, match=names):
        load_builtin_dataset(**kwargs)


@pytest.mark.parametrize("text,expected", [
    ("7 + 5 = 12\n#### 12", "12"),
    ("#### 3\nthen #### 4", "4"),
    ("####12", "12"),
    ("#### -3", "-3"),
    ("#### 1,234", "1234"),
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{ 7 } and #### 8", "8"),  # the #### line wins
    ("2.5 is it\n#### 2.5", "2.5"),
    ("no answer here", None),
    ("#### ", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_offline_loads_turn_hub_kernels_off_unless_asked(cache, monkeypatch):
    """transformers enables Hub kernels by default and fetches them when a model first trains on a GPU: offline that
    fails (seen on an H200), so posttrain's loader turns them off when the Hub is offline; an explicit choice stays."""
    from huggingface_hub import constants

    from posttrain.models import loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert loading._resolve_dtype({})["use_kernels"] is False
    assert loading._resolve_dtype({"use_kernels": True})["use_kernels"] is True
    assert loading.load_pretrained_model("posttrain/tiny").use_kernels is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "use_kernels" not in loading._resolve_dtype({})  # online: transformers' own default
