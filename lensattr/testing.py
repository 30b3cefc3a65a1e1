"""Tiny random-weight models for tests, tutorials and smoke runs (seconds on a CPU, no downloads).

The tokenizer is byte-level (256 byte tokens + ChatML special tokens) with SmolLM2's chat template,
so every code path that the real model takes (chat rendering, end-of-turn, padding) is exercised.
"""

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():  # noqa: ANN201
    """A byte-level ChatML tokenizer of 259 tokens, built in memory.

    Examples:
        >>> tok = tiny_tokenizer()
        >>> len(tok), tok.eos_token
        (259, '<|im_end|>')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_hf_model(
    n_layers: int = 4, d_model: int = 32, seed: int = 0, attn_implementation: str = "eager"
):  # noqa: ANN201
    """A random-weight Llama with ``n_layers`` blocks of width ``d_model`` (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=258,
    )
    cfg._attn_implementation = attn_implementation
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()
