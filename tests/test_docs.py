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


PREFIXES = "cost|data|distill|engine|eval|kto|model|pairs|perf|policy|probe|reward|rewards|rollout|train"
METRIC = rf"(?:{PREFIXES})/[a-z0-9_<>]+"


def documented_metrics() -> set[str]:
    """The metric names docs/reference/metrics.md lists (`<k>`: any value)."""
    import re

    text = (docs.ROOT / "docs/reference/metrics.md").read_text()
    return set(re.findall(rf"`({METRIC})`", text))


def is_documented(key: str, names: set[str]) -> bool:
    import re

    return any(re.fullmatch(re.escape(n).replace("<k\\>", ".+").replace("<k>", ".+"), key) for n in names)


def test_the_metrics_reference_names_every_metric_the_code_writes_and_no_other():
    """Every metric name written out in the stages' code is on the metrics page, and every name on the page is
    in the code (an f-string's {k} is the page's <k>)."""
    import re

    code = "\n".join(p.read_text() for p in (docs.ROOT / "stages").rglob("*.py"))
    written = {m.replace("{k}", "<k>") for m in re.findall(rf"\"((?:{PREFIXES})/[a-z0-9_{{}}]+)", code)}
    names = documented_metrics()
    assert not {w for w in written if not is_documented(w, names)}, "metrics the page does not name"
    assert not {n for n in names if n not in written}, "names on the page that no code writes"
