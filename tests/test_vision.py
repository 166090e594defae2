"""Vision-language models: the built-in tiny VLMs (LLaVA, Idefics3, Qwen2-VL, Qwen2.5-VL) and Qwen-VL checkpoints
loaded by path without torchvision, TRL's image data formats, truncation and collation with images, SFT / DPO /
GRPO / RLOO steps, the vision-tower freeze and LoRA on the language model, log-probs with images against the plain
forward, and first-step parity with TRL 1.16 (float64)."""

import copy
import io
import json
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from posttrain.data import vision as dv
from posttrain.errors import UserError
from posttrain.models import loading
from posttrain.models import vision as mv

FAMILIES = ["posttrain/tiny-llava", "posttrain/tiny-idefics3", "posttrain/tiny-qwen2vl", "posttrain/tiny-qwen2_5vl"]
QWEN = ("posttrain/tiny-qwen2vl", "posttrain/tiny-qwen2_5vl")  # M-RoPE: image_grid_thw, mm_token_type_ids, `generate`
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
COMMON = dict(max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no", logging_steps=1,
              disable_tqdm=True)


def _processor(name):
    return mv.load_processor(loading.resolve_model_path(name))


def _image(i=0, size=(32, 32)):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _rows(n=8, kind="prompt_completion"):
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        other = list(COLOURS)[(i + 1) % 3]
        row = {"images": [Image.new("RGB", (32, 32), COLOURS[colour])],
               "prompt": [{"role": "user", "content": "What colour is this?" + " please" * (i % 2)}]}
        if kind == "prompt_completion":
            row["completion"] = [{"role": "assistant", "content": colour}]
        elif kind == "preference":
            row["chosen"] = [{"role": "assistant", "content": colour}]
            row["rejected"] = [{"role": "assistant", "content": other + " maybe"}]
        else:
            row["answer"] = colour
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _sft_args(**kw):
    from posttrain.configs.sft import SFTConfig

    return SFTConfig(output_dir=kw.pop("output_dir", "/tmp/posttrain-test-vision"), **{**COMMON, **kw})


# ---- models --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_builtin_vlm_loads_with_auto_classes(name):
    from transformers import AutoModelForImageTextToText

    model = loading.load_pretrained_model(name)
    path = loading.resolve_model_path(name)
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    processor = _processor(name)
    assert dv.is_vision_processor(processor) and mv.is_vision_model(model)
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision needed
    batch = processor(text=[processor.image_token + "hi"], images=[[_image()]], return_tensors="pt")
    assert model(**batch).logits.shape[-1] == 4160
    assert mv.is_vision_config(path) and not mv.is_vision_config(loading.resolve_model_path("posttrain/tiny"))


@pytest.mark.parametrize("name", QWEN)
def test_qwen_vl_checkpoint_loads_by_path_without_torchvision(tmp_path, name):
    """A Qwen2-VL / Qwen2.5-VL directory as the Hub ships it (preprocessor_config.json naming the processor class,
    chat_template.json) and as `save_pretrained` of model + processor writes it: `AutoProcessor` stops at the video
    processor (torchvision); `load_processor` assembles the image-only one, a trainer takes the path, and its
    `save_model` writes a directory that loads again."""
    from posttrain.trainers.sft import SFTTrainer

    model, processor = loading.load_pretrained_model(name), _processor(name)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")  # the image-only processor saves its parts
    hub = tmp_path / "hub"
    model.save_pretrained(hub)
    processor.tokenizer.save_pretrained(hub)
    (hub / "chat_template.jinja").unlink(missing_ok=True)
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    config = json.loads((tmp_path / "ckpt" / "preprocessor_config.json").read_text())
    (hub / "preprocessor_config.json").write_text(json.dumps({
        **config, "min_pixels": 3136, "max_pixels": 3136, "processor_class": type(processor).__mro__[1].__name__}))
    inputs = dict(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[[_image()]], return_tensors="pt")
    expected = processor(**inputs)
    for path in (tmp_path / "ckpt", hub):
        loaded = mv.load_processor(str(path))
        assert type(loaded).__name__ == type(processor).__name__ and loaded.chat_template == processor.chat_template
        assert type(loaded.image_processor).__name__.endswith("Pil")
        assert all(torch.equal(v, loaded(**inputs)[k]) for k, v in expected.items())
    trainer = SFTTrainer(str(hub), args=_sft_args(output_dir=str(tmp_path / "out")), train_dataset=_rows(4))
    trainer.train()
    trainer.save_model()
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    assert type(mv.load_processor(str(tmp_path / "out"))).__name__ == type(processor).__name__
    assert type(loading.load_pretrained_model(str(tmp_path / "out"))) is type(model)


