"""The state machine definition (``statemachine.asl.json``) with its ``${Name}`` placeholders filled in.

On AWS, CloudFormation fills them from template.yaml's ``DefinitionSubstitutions``; the tests and local tools
use :func:`render` with the same names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ...errors import ConfigError

ASL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "statemachine.asl.json")
PLACEHOLDERS = ("InitializeFunctionArn", "InferFunctionArn", "SummarizeFunctionArn", "ResultBucket", "MapResultsPrefix")
_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def placeholders(text: str | None = None) -> set[str]:
    """The ``${Name}`` placeholders used by the definition."""
    if text is None:
        with open(ASL_PATH) as fh:
            text = fh.read()
    return set(_VAR.findall(text))


def render(substitutions: dict[str, str]) -> str:
    """The definition JSON with every placeholder substituted; ConfigError names any that is missing."""
    with open(ASL_PATH) as fh:
        text = fh.read()
    missing = sorted(placeholders(text) - set(substitutions))
    if missing:
        raise ConfigError(f"{ASL_PATH}: no value for placeholder(s) {missing}")
    out = _VAR.sub(lambda m: str(substitutions[m.group(1)]), text)
    json.loads(out)
    return out


def load(substitutions: dict[str, str]) -> dict[str, Any]:
    """The rendered definition as a dict."""
    return json.loads(render(substitutions))
