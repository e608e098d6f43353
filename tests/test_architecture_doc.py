"""docs/architecture.md stays true: what it names exists, and every package of dvgt/ is on its map."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "architecture.md"
TOP_FOLDERS = "|".join(path.name for path in REPO.iterdir() if path.is_dir() and not path.name.startswith("."))
PATH = re.compile(rf"(?<![\w/.<-])(?:{TOP_FOLDERS})/(?:[\w./-]*[\w/])?")  # charts/dvgt/files/catalog.yaml, dvgt/sdk/


def named_paths(text: str) -> set[str]:
    """The repository paths the page names (under a top-level folder of the repository)."""
    return set(PATH.findall(text))


def test_every_path_and_module_the_page_names_exists():
    text = PAGE.read_text()
    paths = named_paths(text)
    assert {"dvgt/train/loop.py", "charts/dvgt/files/catalog.yaml", "dvgt/sdk/"} <= paths  # the scan finds them
    missing = sorted(path for path in paths if not (REPO / path).exists())
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"
    modules = set(re.findall(r"(?<![\w/.\"-])dvgt(?:\.\w+)+", text))  # "dvgt.plan" in quotes: a Helm template
    assert "dvgt.train.launch" in modules
    absent = sorted(
        m for m in modules if not any((REPO / m.replace(".", "/")).with_suffix(s).exists() for s in (".py", ""))
    )
    assert absent == [], f"docs/architecture.md names modules that do not exist: {absent}"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert [link for link in links if not (PAGE.parent / link).exists()] == []


def test_every_top_level_package_and_module_of_dvgt_is_on_the_map():
    paths = named_paths(PAGE.read_text())
    entries = [p.name for p in (REPO / "dvgt").iterdir() if (p / "__init__.py").exists()]
    entries += [p.name for p in (REPO / "dvgt").glob("*.py") if not p.name.startswith("__")]
    unnamed = sorted(e for e in entries if not any(path.rstrip("/") == f"dvgt/{e}" for path in paths))
    assert unnamed == [], f"add these to the package map of docs/architecture.md: {unnamed}"