def test_unknown_builtin_names_the_vlms():
    with pytest.raises(UserError, match="tiny-llava"):
        loading.resolve_model_path("posttrain/tiny-nope")


# ---- data ----------------------------------------------------------------------------------------------------------
def test_image_sources_and_bad_images(tmp_path):
    image = _image()
    path = tmp_path / "a.png"
    image.save(path)
    raw = path.read_bytes()
    for value in (image, str(path), raw, {"bytes": raw, "path": None}, {"bytes": None, "path": str(path)}):
        assert np.array_equal(np.asarray(dv.load_image(value, "row 0")), np.asarray(image))
    with pytest.raises(UserError, match="Row 3.*does not exist"):
        dv.load_image(str(tmp_path / "missing.png"), "Row 3")
    with pytest.raises(UserError, match="Row 4.*cannot be decoded"):
        dv.load_image(b"not an image", "Row 4")
    with pytest.raises(UserError, match="Row 5.*PIL image"):
        dv.load_image(3.5, "Row 5")


def test_bad_image_in_dataset_names_the_row(tmp_path):
    processor = _processor("posttrain/tiny-llava")
    data = datasets.Dataset.from_list([{"images": [str(tmp_path / "a.png")], "prompt": "<image>x", "completion": "y"}])
    _image().save(tmp_path / "a.png")
    dv.prepare_vision_sft_dataset(data, processor, _sft_args())  # fine
    bad = datasets.Dataset.from_list([{"image": b"junk", "prompt": "<image>x", "completion": "y"}])
    with pytest.raises(UserError, match="Row 0 of the train dataset, image 0: the image cannot be decoded"):
        dv.prepare_vision_sft_dataset(bad, processor, _sft_args())
    two = datasets.Dataset.from_list([{"images": [_image(), _image(1)], "prompt": "<image>x", "completion": "y"}])
    with pytest.raises(UserError, match=r"Row 0 .*2 image\(s\) but 1 image placeholder"):
        dv.prepare_vision_sft_dataset(two, processor, _sft_args())


