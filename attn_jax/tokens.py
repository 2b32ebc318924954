"""The special token ids every tokenizer, model and loss of attn_jax agrees on.

    pad = 0   padding; never produced by a tokenizer's `encode`, skipped by `decode`, no loss
    bos = 1   beginning of sequence; the decoders' first input (teacher forcing, generation)
    eos = 2   end of sequence; appended by the input pipeline, decoding stops at it
    unk = 3   any piece a vocabulary does not hold

Real tokens start at `NUM_SPECIAL`. This module imports nothing: `data`, `models` and `train`
all read the ids from here without importing each other.
"""

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
NUM_SPECIAL = 4
SPECIAL_TOKENS = ('<pad>', '<s>', '</s>', '<unk>')  # Display names, in id order.
