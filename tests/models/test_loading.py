"""Loading options: optional GPU extras fail clearly on CPU and work on a GPU when present."""

import importlib.util

import pytest
import torch

from lit_rlhf.models import Actor, LoadSettings, LoraSettings, position_ids_from_mask
from lit_rlhf.models.loading import model_kwargs

HAS_CUDA = torch.cuda.is_available()


def test_position_ids_follow_the_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_extra_names_it():
    with pytest.raises(ImportError, match=r"lit_rlhf\[gpu\]"):
        model_kwargs(LoadSettings(attn_implementation="flash_attention_2"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_four_bit_without_the_extra_names_it():
    with pytest.raises(ImportError, match=r"lit_rlhf\[gpu\]"):
        model_kwargs(LoadSettings(load_in_4bit=True, lora=LoraSettings(rank=4)))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error path")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn installed")
def test_flash_attention_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        model_kwargs(LoadSettings(attn_implementation="flash_attention_2"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the gpu extra (flash-attn)")
def test_flash_attention_matches_sdpa_on_gpu(tiny_paths, tokenizer):
    seq = torch.tensor([[1, 5, 4, 6, 11, 7, 8, 2]], device="cuda")
    mask = torch.ones_like(seq)
    sdpa = Actor.from_pretrained(tiny_paths["policy"], tokenizer, LoadSettings(dtype="bfloat16")).cuda()
    flash = Actor.from_pretrained(
        tiny_paths["policy"], tokenizer, LoadSettings(dtype="bfloat16", attn_implementation="flash_attention_2")
    ).cuda()
    torch.testing.assert_close(flash(seq, mask, 4), sdpa(seq, mask, 4), atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs the gpu extra (bitsandbytes)")
def test_four_bit_actor_with_lora_on_gpu(tiny_paths, tokenizer):
    from lit_rlhf.models import LoraSettings

    settings = LoadSettings(dtype="bfloat16", load_in_4bit=True, lora=LoraSettings(rank=4))
    actor = Actor.from_pretrained(tiny_paths["policy"], tokenizer, settings)
    reference = Actor.from_pretrained(tiny_paths["policy"], tokenizer, LoadSettings(dtype="bfloat16")).cuda()
    seq = torch.tensor([[1, 5, 4, 6, 11, 7, 8, 2]], device="cuda")
    mask = torch.ones_like(seq)
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 4-bit weights approximate the bf16 model: log-probs agree loosely
    with actor.adapter_disabled():
        torch.testing.assert_close(actor(seq, mask, 4), reference(seq, mask, 4), atol=0.5, rtol=0)