def test_string_messages_get_image_blocks_before_the_first_user_text():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    out = dv.with_image_blocks(messages, 2)
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]
    assert out[3]["content"] == [{"type": "text", "text": "q2"}] and dv.count_image_blocks(out) == 2
    blocks = [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image"}]}]
    assert dv.with_image_blocks(blocks, 1) == blocks  # already placed: unchanged


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_masks_train_completions_and_never_image_tokens(name):
    processor = _processor(name)
    tokens = dv.ImageTokenizer(processor)
    row = _rows(1).select_columns(["images", "prompt", "completion"])
    out = dv.prepare_vision_sft_dataset(row, processor, _sft_args())[0]
    trained = [i for i, m in zip(out["input_ids"], out["completion_mask"]) if m]
    assert processor.tokenizer.decode(trained) == "red<|im_end|>\n"
    assert sum(i in tokens.image_ids for i in out["input_ids"]) >= 4  # expanded image tokens are there
    messages = datasets.Dataset.from_list([{"image": _image(), "messages": [
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]}])
    full = dv.prepare_vision_sft_dataset(messages, processor, _sft_args())[0]
    assert not any(m for i, m in zip(full["input_ids"], full["completion_mask"]) if i in tokens.image_ids)
    assistant = dv.prepare_vision_sft_dataset(messages, processor, _sft_args(assistant_only_loss=True))[0]
    text = processor.tokenizer.decode([i for i, m in zip(assistant["input_ids"], assistant["completion_mask"]) if m])
    assert text == "red<|im_end|>\nyes<|im_end|>\n"
    assert assistant["input_ids"] == full["input_ids"]


def test_truncation_never_cuts_inside_an_image():
    processor = _processor("posttrain/tiny-llava")
    data = datasets.Dataset.from_list([
        {"images": [_image()], "prompt": "a b c d e f g h <image> what", "completion": " red"},  # image late
        {"images": [_image()], "prompt": "<image> what", "completion": " red and a long tail " * 4}])
    ids = dv.prepare_vision_sft_dataset(data, processor, _sft_args())["input_ids"]
    image_end = max(i for i, t in enumerate(ids[0]) if t == 4096)
    out = dv.prepare_vision_sft_dataset(data, processor, _sft_args(max_length=image_end))
    assert len(out) == 1 and len(out[0]["input_ids"]) == image_end  # row 0 dropped (counted), row 1 cut after image
    with pytest.raises(UserError, match="would cut an image"):
        dv.prepare_vision_sft_dataset(data, processor, _sft_args(max_length=5))


@pytest.mark.parametrize("name", FAMILIES)
def test_collators_carry_the_image_tensors(name):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.data.collators import DataCollatorForLanguageModeling, DataCollatorForPreference

    processor = _processor(name)
    sft = dv.prepare_vision_sft_dataset(_rows(2), processor, _sft_args())
    collate = dv.DataCollatorWithImages(DataCollatorForLanguageModeling(0), processor)
    batch = collate([sft[0], sft[1]])
    pref = dv.prepare_vision_preference_dataset(_rows(2, "preference"), processor,
                                                DPOConfig(output_dir="/tmp/x", report_to="none"))
    pair = dv.DataCollatorWithImages(DataCollatorForPreference(0), processor, repeat=2)([pref[0], pref[1]])
    assert batch["input_ids"].shape[0] == 2 and pair["input_ids"].shape[0] == 4
    if name not in QWEN:  # Qwen2-VL's pixel_values are patches (image_grid_thw says how many)
        assert batch["pixel_values"].shape[0] == 2 and pair["pixel_values"].shape[0] == 4
    assert ("pixel_attention_mask" in batch) == (name == "posttrain/tiny-idefics3")
    assert ("image_grid_thw" in batch) == ("mm_token_type_ids" in batch) == (name in QWEN)
    chosen, rejected = pair["pixel_values"].chunk(2)
    assert torch.equal(chosen, rejected)  # rejected rows see the same images


# ---- models with images ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_logps_with_images_match_the_plain_forward(name):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.data.collators import DataCollatorForPreference
    from posttrain.models.logprobs import completion_logps

    processor = _processor(name)
    model = loading.load_pretrained_model(name, dtype=torch.float64)
    pref = dv.prepare_vision_preference_dataset(_rows(2, "preference"), processor,
                                                DPOConfig(output_dir="/tmp/x", report_to="none"))
    batch = dv.DataCollatorWithImages(DataCollatorForPreference(0), processor, repeat=2)([pref[0], pref[1]])
    batch["pixel_values"] = batch["pixel_values"].double()
    out = completion_logps(model, batch, shared_prefix=1 << 30)  # asks for the shared prefix: must not apply
    from posttrain.models.logprobs import batch_labels, forward_target_rows
    from posttrain.models.vision import image_inputs

    hidden = forward_target_rows(model, batch["input_ids"], batch_labels(batch), batch["attention_mask"],
                                 **image_inputs(batch))[0]
    assert hidden is not None  # the LM head runs on the trained rows only, as for text models
    logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits[:, :-1]
    labels = batch_labels(batch)[:, 1:]
    plain = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    plain = (plain * (labels != -100)).sum(-1)
    assert torch.allclose(out["logps"].sum(-1).double(), plain, atol=1e-6)
    other = dict(batch, pixel_values=torch.full_like(batch["pixel_values"], 0.5))
    assert not torch.allclose(completion_logps(model, other)["logps"].sum(-1).double(), plain, atol=1e-4)


# ---- trainers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_trains_with_a_frozen_vision_tower(tmp_path, name):
    from posttrain.trainers.sft import SFTTrainer

    trainer = SFTTrainer(name, args=_sft_args(output_dir=str(tmp_path), freeze_vision_tower=True, max_steps=2,
                                              learning_rate=1e-2), train_dataset=_rows(), eval_dataset=_rows(2))
    vision = {k: v.clone() for part in mv.vision_tower(trainer.model) for k, v in part.named_parameters()}
    before = trainer.model.get_output_embeddings().weight.clone()
    trainer.train()
    after = {k: v for part in mv.vision_tower(trainer.model) for k, v in part.named_parameters()}
    assert all(torch.equal(vision[k], after[k]) for k in vision)
    assert not torch.equal(before, trainer.model.get_output_embeddings().weight)
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    assert np.isfinite(trainer.evaluate()["eval_loss"])


def test_lora_stays_on_the_language_model(tmp_path):
    from peft import LoraConfig

    from posttrain.trainers.sft import SFTTrainer

    trainer = SFTTrainer("posttrain/tiny-llava", args=_sft_args(output_dir=str(tmp_path)), train_dataset=_rows(),
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    lora = [n for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and not any("vision_tower" in n or "projector" in n for n in lora)
    trainer.train()


def test_freeze_vision_tower_refused_for_text_models(tmp_path):
    from posttrain.trainers.sft import SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(UserError, match="freeze_vision_tower=True needs a vision-language model"):
        SFTTrainer("posttrain/tiny", args=_sft_args(output_dir=str(tmp_path), freeze_vision_tower=True),
                   train_dataset=data)


def test_images_need_a_vlm_and_a_trainer_that_takes_them(tmp_path):
    from posttrain.configs.kto import KTOConfig
    from posttrain.trainers.kto import KTOTrainer
    from posttrain.trainers.sft import SFTTrainer

    with pytest.raises(UserError, match="processing class is a tokenizer"):
        SFTTrainer("posttrain/tiny", args=_sft_args(output_dir=str(tmp_path)), train_dataset=_rows())
    with pytest.raises(UserError, match="KTOTrainer does not take vision-language models"):
        KTOTrainer("posttrain/tiny-llava", args=KTOConfig(output_dir=str(tmp_path), report_to="none"),
                   train_dataset=_rows(4, "preference"))


@pytest.mark.parametrize("name", FAMILIES)
def test_dpo_steps_with_images(tmp_path, name):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.trainers.dpo import DPOTrainer

    trainer = DPOTrainer(name, args=DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], **COMMON),
                         train_dataset=_rows(4, "preference"))
    trainer.train()
    log = trainer.state.log_history[0]
    assert np.isfinite(log["loss"]) and "rewards/margins" in log
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["pixel_values"] is not None  # the reference's log-probs depend on the row's images
    blank = dict(batch, pixel_values=torch.full_like(batch["pixel_values"], 0.5))  # (Idefics3 skips all-0 images)
    assert not torch.allclose(trainer._reference_logps(trainer.model, batch),
                              trainer._reference_logps(trainer.model, blank), atol=1e-5)


def test_dpo_precomputed_reference_sees_the_images(tmp_path):
    from posttrain.configs.dpo import DPOConfig
    from posttrain.trainers.dpo import DPOTrainer

    _, policy, ref = _parity_models("posttrain/tiny-llava")
    logs = []
    for precompute in (False, True):
        trainer = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=_rows(2, "preference"),
                             processing_class=_processor("posttrain/tiny-llava"),
                             args=DPOConfig(output_dir=str(tmp_path / str(precompute)), bf16=False,
                                            precompute_ref_log_probs=precompute, **COMMON))
        logs.append(_first(trainer))
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)
    assert logs[1]["rewards/margins"] == pytest.approx(logs[0]["rewards/margins"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("trainer_name,name", [("grpo", "posttrain/tiny-llava"), ("rloo", "posttrain/tiny-llava"),
                                               *(("grpo", name) for name in QWEN)])
def test_online_rollouts_see_images_and_rewards_receive_them(tmp_path, trainer_name, name):
    from posttrain.configs.grpo import GRPOConfig
    from posttrain.configs.rloo import RLOOConfig
    from posttrain.trainers.grpo import GRPOTrainer
    from posttrain.trainers.rloo import RLOOTrainer

    seen = []

    def reward(completions, images, answer, **kwargs):
        seen.extend(images)
        return [float(len(c[0]["content"])) for c in completions]

    trainer_cls, config_cls = (GRPOTrainer, GRPOConfig) if trainer_name == "grpo" else (RLOOTrainer, RLOOConfig)
    args = config_cls(output_dir=str(tmp_path), num_generations=4, max_completion_length=6, beta=0.1,
                      log_completions=True, **COMMON)
    trainer = trainer_cls(name, reward_funcs=reward, args=args, train_dataset=_rows(4, "prompt"))
    trainer.train()
    assert len(seen) == 4 and all(isinstance(im, list) and len(im) == 1 for im in seen)
    assert np.isfinite(trainer.state.log_history[0]["loss"])
    table = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert table[0]["image"].startswith("data:image/png;base64,")  # the report's completions table shows it
    if trainer_name == "grpo" and name == "posttrain/tiny-llava":
        from posttrain.reporting.report import write_report

        write_report(trainer)
        assert '<img alt="image" src="data:image/png;base64,' in open(tmp_path / "report.html").read()


def test_shapes_task():
    from posttrain.data.shapes import colour_reward, shapes_dataset

    train, test = shapes_dataset(6), shapes_dataset(6, "test", kind="prompt")
    assert train[0]["images"][0].size == (32, 32)
    assert train[0]["completion"][0]["content"] in ("red", "green", "blue", "yellow", "purple", "orange")
    assert train[0]["images"][0].tobytes() != test[0]["images"][0].tobytes()
    assert colour_reward([[{"content": "Red."}], [{"content": "blue"}]], ["red", "green"]) == [1.0, 0.0]


# ---- parity with TRL 1.16 ----------------------------------------------------------------------------------------
def _parity_models(name):
    from transformers import AutoModelForImageTextToText

    path = loading.resolve_model_path(name)
    torch.manual_seed(1)
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return _processor(name), policy, ref


def _parity_data():
    words = ["red", "blue", "green", "a square", "two circles", "yellow"]
    return datasets.Dataset.from_list([
        {"images": [_image(i, (32, 24 + 4 * i))],
         "prompt": [{"role": "user", "content": "What is shown?" + " please" * (i % 3)}],
         "completion": [{"role": "assistant", "content": words[i % 6]}],
         "chosen": [{"role": "assistant", "content": words[i % 6]}],
         "rejected": [{"role": "assistant", "content": words[(i + 1) % 6] + " maybe"}]} for i in range(8)])


PARITY = dict(max_steps=1, per_device_train_batch_size=8, learning_rate=1e-9, logging_steps=1, report_to="none",
              save_strategy="no", seed=0, bf16=False, disable_tqdm=True)


def _first(trainer):
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_first_step_matches_trl(tmp_path, name):
    trl = pytest.importorskip("trl")
    from posttrain.configs.sft import SFTConfig
    from posttrain.trainers.sft import SFTTrainer

    processor, policy, _ = _parity_models(name)
    data = _parity_data().remove_columns(["chosen", "rejected"])
    ours = _first(SFTTrainer(copy.deepcopy(policy), processing_class=processor, train_dataset=data,
                             args=SFTConfig(output_dir=str(tmp_path / "ours"), **PARITY)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first(trl.SFTTrainer(copy.deepcopy(policy), processing_class=processor, train_dataset=data,
                                       args=trl.SFTConfig(output_dir=str(tmp_path / "trl"),
                                                          gradient_checkpointing=False, **PARITY)))
    for key in ("loss", "entropy", "num_tokens", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key


DPO_FAST = ["sigmoid"]
DPO_SLOW = ["ipo", "apo_zero", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_down",
            "discopop", "sft", "sigmoid_norm"]


@pytest.mark.parametrize("name,loss_type", [("posttrain/tiny-llava", lt) for lt in DPO_FAST]
                         + [pytest.param(n, lt, marks=pytest.mark.slow) for lt in DPO_FAST
                            for n in ("posttrain/tiny-idefics3", *QWEN)]
                         + [pytest.param("posttrain/tiny-llava", lt, marks=pytest.mark.slow) for lt in DPO_SLOW])
def test_dpo_first_step_matches_trl(tmp_path, name, loss_type):
    trl = pytest.importorskip("trl")
    from posttrain.configs.dpo import DPOConfig
    from posttrain.trainers.dpo import DPOTrainer

    processor, policy, ref = _parity_models(name)
    data = _parity_data().remove_columns(["completion"])
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    ours = _first(DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), processing_class=processor,
                             train_dataset=data, args=DPOConfig(output_dir=str(tmp_path / "ours"), loss_type=loss_type,
                                                                **extra, **PARITY)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _first(trl.DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), processing_class=processor,
                                       train_dataset=data,
                                       args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type],
                                                          gradient_checkpointing=False, **extra, **PARITY)))
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_bytes_column_round_trip(tmp_path):
    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    data = datasets.Dataset.from_list([{"image": buffer.getvalue(), "prompt": "<image> colour?", "completion": " red"}])
    out = dv.prepare_vision_sft_dataset(data, _processor("posttrain/tiny-llava"), _sft_args())
    assert len(out[0]["images"]) == 1 and out[0]["images"][0].size == (32, 32)


def test_trl_older_recipe_own_collator_and_skip_prepare(tmp_path):
    """TRL's older VLM script: its own collate_fn calls the processor, skip_prepare_dataset, the tokenizer as
    processing_class; its pixel values reach the model."""
    from posttrain.trainers.sft import SFTTrainer

    processor = _processor("posttrain/tiny-llava")
    model = loading.load_pretrained_model("posttrain/tiny-llava")
    data = datasets.Dataset.from_list([{"images": [_image(i)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]} for i in range(4)])
    calls = []

    def collate_fn(examples):
        texts = [processor.apply_chat_template(e["messages"], tokenize=False) for e in examples]
        batch = processor(text=texts, images=[e["images"] for e in examples], return_tensors="pt", padding=True)
        batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == 4096, -100)
        calls.append(batch["pixel_values"].shape)
        return batch

    seen = []
    model.model.vision_tower.register_forward_hook(lambda *a: seen.append(1))
    trainer = SFTTrainer(model=model, data_collator=collate_fn, train_dataset=data,
                         processing_class=processor.tokenizer,
                         args=_sft_args(output_dir=str(tmp_path), remove_unused_columns=False,
                                        dataset_kwargs={"skip_prepare_dataset": True}))
    trainer.train()
    assert calls and seen and np.isfinite(trainer.state.log_history[0]["loss"])


