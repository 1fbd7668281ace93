"""The README's Python examples, exactly as a user runs them: saved as a file
and started with `python example.py` (no `if __name__ == "__main__"` guard),
through real processes (the script is the client, `cryptogen serve` the
server). Nothing may re-run the user's script: it would start itself again."""

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run_script(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path)], cwd=path.parent, capture_output=True, text=True, timeout=800)


@pytest.mark.timeout(900)
def test_readme_examples_run_as_plain_scripts(tmp_path):
    """The first example with the cache example that continues it, as one
    script, and the speculative-decoding example, as another; the two run at
    once (two sessions share the machine: a secure step is half waiting for
    the peer)."""
    blocks = _python_blocks()
    first, cache_example = blocks[:2]
    (speculative,) = [b for b in blocks if "assistant_model=" in b]
    assert "__main__" not in first + cache_example + speculative and "CryptoGenForCausalLM.from_pretrained" in first
    (tmp_path / "example.py").write_text(first + "\n" + cache_example)
    (tmp_path / "speculative.py").write_text(speculative)
    with ThreadPoolExecutor(2) as pool:
        done, spec_done = pool.map(_run_script, [tmp_path / "example.py", tmp_path / "speculative.py"])

    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout  # one line per print: the script ran once, not again in a child
    assert lines[0].startswith("The history of the city") and len(lines[0]) > len("The history of the city") + 5
    n_tokens, n_bytes = map(int, lines[1].split())
    assert n_tokens >= 6 and n_bytes > 0

    assert spec_done.returncode == 0, spec_done.stderr[-3000:]
    lines = spec_done.stdout.strip().splitlines()
    assert len(lines) == 1, spec_done.stdout
    text, passes = lines[0].rsplit(" ", 1)
    # 4 new tokens in fewer passes than greedy decoding's 4 (the prompt's, then 3
    # steps): the draft's tokens were accepted two at a time.
    assert text.startswith("He was born in") and len(text) > len("He was born in") + 5 and int(passes) < 4, lines
