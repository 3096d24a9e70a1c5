"""Numbers on the command line: finite, in range, and refused with one line.

Every ``type=int`` / ``type=float`` flag of every verb is checked when it is parsed: counts
(workers, steps, images per class, ...) must be at least 1, fractional amounts (CPUs, learning
rates, ...) above 0, and NaN or infinity is never a number. The few flags where 0 means
something say so in their ``--help`` and are listed in ``ZERO_ALLOWED``.

``OneLineParser`` turns an argparse error into a ``UsageError``, which ``raydiff.cli.main``
prints as every other bad input: the single line ``raydiff: error: argument --flag: ...``
with exit code 2, instead of a usage block followed by the error.
"""

from __future__ import annotations

import argparse
import math

from raydiff.errors import RaydiffError

# flags (by dest) where 0 is allowed and means something; otherwise ints >= 1, floats > 0
ZERO_ALLOWED = {
    "seed",  # a seed is any non-negative integer
    "gpus_per_worker",  # 0 = CPU training with gloo
    "gpus_per_actor",  # 0 = CPU actors
    "max_failures",  # 0 = no retry
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "crop_padding",  # 0 = no random crop
    "guidance",  # 0 = plain conditional sampling
    "placement_timeout",  # 0 = refuse what the cluster cannot place now
}
MINIMUM = {"imbalance_ratio": 1}  # inclusive minimums of their own (n_max / n_min)


class UsageError(RaydiffError):
    """Arguments argparse refused."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _checked(convert, dest: str):
    is_int = convert is int
    if dest in MINIMUM or dest in ZERO_ALLOWED:
        minimum, exclusive = MINIMUM.get(dest, 0), False
    else:  # a count, or an amount that must be above 0
        minimum, exclusive = (1, False) if is_int else (0, True)

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if is_int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not is_int and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < minimum or (exclusive and value == minimum):
            bound = f"> {minimum}" if exclusive else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {bound}")
        return value

    parse.__name__ = "integer" if is_int else "number"
    return parse


def check_numbers(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every int/float flag of ``parser`` and its sub-commands the checks above."""
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.type in (int, float):
            action.type = _checked(action.type, action.dest)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_numbers(sub)
    return parser