def test_cli_trains_on_image_files_and_generates_with_an_image(tmp_path, capsys, monkeypatch):
    from posttrain import cli

    monkeypatch.chdir(tmp_path)
    with open("train.jsonl", "w") as f:
        for i, colour in enumerate(["red", "blue", "green", "red"]):
            Image.new("RGB", (32, 32), COLOURS[colour]).save(f"img{i}.png")
            f.write(json.dumps({"images": [f"img{i}.png"], "prompt": [{"role": "user", "content": "Colour?"}],
                                "completion": [{"role": "assistant", "content": colour}]}) + "\n")
    assert cli.main(["sft", "--model_name_or_path", "posttrain/tiny-llava", "--dataset_name", "train.jsonl",
                     "--output_dir", "out", "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--report_to", "none", "--freeze_vision_tower", "true"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", "out", "--image", "img0.png", "--prompt", "Colour?",
                     "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["generate", "--model", "posttrain/tiny", "--image", "img0.png", "--prompt", "x"]) == 2
    assert "text model" in capsys.readouterr().err


def test_image_rollouts_never_sample_image_tokens():
    from posttrain.rollout.vision import generate_with_images

    model = loading.load_pretrained_model("posttrain/tiny-llava")
    processor = _processor("posttrain/tiny-llava")
    tokens = dv.image_tokenizer(processor)
    ids = dv.prompt_ids_with_images(tokens, [{"role": "user", "content": "hi"}], [_image()], "x")
    inputs = {"input_ids": torch.tensor([ids]), **tokens.pixel_inputs([[_image()]])}
    with torch.no_grad():  # make <image> by far the likeliest first token
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        model.get_output_embeddings().weight[4096] = 50 * hidden / hidden.norm() ** 2
    plain = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert plain[0, -1] == 4096  # what an unguarded rollout would sample
    rollout = generate_with_images(model, processor, [ids], [[_image()]], 2, 4, {"do_sample": False})
    assert (rollout.completion_ids == 4096).sum() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_image_rollouts_decode_in_the_static_loop_as_generate(name, monkeypatch):
    """LLaVA and Idefics3 prompts prefill once with their images, then decode text-only in `rollout/hf.py`'s
    static-cache loop: greedy completions equal transformers' `generate` run per row with the row's images. Qwen2-VL
    (positions that depend on the image tokens) keeps `generate`."""
    from posttrain.rollout import vision as rv

    model = loading.load_pretrained_model(name, dtype=torch.float64).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # random-init tiny models repeat one token greedily: make the next token depend on context
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    processor = _processor(name)
    tokens = dv.image_tokenizer(processor)
    images = [[_image(0)], [_image(1, (40, 28))], [_image(2)]]
    prompts = [[{"role": "user", "content": "What colour?"}], [{"role": "user", "content": "Say what colour it is."}],
               [{"role": "user", "content": "Colour?"}]]
    ids = [dv.prompt_ids_with_images(tokens, p, im, "t") for p, im in zip(prompts, images)]
    counts, options = [2, 1, 3], {"do_sample": False, "repetition_penalty": 1.3}
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    looped = rv.generate_with_images(model, processor, ids, images, counts, 8, options)
    assert bool(calls) == (name in QWEN)  # only Qwen2-VL / Qwen2.5-VL went through `generate`
    monkeypatch.setattr(rv, "static_decode_supported", lambda model: False)
    reference = rv.generate_with_images(model, processor, ids, images, counts, 8, options)  # `generate`, per row
    assert torch.equal(looped.prompt_ids, reference.prompt_ids)
    assert torch.equal(looped.completion_mask, reference.completion_mask)
    assert torch.equal(looped.completion_ids, reference.completion_ids)
    assert len(set(looped.completion_ids[looped.completion_mask.bool()].tolist())) > 3  # not one repeated token
    assert not set(looped.completion_ids.flatten().tolist()) & tokens.image_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_training_logps_of_a_rollout_equal_the_sampling_logps(name):
    """Left-padded image prompts of different lengths: the log-probs of the training pass (positions from the
    attention mask, or Qwen2-VL's own M-RoPE positions) equal those `generate` sampled with."""
    from posttrain.models.logprobs import completion_logps, positions_from_mask
    from posttrain.rollout.hf import left_pad
    from posttrain.rollout.vision import to_model

    model = loading.load_pretrained_model(name, dtype=torch.float64).eval()
    processor = _processor(name)
    tokens = dv.image_tokenizer(processor)
    images = [[_image(0)], [_image(1, (40, 28))]]
    prompts = [[{"role": "user", "content": "What colour?"}], [{"role": "user", "content": "Say what colour it is."}]]
    ids, mask = left_pad([dv.prompt_ids_with_images(tokens, p, im, "t") for p, im in zip(prompts, images)], 0)
    pixels = to_model(tokens.pixel_inputs(images), model)
    out = model.generate(input_ids=ids, attention_mask=mask, **pixels, **tokens.token_types(ids), max_new_tokens=4,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
    completion = out.sequences[:, ids.shape[1]:]
    sampled = torch.stack([torch.log_softmax(s.double(), -1).gather(-1, completion[:, i:i + 1])[:, 0]
                           for i, s in enumerate(out.scores)], 1)
    full = torch.cat([ids, completion], 1)
    attention = torch.cat([mask, torch.ones_like(completion)], 1)
    labels = full.masked_fill(torch.arange(full.shape[1]) < ids.shape[1], -100)
    batch = {"input_ids": full, "attention_mask": attention, "position_ids": positions_from_mask(attention),
             "labels": labels, **pixels, **tokens.token_types(full)}
    trained = completion_logps(model, batch, shared_prefix=ids.shape[1])["logps"]
    assert torch.allclose(trained.double(), sampled, atol=1e-5)


# ---- TRL's documented VLM scripts, import swapped -----------------------------------------------------------------
def test_trl_documented_vlm_scripts_run_with_the_import_swapped(tmp_path):
    """TRL 1.16's docs train a VLM as `SFTTrainer(model="<vlm id>", args=SFTConfig(max_length=None),
    train_dataset=<llava-instruct-mix: images + messages>)` and `GRPOTrainer(model="<vlm id>", reward_funcs=…,
    train_dataset=<prompt + image>)`; the same lines with `from posttrain import …` and a local tiny VLM."""
    from posttrain import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": colour}]}] for colour in COLOURS] * 3
    mix = datasets.Dataset.from_dict({"images": [[Image.new("RGB", (32, 32), COLOURS[m[1]["content"][0]["text"]])]
                                                 for m in messages], "messages": messages})
    trainer = SFTTrainer(model="posttrain/tiny-llava", args=SFTConfig(output_dir=str(tmp_path / "sft"),
                                                                      max_length=None, **COMMON),
                         train_dataset=mix)
    trainer.train()
    assert trainer.state.global_step == 1 and np.isfinite(trainer.state.log_history[0]["loss"])

    def colour_reward(completions, answer, **kwargs):
        return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]

    prompts = _rows(4, kind="prompt_only").rename_column("images", "image")
    prompts = prompts.map(lambda r: {"image": r["image"][0]})  # TRL's single-image column form
    trainer = GRPOTrainer(model="posttrain/tiny-llava", reward_funcs=colour_reward,
                          args=GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2,
                                          max_completion_length=4, **COMMON),
                          train_dataset=prompts)
    trainer.train()
    assert trainer.state.global_step == 1
