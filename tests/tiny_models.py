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


# ------------------------------------------------------------------------------------------ architecture matrix
# One tiny model per architecture family of tests/test_architectures.py (hidden 32, 2-3 blocks, vocabulary 128).
# Encoder-decoder and dual-tower models get stacks of different depths (3 and 2) so that a classifier which mixed
# the stacks up would give a wrong ``num_blocks``. Special token ids are kept inside the vocabulary.
_VOCAB = 128
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"vocab_size": _VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **_TOKENS}


def tiny_mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=8)).eval()


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_DECODER, tie_word_embeddings=True)).eval()


def tiny_qwen3() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_DECODER, head_dim=8)).eval()


def tiny_gemma2() -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_DECODER, head_dim=8, sliding_window=8)).eval()


def tiny_gemma3_text() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_DECODER, head_dim=8, sliding_window=8)).eval()


def tiny_phi3() -> torch.nn.Module:
    """Fused ``qkv_proj`` (grouped-query: 32 + 16 + 16 rows) and ``gate_up_proj``."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER)).eval()


def tiny_gpt_neox() -> torch.nn.Module:
    """Fused ``query_key_value`` (interleaved per head)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}
    return GPTNeoXForCausalLM(GPTNeoXConfig(**config)).eval()


def tiny_mixtral() -> torch.nn.Module:
    """4 experts, top-2; transformers 5 holds the experts as fused 3-D tensors and saves them per expert."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)).eval()


def tiny_t5() -> torch.nn.Module:
    """Encoder of 3 blocks, decoder of 2; ``shared`` tied to both embeddings and the LM head."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(vocab_size=_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, **_TOKENS)
    ).eval()


def tiny_bart() -> torch.nn.Module:
    """Encoder of 3 layers, decoder of 2."""
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(
        BartConfig(vocab_size=_VOCAB, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                   decoder_start_token_id=2, forced_eos_token_id=2, **_TOKENS)
    ).eval()


def tiny_roberta() -> torch.nn.Module:
    """Masked LM: ``lm_head.decoder`` tied to the word embeddings."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(
        RobertaConfig(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2)
    ).eval()


def tiny_deberta_v2() -> torch.nn.Module:
    """DeBERTa-v3 style: relative attention (``encoder.rel_embeddings``, ``encoder.LayerNorm`` outside the blocks)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(
        DebertaV2Config(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                        position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                        position_biased_input=False, norm_rel_ebd="layer_norm", num_labels=3)
    ).eval()


def tiny_clip() -> torch.nn.Module:
    """Dual tower: text encoder of 2 layers, vision encoder of 3."""
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": _VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, **_TOKENS}
    vision = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 2}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def tiny_whisper() -> torch.nn.Module:
    """Encoder of 3 layers (after two Conv1d), decoder of 2; ``proj_out`` tied to the decoder embeddings."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(
        WhisperConfig(vocab_size=_VOCAB, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                      max_source_positions=16, max_target_positions=32, decoder_start_token_id=1,
                      suppress_tokens=None, begin_suppress_tokens=None, **_TOKENS)
    ).eval()


def tiny_qwen2_vl() -> torch.nn.Module:
    """Vision tower of 3 blocks (``visual.blocks``, fused ``qkv``), language model of 2 layers."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {**_DECODER, "vocab_size": 160, "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 3, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    return Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=150, video_token_id=151,
                      vision_start_token_id=152, vision_end_token_id=153)
    ).eval()


#: Every architecture of the matrix (the four of :data:`FACTORIES` included), by name.
ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3_text,
    "phi3": tiny_phi3,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox,
    "t5": tiny_t5,
    "bart": tiny_bart,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "deberta_v2": tiny_deberta_v2,
    "vit": tiny_vit,
    "clip": tiny_clip,
    "whisper": tiny_whisper,
    "mixtral": tiny_mixtral,
    "qwen2_vl": tiny_qwen2_vl,
}


def architecture_inputs(name: str) -> dict[str, torch.Tensor]:
    """Deterministic inputs for a forward pass of ``ARCHITECTURES[name]()``."""
    generator = torch.Generator().manual_seed(123)

    def ids(length: int, high: int = _VOCAB) -> torch.Tensor:
        return torch.randint(3, high, (2, length), generator=generator)

    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    if name == "clip":
        return {"input_ids": ids(7), "pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    if name in ("t5", "bart"):
        return {"input_ids": ids(8), "decoder_input_ids": ids(5)}
    if name == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=generator), "decoder_input_ids": ids(5)}
    if name == "qwen2_vl":  # one 8x8 image: 4x4 patches of 4 pixels, merged 2x2 into 4 image tokens
        text = torch.randint(3, 140, (1, 8), generator=generator)
        input_ids = torch.cat([torch.tensor([[152, 150, 150, 150, 150, 153]]), text], dim=1)
        return {"input_ids": input_ids, "mm_token_type_ids": (input_ids == 150).int(),
                "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=generator),
                "image_grid_thw": torch.tensor([[1, 4, 4]])}
    return {"input_ids": ids(10)}


def architecture_outputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The outputs compared between two models of the matrix: logits, or CLIP's embeddings and similarity logits."""
    with torch.no_grad():
        out = model(**architecture_inputs(name))
    if name == "clip":
        return {k: out[k] for k in ("logits_per_image", "text_embeds", "image_embeds")}
    return {"logits": out.logits}
