"""compose files as docker-compose reads them with nothing set in the environment."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_DEFAULTED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}")


def load_compose(path: Path) -> dict[str, Any]:
    """The file with every `${VAR:-default}` replaced by its default (`${VAR:?message}` stays)."""
    return dict(yaml.safe_load(_DEFAULTED.sub(lambda m: m.group(1), Path(path).read_text())))
