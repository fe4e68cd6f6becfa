"""The documentation site: its generated pages match the code they come from (the params schema, the
command), and it builds with --strict (a broken link, an anchor that is gone or a page missing from the nav
fails), as `make docs` builds it."""

import os
import subprocess
import sys
from pathlib import Path

from flows import docs


def test_generated_pages_match_the_code():
    for page, make in docs.PAGES.items():
        assert (docs.ROOT / page).read_text() == make(), f"{page} is out of date: python -m flows.docs rewrites it"


def test_the_params_reference_has_every_param():
    from stages.core import config

    text = (docs.ROOT / "docs/reference/params.md").read_text()
    for field in ("beta", "label_smoothing"):
        assert f"| `{field}` |" in text
    assert all(f"\n## {name}\n" in text for name in config.Params.model_fields)
    assert all(f"\n### align.{m}\n" in text for m in config.METHOD_CONFIGS)


def test_the_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    out = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=docs.ROOT,
                         capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "params" / "index.html").exists()
