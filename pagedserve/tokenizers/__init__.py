"""Tokenizers built by pagedserve from published tokenizer files (no checkpoint code run)."""
