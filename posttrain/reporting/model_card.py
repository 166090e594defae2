"""The model card (`README.md`) written next to saved weights: YAML front matter (base model, data set, tags)
that the Hugging Face Hub reads, then what the model is, how it was trained (method with its paper, base model,
data set, steps), its final metrics (last train and eval values, plus any added by the caller, e.g. a pipeline's
held-out answer accuracy) and how to load it.

Not here: deciding when to write (`report.py` and `PostTrainer.save_model`).
"""

from __future__ import annotations

from typing import Any

import yaml

from posttrain.reporting.summary import fmt

# method_name → (what it is, reference)
METHODS = {
    "SFT": ("supervised fine-tuning", None),
    "DPO": ("Direct Preference Optimization", "Rafailov et al., 2023, https://arxiv.org/abs/2305.18290"),
    "Reward": ("a Bradley–Terry reward model (one scalar score per sequence)",
               "Ouyang et al., 2022, https://arxiv.org/abs/2203.02155"),
    "KTO": ("Kahneman–Tversky Optimization", "Ethayarajh et al., 2024, https://arxiv.org/abs/2402.01306"),
    "ORPO": ("Odds Ratio Preference Optimization", "Hong et al., 2024, https://arxiv.org/abs/2403.07691"),
    "CPO": ("Contrastive Preference Optimization (and SimPO / AlphaPO losses)",
            "Xu et al., 2024, https://arxiv.org/abs/2401.08417"),
    "GRPO": ("Group Relative Policy Optimization", "Shao et al., 2024, https://arxiv.org/abs/2402.03300"),
    "RLOO": ("REINFORCE Leave-One-Out", "Ahmadian et al., 2024, https://arxiv.org/abs/2402.14740"),
    "PPO": ("Proximal Policy Optimization with a value model",
            "Schulman et al., 2017, https://arxiv.org/abs/1707.06347"),
    "OnlineDPO": ("online DPO (preference pairs sampled from the policy and ranked by rewards)",
                  "Guo et al., 2024, https://arxiv.org/abs/2402.04792"),
}


def render(*, method: str, model_name: str, base_model: str | None, dataset: str | None,
           final: dict[str, float], facts: dict[str, Any], is_classifier: bool = False,
           tags: list[str] | None = None, evaluation: list[str] | None = None) -> str:
    """The README.md text. `final` = metric → last value; `facts` = extra "how it was trained" lines; `tags` the
    Hub tags (default: posttrain and the method); `evaluation` markdown lines of a "Held-out evaluation" section
    (e.g. a pipeline's task, figures and the command that reproduces them)."""
    what, reference = METHODS.get(method, (method, None))
    tags = list(dict.fromkeys(tags or ["posttrain", method.lower()]))
    front: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    if base_model:
        front["base_model"] = base_model
    if dataset:
        front["datasets"] = [dataset]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {model_name}", ""]
    origin = f"`{base_model}`" if base_model else "a model"
    on = f" on `{dataset}`" if dataset else ""
    lines += [f"This model is {origin} trained{on} with {what} ({method}) using posttrain.", ""]
    lines += ["## Training", "", f"- method: {method} — {what}" + (f" ({reference})" if reference else "")]
    lines += [f"- base model: `{base_model or 'unknown'}`", f"- data set: `{dataset or 'unknown'}`"]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "The resolved training config is in `config.yaml`, every logged metric in `metrics.jsonl`, "
              "and the curves in `report.html`.", "", "## Final metrics", ""]
    if final:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in final.items()]
    else:
        lines.append("No metrics were logged.")
    if evaluation:
        lines += ["", "## Held-out evaluation", ""] + list(evaluation)
    lines += ["", "## Use", "", "```python"]
    if is_classifier:
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  "", f'model = AutoModelForSequenceClassification.from_pretrained("{model_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
                  'score = model(**tokenizer("a prompt and its completion", return_tensors="pt")).logits[0, 0]']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{model_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
                  'inputs = tokenizer("What is 2 + 3?", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))"]
    lines += ["```", ""]
    if not is_classifier:
        lines += [f'Or from the command line: `posttrain generate --model {model_name} --prompt "What is 2 + 3?"`',
                  ""]
    return "\n".join(lines)
