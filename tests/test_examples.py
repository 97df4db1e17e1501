"""docs/your_data_and_blocks.md's worked example, as written: the files it shows are the files in examples/, and
its commands run in a fresh copy of the directory (on the session's Ray cluster, joined through RAY_ADDRESS; the
block found in the working directory and shipped to the workers with no PYTHONPATH set)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "your_data_and_blocks.md"
FENCE = r"```[a-z]*\n(.*?)```"


def _blocks(marker: str) -> list[tuple[str, str]]:
    """(what the marker names, the fenced block after it) for every ``<!-- marker: ... -->`` / ``<!-- marker ... -->``."""
    return re.findall(rf"<!-- {marker}:? (\S+) -->\n{FENCE}", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_files_the_page_shows_are_the_example_files():
    shown = _blocks("file")
    assert {path for path, _ in shown} == {"examples/own_data/make_data.py", "examples/own_data/my_blocks.py",
                                          "examples/own_data/train_mine.py"}
    for path, text in shown:
        assert text == (ROOT / path).read_text(encoding="utf-8"), f"{path} differs from what the page shows"


@pytest.mark.ray
def test_the_worked_example_runs_as_written(ray_head, tmp_path):
    """Slow: the page's four commands as written, each a process of its own (two of them train 5 epochs)."""
    (where, script), = _blocks("run in")
    work = tmp_path / "own_data"
    shutil.copytree(ROOT / where, work)
    env = {k: v for k, v in ray_head.driver_env().items() if k != "PYTHONPATH"}
    commands = [c.strip() for c in script.replace("\\\n", " ").splitlines() if c.strip()]
    for command in commands:
        argv = command.split()
        assert argv[0] == "python"
        done = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    cli = json.loads((work / "runs" / "mine" / "summary.json").read_text())
    api = json.loads((work / "runs" / "mine_api" / "summary.json").read_text())
    assert cli["block"] == api["block"] == "my_blocks:small_block"
    assert cli["data"]["name"] == "mydata" and api["data"]["name"] == "mydigits"
    assert cli["data"]["val"] == api["data"]["val"] > 0 and cli["data"]["test"] == 360
    assert cli["test_accuracy"] > 0.9 and api["test_accuracy"] > 0.9, (cli["test_accuracy"], api["test_accuracy"])
    assert "val_accuracy" in cli["curve"][0] and cli["val_accuracy"] is not None
    assert "for" in done.stdout and "test accuracy" in done.stdout  # train_mine.py printed its predictions
