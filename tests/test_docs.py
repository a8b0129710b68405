"""The README and docs/ as users meet them: every Python example runs on the shipped demo pair and
prints the answer its page promises, every shell example uses flags that exist, every relative link
leads somewhere, docs/cli.md has every command's synopsis, and the README's layout is the tree's.

A runnable example is a ```python block right after a marker line
`<!-- test: [server] expect "TEXT" ["TEXT" ...] -->`: its output must contain each TEXT. `server`
runs it against `apd-deploy serve` on the demo bundle. Snippets that are not meant to run are
written as ```text. Paths `out/arithmetic-bundle` become the demo bundle's, the server's address
`http://127.0.0.1:8000` the test server's.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest

from apd_deploy.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOC_BUNDLE = "out/arithmetic-bundle"
DOC_URL = "http://127.0.0.1:8000"
MARKER = re.compile(r"<!-- test: (server )?expect ((?:\"[^\"]+\" ?)+)-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def fenced(path: Path, info: str) -> list[tuple[int, str, str]]:
    """(line, the line before the fence, body) of each ```info block of `path`."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) == info:
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            blocks.append((text.count("\n", 0, match.start()) + 1, before, match.group(2)))
    return blocks


def examples() -> list[pytest.param]:
    return [pytest.param(path, line, before, body, id=f"{path.relative_to(ROOT)}:{line}")
            for path in PAGES for line, before, body in fenced(path, "python")]


EXAMPLES = examples()


def test_the_pages_have_python_examples():
    assert {path.name for path, *_ in (p.values for p in EXAMPLES)} >= {"README.md", "batching.md", "serving.md"}


@pytest.mark.parametrize(("path", "line", "before", "body"), EXAMPLES)
def test_every_python_example_says_what_it_prints(path, line, before, body):
    assert MARKER.fullmatch(before.strip()), (
        f"{path}:{line}: put <!-- test: expect \"...\" --> before the block, or write it as ```text")


@pytest.fixture(scope="module")
def served_demo(demo_bundle):
    from apd_deploy.bench.serving import launched_server

    with launched_server([str(demo_bundle), "--engine", "onnxruntime-cpu-fp32", "--threads", "1",
                          "--served-model-name", "arithmetic-bundle"]) as (url, _):
        yield url


@pytest.mark.parametrize(("path", "line", "before", "body"), EXAMPLES)
def test_python_example_runs_and_prints_its_answer(path, line, before, body, demo_bundle, request):
    marker = MARKER.fullmatch(before.strip())
    assert marker, f"{path}:{line}: no test marker"
    code = body.replace(DOC_BUNDLE, str(demo_bundle))
    if marker.group(1):
        code = code.replace(DOC_URL, request.getfixturevalue("served_demo"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{path}:{line}", "exec"), {"__name__": "__doc_example__"})
    for expected in re.findall(r"\"([^\"]+)\"", marker.group(2)):
        assert expected in printed.getvalue(), f"{path}:{line} printed:\n{printed.getvalue()}"


def _shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """`apd-deploy ...` lines of the ```bash blocks of `path`, continuation lines joined, as words."""
    commands = []
    for line, _, body in fenced(path, "bash"):
        for offset, command in enumerate(body.replace("\\\n", " ").splitlines()):
            if command.startswith("apd-deploy "):
                commands.append((line + offset, shlex.split(command, comments=True)))
    return commands


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_examples_use_commands_and_flags_that_exist(path):
    wrong = []
    for line, words in _shell_commands(path):
        command = cli.commands.get(words[1])
        if command is None:
            wrong.append(f"{path.name}:{line}: no command {words[1]}")
            continue
        known = {flag for p in command.params if isinstance(p, click.Option) for flag in p.opts + p.secondary_opts}
        wrong += [f"{path.name}:{line}: {words[1]} has no {word}" for word in words[2:]
                  if word.startswith("-") and word.split("=")[0] not in known | {"-h", "--help"}]
    assert wrong == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_and_headings_that_exist(path):
    text = FENCE.sub("", path.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and anchor not in {_slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text()), re.M)}:
            broken.append(target)
    assert broken == []


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_shows_the_test_command_ci_runs():
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README.read_text()


def test_no_page_refers_to_files_outside_the_repository():
    outside = [f"{page.name}: {path}" for page in PAGES for path in re.findall(r"(?:\.\./)+[\w./-]+", page.read_text())
               if not (page.parent / path).resolve().is_relative_to(ROOT)]
    assert outside == []


@pytest.mark.parametrize("phrase", ["before issue #", "used to", "this session", "v1 of the pair", "not run yet"])
def test_pages_are_written_in_the_present_tense(phrase):
    assert [p.name for p in PAGES if phrase in p.read_text()] == []


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_cli_doc_has_a_synopsis_of_every_command_with_every_flag(name):
    text = (ROOT / "docs" / "cli.md").read_text()
    synopsis = re.search(rf"^```text\n(apd-deploy {re.escape(name)} .*?)^```$", text, re.M | re.S)
    assert synopsis, f"docs/cli.md has no ```text block starting with 'apd-deploy {name} '"
    flags = [flag for p in cli.commands[name].params if isinstance(p, click.Option) and p.name != "help"
             for flag in p.opts + p.secondary_opts if flag.startswith("--")]
    assert [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", synopsis.group(1))] == []


def _layout() -> dict[str, str]:
    """The README's layout block: folder -> the text that describes its files."""
    block = README.read_text().split("## Layout", 1)[1]
    body = FENCE.search(block).group(2)
    folders: dict[str, str] = {}
    for line in body.splitlines():
        if line[:1].strip():
            folder, _, rest = line.partition(" ")
            folders[folder] = rest
        else:
            folders[folder] += line
    return folders


def test_layout_names_only_files_that_exist():
    missing = []
    for folder, text in _layout().items():
        if not (ROOT / folder).exists():
            missing.append(folder)
        for name in re.findall(r"(?<![\w.-])[\w.-]+\.(?:py|sh|json|md|yaml)\b", text):
            if folder.endswith("/") and not (ROOT / folder / name).exists():
                missing.append(folder + name)
    assert missing == []


def test_layout_names_every_source_file():
    tracked = subprocess.run(["git", "ls-files", "apd_deploy", "export", "engines", "runtime", "scripts", "training"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    layout = _layout()
    unnamed = [path for path in tracked if not path.endswith("__init__.py")
               and not re.search(rf"(?<![\w.-]){re.escape(Path(path).name)}\b", layout.get(str(Path(path).parent) + "/", ""))]
    assert unnamed == []
