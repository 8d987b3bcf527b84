"""One module per command of ``python -m minillm``: each defines add_arguments(parser) and run(args)."""
