"""A tiny randomly initialised Qwen2.5-VL and its processor, saved like a hub checkpoint.

Tests load it back through the real ``AutoProcessor`` / ``AutoModelForImageTextToText``
``from_pretrained`` path, so the captioning code that runs on Qwen/Qwen2.5-VL-*-Instruct runs
here on ~0.1M parameters with nothing downloaded.

The tokenizer is a byte-level BPE with no merges: its vocabulary is the 256 byte symbols plus
Qwen's special tokens, so any text encodes and any generated id decodes. The chat template is
a cut-down Qwen template that places ``<|vision_start|><|video_pad|><|vision_end|>`` for a
video; the processor expands the pad into one token per merged spacetime patch, as in Qwen.
The video processor's pixel budget is 56x56 per frame: 4x4 patches of 14 px, 2x2 tokens after
the merge.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>")

# Weights ~15x larger than a real init, so a random model's captions follow its input: at the
# usual 0.02 every video gets the same greedy tokens and a test could not tell whether the
# frames reached the model.
INIT = 0.3

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and processor from configs and save both to ``path``."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    path = Path(path)
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(SPECIAL[1:]))
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
    pixels = {"min_pixels": 56 * 56, "max_pixels": 56 * 56}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], initializer_range=INIT),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, initializer_range=INIT),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=INIT)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
