"""Tiny real transformers models built from config classes, and "fine-tuned" variants of them."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, num_labels=3)
    ).eval()


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    ).eval()


def tiny_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, num_labels=3)
    ).eval()


FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "vit": tiny_vit,
}


def finetuned_copy(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A "fine-tuned" copy: every floating-point parameter moved by seeded Gaussian noise (ties preserved)."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return out


def example_inputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Deterministic inputs for a forward pass of a tiny model."""
    generator = torch.Generator().manual_seed(123)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(0, 128, (2, 10), generator=generator)}


def logits(name: str, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs(name, model)).logits
