"""A tiny Llama-style model and a character-level tokenizer, built locally (no hub download).

Used by the tests and by the embedded default. The tokenizer maps each character to one token,
except that digits pair up left to right ("47" is one token, "123" is "12" "3"), plus one token
for each of a few phrases every answer or feedback of ours repeats (as a BPE vocabulary would
have merged them): the model pays per token, on a CPU, and "\\boxed{" alone was 7 of an
attempt's 17 tokens. A two-digit number as one token also makes reading a number from the
question one lookup instead of two, which the embedded default's search task relies on
(rise_ray/demo/default.yaml). Phrases are matched in message text only, and messages are
separated by special tokens, so tokenizing a conversation prefix and then the whole conversation
always agree (no drift).
Head sizes (hidden_size / num_heads) must be ones vLLM's CPU attention takes: 32, 64, 80, ... (not 16).
"""

from __future__ import annotations

import json
import os
import string

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
# Digits pair up left to right ("1234" -> "12" "34", "123" -> "12" "3").
DIGIT_PAIRS = [f"{i:02d}" for i in range(100)]
VOCAB = SPECIAL_TOKENS + list(CHARS) + DIGIT_PAIRS
# The answer format and the two feedback texts (envs.base.INCORRECT_FEEDBACK, demo/default.yaml).
PHRASES = ["\\boxed{", "Incorrect.", "The answer is incorrect.", " Please try again."]


def build_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable ASCII character, digit pair and
    phrase, and a chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in PHRASES])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"  # decoder-only generation pads on the left
    return hf


def build_tiny_model(
    out_dir: str,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> str:
    """Write a randomly initialised tiny Llama + tokenizer to `out_dir` (HF format, safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "rise_tiny.json"), "w") as f:
        json.dump({"built_by": "rise_ray.demo.tiny", "seed": seed}, f)
    return out_dir
