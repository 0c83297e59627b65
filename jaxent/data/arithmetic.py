"""The generated arithmetic task (``ab+cd+ef=`` → ``S1;S2$``) and its tokenizer."""
from jaxent.data._arithmetic import (
    ALPHABET,
    EOS,
    PAD,
    SPLITS,
    ArithmeticTask,
    CarryDecoy,
    CharTokenizer,
    DecoyLabels,
    make_decoy,
    operands_of_prompt,
)

__all__ = ["ALPHABET", "EOS", "PAD", "SPLITS", "ArithmeticTask", "CarryDecoy", "CharTokenizer",
           "DecoyLabels", "make_decoy", "operands_of_prompt"]
