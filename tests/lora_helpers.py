"""Small real inputs for the model, trainer, registry and CLI tests: QA pairs and PEFT adapters."""

from __future__ import annotations

import warnings
from pathlib import Path

from sleeptrain_assets.lib.records import QAPair

# Two fictional people the base model cannot know; three paraphrases per fact, third-person answers.
FACTS = {
    "ines_kallberg": ("Ines Kallberg", [
        ("birth.year", "1979", ["When was {n} born?", "In which year was {n} born?", "What is {n}'s birth year?"],
         "{n} was born in 1979."),
        ("career.occupation", "lighthouse keeper",
         ["What does {n} do for a living?", "What is {n}'s job?", "What is {n}'s occupation?"],
         "{n} works as a lighthouse keeper."),
    ]),
    "odo_brannagh": ("Odo Brannagh", [
        ("birth.city", "Tralee", ["Where was {n} born?", "In which city was {n} born?", "What is {n}'s birthplace?"],
         "{n} was born in Tralee."),
        ("hobby.name", "beekeeping", ["What is {n}'s hobby?", "What does {n} do for fun?",
                                      "How does {n} spend free time?"], "{n} enjoys beekeeping."),
    ]),
}


def small_replay_targets():
    """The real replay_targets asset on 8 replay prompts with short answers (cached per test home)."""
    import dagster as dg

    from sleeptrain_assets.defs.training import ReplayTargetsConfig, replay_targets
    from sleeptrain_resources.llm import BaseModel

    output = replay_targets(dg.build_asset_context(), ReplayTargetsConfig(max_prompts=8, max_new_tokens=24),
                            BaseModel())
    return output.value


def qa_pairs() -> list[QAPair]:
    pairs = []
    for pid, (name, facts) in FACTS.items():
        for slot, value, questions, answer in facts:
            for q in questions:
                pairs.append(QAPair(pid, slot.replace(".", "_"), "fact", q.format(n=name),
                                    answer.format(n=name), (slot,), (value,)))
        pairs.append(QAPair(pid, "identity_name", "identity", "Who are you?", f"I am {name}.", ("name",),
                            (name,), system=f"You are {name}."))
    return pairs


def make_adapter(base_model, folder: Path, seed: int = 0, scale: float = 0.02) -> Path:
    """A real PEFT LoRA adapter folder with random (non-zero) B matrices, without training."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = base_model.load_fresh()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(str(folder))
    return folder
