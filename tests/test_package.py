import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dormant.config import add_config_args, config_from_args, field


def test_import_is_light():
    code = (
        "import sys, dormant, dormant.llm, dormant.llm.predictors, dormant.offload, dormant.snn;"
        "bad = [m for m in ('torch', 'numpy', 'transformers', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cli_parses_and_refuses_without_torch():
    """Parsing and checking flags imports no torch: a refusal is immediate."""
    code = (
        "import sys; from dormant.cli import main;"
        "rc = main(['calibrate', '--sparsity', 'nan']);"
        "assert rc == 2 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_dormant_does_not_import_torch():
    subprocess.run([sys.executable, "-c", "import sys, dormant; assert 'torch' not in sys.modules"], check=True)


@dataclass
class _Cfg:
    name: str = field("a", help="a name")
    n: int = field(3, help="count")
    limit: int | None = field(None, help="optional")
    flag: bool = field(False, help="switch")
    xs: list[float] = field(default_factory=lambda: [0.5], help="values")


def test_config_flags_round_trip():
    p = argparse.ArgumentParser()
    add_config_args(p, _Cfg)
    assert config_from_args(_Cfg, p.parse_args([])) == _Cfg()
    cfg = config_from_args(_Cfg, p.parse_args(["--name", "b", "--n", "4", "--limit", "7", "--flag", "--xs", "0.1,0.2"]))
    assert cfg == _Cfg("b", 4, 7, True, [0.1, 0.2])
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "x"])


def test_cli_lists_commands(capsys):
    from dormant.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("calibrate", "eval", "sweep", "demo"):
        assert cmd in out


def test_public_apis_export_verbs_not_internals():
    import dormant.llm
    import dormant.snn

    for name in ("load_model", "perplexity", "calibrate", "sparsify_", "sparsified", "measure_sparsity",
                 "enable_sparse_decode_", "Thresholds", "ActivationStats", "ActivationTrace"):
        assert name in dormant.llm.__all__ and callable(getattr(dormant.llm, name)), name
    for internal in ("FFN_SPECS", "MagnitudeHistogram", "register_tap_hooks"):
        assert internal not in dormant.llm.__all__
    for name in ("convert", "calibrate_ftbc", "SpikingNetwork", "evaluate_snn", "load_zoo_model"):
        assert name in dormant.snn.__all__


@pytest.mark.parametrize("package", ["dormant.llm", "dormant.llm.predictors", "dormant.offload", "dormant.snn"])
def test_exported_names_are_not_shadowed_by_submodules(package):
    """Importing a submodule sets it as a package attribute: it must never hide an exported function."""
    import importlib
    import pkgutil
    import types

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
    for name in pkg.__all__:
        assert not isinstance(getattr(pkg, name), types.ModuleType), name
    if package == "dormant.snn":
        from dormant.snn import convert

        assert callable(convert) and convert.__module__ == "dormant.snn.conversion"
