"""Fallback used only if PyPcre (a C extension, shipped as an sdist) cannot be built on the device machine:
the stdlib `re` under the names GPTQModel / tokenicer use (compile, escape, split, Pattern, Flag.*).
GPTQModel uses these regexes only to match module names, so `re` semantics are enough for the benchmark."""
import re as _re
from enum import IntFlag
from re import *  # noqa: F401,F403
from re import Pattern, compile, escape, split  # noqa: F401


class Flag(IntFlag):
    CASELESS = int(_re.IGNORECASE)
    MULTILINE = int(_re.MULTILINE)
    DOTALL = int(_re.DOTALL)
    EXTENDED = int(_re.VERBOSE)
    NO_UTF = 0
    NO_UCP = 0
