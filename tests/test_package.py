import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dormant.config import add_config_args, config_from_args, field


def test_import_is_light():
    code = (
        "import sys, dormant, dormant.llm;"
        "bad = [m for m in ('transformers', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
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
