"""The README's set-up is what CI runs: .ci/run holds the README's install line and test command verbatim,
the `test` extra installs everything the suite needs, and the wheel ships every config file."""

import fnmatch
import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def readme_block(section: str) -> list[str]:
    """The commands of the first ```bash block under the README heading `section`, comments stripped."""
    text = (REPO / "README.md").read_text()
    start = re.search(rf"^## {re.escape(section)}\s*$", text, re.M)
    assert start, f"README has no '## {section}' section"
    block = re.search(r"^```bash\n(.*?)^```", text[start.end() :], re.M | re.S)
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readmes_install_line_and_test_command_verbatim():
    install = readme_block("Install")[0]
    (test,) = [line for line in readme_block("Quickstart") if "pytest" in line]
    assert install == 'pip install -c constraints-cpu.txt -e ".[test]"' and test == "python -m pytest -q -n auto --dist worksteal"
    ci = ci_commands()
    assert install in ci and ci[-1] == test, ".ci/run must run the README's install line, then end with its test command"
    assert ci.index(install) < ci.index(test)
    # Nothing else gets installed into the venv, so CI cannot pass on packages a newcomer lacks.
    installs = [line for line in ci if re.search(r"\bpip\b.*\binstall\b", line)]
    assert installs == ["python -m pip install -q --upgrade pip", install], installs
    assert "DIFFCTL_EDM_DETECTOR" not in "\n".join(ci)


def test_the_test_extra_is_installed():
    """Every requirement of the `test` extra is present in a version it allows: tests that need one
    (diffusers, the plugins, the EDM detector) then run instead of skipping or failing on import."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["bench"]) <= set(extras["test"]) and set(extras["slurm"]) <= set(extras["test"])
    missing = []
    for spec in map(Requirement, extras["test"]):
        try:
            version = importlib.metadata.version(spec.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not spec.specifier.contains(version, prereleases=True):
            missing.append(f"{spec} (installed: {version})")
    assert not missing, f"install the test extra (pip install -e \".[test]\"); missing: {', '.join(missing)}"


def test_wheel_package_data_covers_every_config_file():
    """setuptools' package-data globs do not cross '/', so each depth of conf/ needs its own pattern."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffctl.conf"]
    files = [p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")]
    assert any(f.count("/") == 2 for f in files)  # conf/hydra/launcher/
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert not uncovered, uncovered


def test_wheel_lists_every_package_of_the_source_tree():
    """[tool.setuptools] packages is an explicit list: a subpackage missing from it is missing from the
    wheel, which an editable install of the checkout hides (its import hook finds the source tree)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "diffctl").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
