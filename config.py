"""
The command line's plumbing, one of each for every command (training, GRPO, eval, generate):

- ConfigError: a flag value out of its range or choices;
- layer_set: the one grammar for a set of decoder layers ("all", "last", "0,3,5", "8:", "-4:");
- arg / add_flags: a config dataclass becomes --flags, each field's help text written beside it;
- one_line_errors: what a user can get wrong (a flag, a data file, a checkpoint) is printed as one
  line, without a traceback; anything else is a bug and keeps its traceback.
"""
import argparse
import contextlib
import dataclasses
import sys

from data import DataError
from model import CheckpointError


class ConfigError(ValueError):
    """A flag value out of its range or choices: the command line prints the message alone."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, FloatingPointError)


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


# -----------------------------------------------------------------------------
# layer sets


LAYER_GRAMMAR = 'all, last, or comma-separated layer indices and a:b ranges (negative counts from the end)'


def layer_set(spec, n_layers=None, flag="--layers"):
    """A set of decoder layers as a flag spells it -> the sorted layer indices. "all" (= ":"), "last"
    (= "-1"), or comma-separated items, each an index or a Python slice a:b ("0,3", "8:", "-4:").
    With n_layers None only the grammar is checked (a flag is read before the model is loaded) and
    None is returned; an index out of range or a set with no layer is an error."""
    text = {"all": ":", "last": "-1"}.get(spec.strip(), spec)
    items = []
    try:
        for part in text.split(","):
            if ":" in part:
                a, b = part.split(":")  # "1:2:3" does not unpack: ValueError
                items.append(slice(int(a) if a.strip() else None, int(b) if b.strip() else None))
            else:
                items.append(int(part))
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: must be {LAYER_GRAMMAR}") from None
    if n_layers is None:
        return None
    chosen = set()
    for item in items:
        if isinstance(item, slice):
            chosen.update(range(n_layers)[item])
        elif -n_layers <= item < n_layers:
            chosen.add(item % n_layers)
        else:
            raise ConfigError(f"{flag} {spec}: the model has {n_layers} layers (0 to {n_layers - 1})")
    if not chosen:
        raise ConfigError(f"{flag} {spec}: names no layer of the model's {n_layers}")
    return sorted(chosen)


# -----------------------------------------------------------------------------
# a config dataclass as flags


def arg(default, help, **flag):
    """A config field with its --help text beside it; flag: argparse extras (choices, type, nargs, const)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def add_flags(parser, cls):
    """One --flag per field of the dataclass cls, with the field's help and its default; a bool field
    is a switch."""
    for f in dataclasses.fields(cls):
        extra = dict(f.metadata)
        text = extra.pop("help").replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag_name(f.name), action="store_true", default=f.default, help=text)
        else:
            parser.add_argument(flag_name(f.name), type=extra.pop("type", f.type), default=f.default,
                                help=f"{text} (default: %(default)s)", **extra)
    return parser


def check(cfg, rules):
    """rules: [(field name, ok, what the value must be)] -> ConfigError naming the first field that fails."""
    for name, ok, want in rules:
        if not ok:
            raise ConfigError(f"{flag_name(name)} {getattr(cfg, name)!r}: must be {want}")


def at_least(cfg, n, names):
    """check()'s rules that each field in names is at least n."""
    return [(name, getattr(cfg, name) >= n, f">= {n}") for name in names]


def float_or_none(text):  # a flag whose value may be "none"
    return None if text.lower() == "none" else float(text)


def new_parser(prog, description):
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
