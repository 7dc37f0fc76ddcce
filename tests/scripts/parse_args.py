"""Parses TrainingArguments from the command line and prints what the launcher tests check, as JSON.

Knows nothing of anon_hf. Used as a script, as a module (``-m parse_args``) and, through a throwaway
``console_scripts`` entry point, as a console command.
"""

import json
import sys

from transformers import HfArgumentParser, TrainingArguments


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    print(json.dumps({"optim": args.optim.value, "optim_args": args.optim_args, "argv0": sys.argv[0]}))


if __name__ == "__main__":
    main()
