"""python -m minillm train (the GPT issue wires the real model in)."""


def add_arguments(parser):
    parser.add_argument("model", nargs="?", default="gpt", help="which model to train")


def run(args):
    print("minillm train: not yet. The GPT model is still being built; what exists today are the "
          "concept files under minillm/ (backend, backprop, ...) and their tests: python -m pytest")
    return 2
