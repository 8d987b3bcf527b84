"""minillm: the building blocks of large language models, forward and backward, by hand.

One file per concept (tokenizer, embeddings, word2vec, attention, ffn, norm, backprop, optim,
quantization, sampling, lora), models composed from them (gpt, bert), and the
machinery on top (data, train, checkpoint, the command line in __main__).
"""

__version__ = "0.1.0"

import os as _os

# NumPy's OpenBLAS keeps its idle threads spinning for 2^28 cycles (about 0.1 s) after
# every matmul, on the very cores that minillm's own threads (backend.parallel_for) want
# for the softmax, GELU and LayerNorm passes between matmuls. 2^4 cycles lets them sleep
# at once (measured: the fused attention of a 4 x 192 GPT step 58 -> 34 ms with two
# threads, the matmuls unchanged). OpenBLAS reads this when NumPy first loads it, so it
# is set here, before anything imports NumPy; a value already in the environment wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
