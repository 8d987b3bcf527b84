"""minillm: the building blocks of large language models, forward and backward, by hand.

One file per concept (tokenizer, embeddings, word2vec, attention, ffn, norm, backprop, optim,
quantization, sampling, lora), models composed from them (gpt, bert), and the
machinery on top (data, train, checkpoint, the command line in __main__).
"""

__version__ = "0.1.0"
