"""python3 -m vattn eval ...: the Python subcommands of the vattn command line."""

import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("eval",):
        print("usage: python3 -m vattn eval --model DIR [options]  (eval --help for the options)",
              file=sys.stderr)
        return 2
    from .eval import main as eval_main

    return eval_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
