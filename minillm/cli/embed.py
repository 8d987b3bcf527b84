"""python -m minillm embed (not built yet: see the open issues)."""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="arguments, once this command exists")


def run(args):
    print("minillm embed: not available yet. What exists today: the concept files under minillm/ "
          "and their tests (python -m pytest).")
    return 2
