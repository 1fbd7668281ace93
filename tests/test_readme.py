"""The README's Python example, exactly as a user runs it: saved as example.py
and started with `python example.py` (no `if __name__ == "__main__"` guard),
through real processes (the script is the client, `cryptogen serve` the
server). Nothing may re-run the user's script: it would start itself again."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.timeout(900)
def test_readme_examples_run_as_a_plain_script(tmp_path):
    """The first example, then the cache example that continues it, as one script."""
    first, cache_example = _python_blocks()[:2]
    assert "__main__" not in first + cache_example and "CryptoGenForCausalLM.from_pretrained" in first
    script = tmp_path / "example.py"
    script.write_text(first + "\n" + cache_example)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout  # one line per print: the script ran once, not again in a child
    assert lines[0].startswith("The history of the city") and len(lines[0]) > len("The history of the city") + 5
    n_tokens, n_bytes = map(int, lines[1].split())
    assert n_tokens >= 6 and n_bytes > 0
