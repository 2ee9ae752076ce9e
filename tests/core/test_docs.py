"""The documentation stays true to the code it describes."""
from __future__ import annotations

import re

from renderq.jobs.lifecycle import TRANSITIONS
from tests.support import ROOT


def test_every_setting_is_documented():
    names = set(re.findall(r'read\("([A-Z0-9_]+)"', (ROOT / "config" / "settings.py").read_text()))
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert names and not {name for name in names if "`%s`" % name not in documented}


def test_every_transition_is_in_the_lifecycle_table():
    table = (ROOT / "docs" / "lifecycle.md").read_text()
    for name in TRANSITIONS:
        assert re.search(r"^\| [^|]*\b%s\b" % name, table, re.MULTILINE), name


def test_the_readme_and_docs_link_only_inside_the_repository():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), "%s links to missing %s" % (page.name, target)
