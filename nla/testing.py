"""Tiny, seeded, locally built models and tokenizers for tests and toys (no hub, no downloads)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER_CANDIDATES = ["㈠", "㈡", "㈢"]  # single tokens here, absent from the builtin corpus


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on the builtin corpus, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nla.corpus import BUILTIN, iter_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in iter_documents(BUILTIN, max_docs=200)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token=None)
    fast.add_tokens(MARKER_CANDIDATES)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(out_dir: str | Path, d_model: int = 64, n_layers: int = 4, seed: int = 0,
                    initializer_range: float = 0.02) -> Path:
    """Write a tiny llama + the tiny tokenizer as an HF folder usable as `--model DIR`.

    `initializer_range` 0.2 makes a tiny model's output depend on its prompt at all (at HF's
    0.02 it barely does), which learnable toys that read an injected vector need.
    """
    from nla.models import tiny_llama

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer()
    model = tiny_llama(len(tok), d_model=d_model, n_layers=n_layers, seed=seed, initializer_range=initializer_range,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
