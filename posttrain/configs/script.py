"""Model and dataset options that sit beside a trainer config on the command line (TRL's ModelConfig and
ScriptArguments, same names).

Not here: training options (`configs/base.py` and one module per trainer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from posttrain.errors import UserError, did_you_mean


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id, local directory, GGUF file "
                                           "(x.gguf), or a built-in model: posttrain/tiny, posttrain/tiny-4m, "
                                           "posttrain/tiny-15m, posttrain/smollm2-135m-instruct (make smollm2)."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str | None = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 "
                              "or auto.", "choices": ["auto", "float32", "bfloat16", "float16"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager, "
                                            "flash_attention_2."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt (default: "
                                                  "all linear layers)."})
    lora_target_parameters: list[str] | None = field(default=None, metadata={"help": "Parameters to adapt directly "
                                                     "(PEFT >= 0.17 target_parameters, e.g. MoE expert weights)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    merge_adapters: bool = field(default=False, metadata={"help": "With use_peft: also save the adapters merged "
                                 "into full weights, in output_dir/merged."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (bitsandbytes, GPU only)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit base weights (bitsandbytes, GPU only)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantisation type.",
                                                              "choices": ["fp4", "nf4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "4-bit: also quantise the quantisation "
                                       "constants (double quantisation)."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "4-bit: dtype the packed weights "
                                               "are stored in (e.g. bfloat16 for FSDP)."})

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise UserError("load_in_8bit and load_in_4bit are both set; choose one.")
        four_bit = [name for name, default in (("bnb_4bit_quant_type", "nf4"), ("use_bnb_nested_quant", False),
                                               ("bnb_4bit_quant_storage", None)) if getattr(self, name) != default]
        if four_bit and not self.load_in_4bit:
            raise UserError(f"--{four_bit[0]} only applies to 4-bit loading; add --load_in_4bit True or drop it.")

    def peft_config(self):
        """A `peft.LoraConfig` when `use_peft`, else None (and a LoRA option set without use_peft is an error: it
        would silently run a full fine-tune)."""
        if not self.use_peft:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            lora = [name for name in defaults if name.startswith(("lora_", "use_rslora", "use_dora"))
                    and getattr(self, name) != defaults[name]]
            if lora:
                raise UserError(f"--{lora[0]} is set but use_peft is off, so it would have no effect (a full "
                                "fine-tune would run); add --use_peft True, or drop the LoRA options.")
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules or "all-linear",
                          modules_to_save=self.lora_modules_to_save, task_type=self.lora_task_type,
                          use_rslora=self.use_rslora, use_dora=self.use_dora,
                          **({"target_parameters": self.lora_target_parameters}
                             if self.lora_target_parameters is not None else {}))

    def init_kwargs(self) -> dict:
        """`from_pretrained` keyword arguments implied by these options."""
        kwargs = {"revision": self.model_revision}  # trust_remote_code is a training option (as in TRL 1.16)
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.load_in_8bit or self.load_in_4bit:
            kwargs["quantization_config"] = self.quantization_config()
        return kwargs

    def quantization_config(self):
        """A `transformers.BitsAndBytesConfig` for load_in_4bit / load_in_8bit (4-bit computes in `dtype`), else
        None; refused with a one-line error where bitsandbytes cannot run."""
        if not (self.load_in_8bit or self.load_in_4bit):
            return None
        from posttrain.models.loading import quantization_config

        return quantization_config(self.load_in_4bit, quant_type=self.bnb_4bit_quant_type,
                                   compute_dtype=self.dtype if self.dtype not in (None, "auto") else None,
                                   double_quant=self.use_bnb_nested_quant, quant_storage=self.bnb_4bit_quant_storage)


@dataclass
class ScriptArguments:
    """Which data to train on. `datasets` (YAML only) mixes several: a list of DatasetConfig mappings
    {path, name, data_dir, data_files, split, columns, fraction} whose rows are concatenated (`data.loading.
    load_mixture`); the YAML's `test_split_size` cuts an evaluation split from the mixture."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, local file (.json/.jsonl/.csv/"
                                     ".parquet), local directory, or a built-in set such as posttrain/arith-sft."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (subset) name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (if eval is enabled)."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading."})
    datasets: list[dict] | None = field(default=None, metadata={"help": "Mixture of datasets (YAML only)."})
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "Multi-process (DDP): do not broadcast the "
                                      "model's boolean buffers (causal masks), which some models cannot sync."})


@dataclass
class DatasetConfig:
    """One dataset of a mixture, as `datasets.load_dataset` takes it (TRL's DatasetConfig). `fraction`: this
    dataset's target share of the mixture (set for all datasets or none; see `scripts.get_dataset`)."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None


@dataclass
class DatasetMixtureConfig:
    """A mixture of datasets for TRL-style scripts (`get_dataset(mixture)`); in YAML, a `datasets:` list of
    DatasetConfig mappings, `streaming:` and `test_split_size:` (a fraction or a row count for the test split)."""

    datasets: list[DatasetConfig] = field(default_factory=list, metadata={"help": "Datasets of the mixture (YAML)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the datasets instead of downloading them."})
    test_split_size: float | None = field(default=None, metadata={"help": "Size of a test split cut from the "
                                          "mixture (datasets.train_test_split's test_size); none when unset."})

    def __post_init__(self):
        self.datasets = [dataset_config(d) for d in self.datasets or []]


def dataset_config(entry) -> DatasetConfig:
    """A DatasetConfig from one entry of a YAML `datasets:` list (or the DatasetConfig itself); a mapping without
    `path` or with a key DatasetConfig lacks is a one-line error."""
    if isinstance(entry, DatasetConfig):
        return entry
    if isinstance(entry, str):
        entry = {"path": entry}
    keys = [f.name for f in dataclasses.fields(DatasetConfig)]
    if not isinstance(entry, dict) or "path" not in entry:
        raise UserError(f"Each entry of `datasets` is a mapping with a 'path' (and optionally {', '.join(keys[1:])}); "
                        f"got {entry!r}.")
    for key in entry:
        if key not in keys:
            raise UserError(f"Unknown key {key!r} in the `datasets` entry for {entry['path']!r}"
                            f"{did_you_mean(str(key), keys)} (a dataset takes {', '.join(keys)}).")
    return DatasetConfig(**entry)
