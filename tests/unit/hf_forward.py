"""Plain Hugging Face forwards of the tiny checkpoints: the reference the verl-worker tests compare with."""

import torch


def hf_response_logits(path, batch) -> torch.Tensor:
    """[B, R, V] float32 logits predicting each response token of a padded verl batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    P = batch["prompts"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    return logits[:, P - 1:-1].float()
