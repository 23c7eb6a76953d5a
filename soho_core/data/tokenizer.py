"""Word-piece tokenizers: a BERT tokenizer from a directory or hub name, or the
word-level vocabulary of the built-in synthetic world (no download needed)."""

from __future__ import annotations

import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``name`` is "synthetic", a tokenizer directory, or a hub name (needs the hub cache)."""
    if name == "synthetic":
        from soho_core.data.synthetic import vocabulary

        words = SPECIAL_TOKENS + [w for w in vocabulary() if w not in SPECIAL_TOKENS]
        # transformers 5 ignores vocab_file= silently (every word becomes [UNK]); pass vocab=.
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    def load(**options) -> PreTrainedTokenizerBase | None:
        try:
            tok = BertTokenizerFast.from_pretrained(name, **options)
        except OSError:
            return None
        # transformers 5 gives an empty word-piece vocabulary, not an error, when it finds no files.
        return tok if len(tok) > len(SPECIAL_TOKENS) else None

    # The local hub cache first: without a network, the hub's retries take a minute per file.
    tok = load(local_files_only=True) or load()
    if tok is None:
        raise ValueError(f"model.fusion.tokenizer={name!r}: no tokenizer there (not a directory with vocab.txt/"
                         f"tokenizer.json, and not in the local hub cache); use 'synthetic' or a local directory")
    return tok


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(texts), L) long, padded to the longest text and cut
    at ``max_len`` word pieces.

    The tokenizer returns lists and torch builds the two tensors: ``return_tensors="pt"`` walks
    every nested list in Python first, which costs more than the tokenizing itself (1.7 ms
    against 0.7 ms for a pre-training batch of 32 captions), in every loader worker.
    """
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len)
    return (torch.tensor(enc["input_ids"], dtype=torch.long).view(len(texts), -1),
            torch.tensor(enc["attention_mask"], dtype=torch.long).view(len(texts), -1))
