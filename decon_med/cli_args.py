"""Argument types and the sub-command parser of the ``decon-med`` command line.

Every number a command line takes goes through a type here, so a value no command can use (``--max-steps -1``,
``--n 0``, ``--batches 0``) stops at parsing with argparse's one ``error:`` line and exit status 2. The sub-command
parser reads options and ``key=value`` words in any order, so ``decon-med pretrain CFG out_dir=x --resume
train.lr=0.3`` is the same command as with the option last.

Example:
    >>> positive_int("8")
    8
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an integer >= 1, got '0'
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: Largest seed numpy's generators accept (seeds are 32-bit unsigned integers).
MAX_SEED = 2**32 - 1

#: Line added to the help of every sub-command that takes ``key=value`` words.
ANY_ORDER = "Options and key=value words may come in any order."


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` reading an integer in ``[low, high]`` (no upper bound when ``high`` is ``None``).

    Example:
        >>> int_range(1, 10)("11")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: must be an integer in [1, 10], got '11'
    """
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    parse.__name__ = f"integer {bound}"
    return parse


#: An integer >= 1: counts of images, steps, iterations, batch sizes.
positive_int = int_range(1)
#: A random seed: an integer in [0, 2**32 - 1].
seed_int = int_range(0, MAX_SEED)


class SubcommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose positionals and options may be intermixed (``parse_known_intermixed_args``).

    Used for the sub-commands (``add_subparsers(parser_class=SubcommandParser)``): a ``key=value`` word after an
    option is still an override, where plain argparse would stop collecting the ``nargs='*'`` positional at the
    first option and refuse the words after it. Its help ends with :data:`ANY_ORDER` when it takes overrides.
    """

    _intermixing = False

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if not action.option_strings and action.nargs == argparse.ZERO_OR_MORE:
            action.required = False  # zero words are fine; else a missing config is reported with it
        return action

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # the inner passes of parse_known_intermixed_args (Python < 3.12)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def format_help(self) -> str:
        text = super().format_help()
        if any(action.dest == "overrides" for action in self._get_positional_actions()):
            text = text.rstrip("\n") + "\n\n" + ANY_ORDER + "\n"
        return text
