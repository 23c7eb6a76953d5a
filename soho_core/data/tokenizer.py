"""Word-piece tokenizers: a BERT tokenizer from a directory or hub name, or the
word-level vocabulary of the built-in synthetic world (no download needed)."""

from __future__ import annotations

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``name`` is "synthetic", a tokenizer directory, or a hub name (needs the hub cache)."""
    if name == "synthetic":
        from soho_core.data.synthetic import vocabulary

        words = SPECIAL_TOKENS + [w for w in vocabulary() if w not in SPECIAL_TOKENS]
        # transformers 5 ignores vocab_file= silently (every word becomes [UNK]); pass vocab=.
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    try:
        return BertTokenizerFast.from_pretrained(name)
    except OSError as err:
        raise ValueError(
            f"model.fusion.tokenizer={name!r}: no tokenizer there (not a directory with vocab.txt/"
            f"tokenizer.json, and not in the local hub cache); use 'synthetic' or a local directory"
        ) from err
