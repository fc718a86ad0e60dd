"""Print pip constraints pinning every runtime dependency of pyproject.toml to its `>=` floor."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([^,;\s]+)", requirement.replace(" ", ""))
    if m is None:
        raise SystemExit(f"{requirement!r}: every runtime dependency needs a >= floor")
    print(f"{m.group(1)}=={m.group(2)}")
