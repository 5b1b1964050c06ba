"""The verified dependency set (constraints.txt) and the drift checker (scripts/check_releases.py)."""

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def load_checker():
    spec = importlib.util.spec_from_file_location("check_releases", ROOT / "scripts" / "check_releases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = load_checker()


def test_constraints_satisfy_every_bound_of_pyproject():
    pins = checker.read_pins((ROOT / "constraints.txt").read_text())
    requirements = [Requirement(r) for r in checker.direct_requirements(("all", "liger"))]
    missing = [r.name for r in requirements if checker.canonical(r.name) not in pins and r.name != "torch"]
    assert not missing, f"constraints.txt pins no version of {missing}: regenerate it (--write-constraints)"
    outside = [f"{r.name}=={pins[checker.canonical(r.name)]} vs {r.specifier}" for r in requirements
               if r.name != "torch" and pins[checker.canonical(r.name)] not in r.specifier]
    assert not outside, f"constraints.txt pins versions that pyproject.toml does not allow: {outside}"
    assert "torch" not in pins and "llmkd" not in pins  # torch is chosen by setup.sh (CPU or CUDA build)


def test_requirement_rewriting():
    assert checker.read_pins("# c\nFoo_Bar==1.2  # why\n-e .\nbaz>=2\n") == {"foo-bar": "1.2"}
    assert checker.without_upper_bounds(["transformers>=5.23,<5.25", "x[y]>=1", "z<2"]) == [
        "transformers>=5.23", "x[y]>=1", "z"]
    assert checker.lowest_pins(["transformers>=5.23,<5.25", "torch>=2.4", "pillow>=10", "trl>=1.16,<1.17"]) == [
        "transformers==5.23", "torch>=2.4", "pillow>=10", "trl==1.16"]
    requirements = checker.direct_requirements()
    assert any(r.startswith("deepspeed") for r in requirements)  # nested extras (all -> deepspeed) expanded
    assert not any(r.startswith("llmkd") for r in requirements)
    assert checker.differences({"a": "1", "b": "2", "torch": "9"}, {"a": "1", "b": "1", "c": "3"}) == [
        ("b", "1", "2"), ("c", "3", "-")]


def test_setup_installs_the_verified_set_unless_told_otherwise():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and 'LLMKD_CONSTRAINTS:-}" = "none"' in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup.sh" in ci and "LLMKD_CONSTRAINTS" not in ci  # CI tests the verified set


@pytest.mark.parametrize("package", ["transformers", "trl"])
def test_packages_whose_internals_llmkd_uses_have_an_upper_bound(package):
    requirement = next(Requirement(r) for r in checker.direct_requirements() if Requirement(r).name == package)
    assert any(spec.operator == "<" for spec in requirement.specifier), requirement
