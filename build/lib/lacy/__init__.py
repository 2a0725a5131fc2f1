"""lacy: pretrain small language models that delegate facts to a bigger model with <CALL>."""

__version__ = "0.1.0"
