"""Every page's copyable code runs: the Python and shell blocks of the README, CONTRIBUTING.md
and the pages of docs/ (the tutorial's are run by tests/test_adoption.py).

**Python.** A block whose first line is `# <path>.py ...` (or `# <path>.toml`) is a file of
the reader's project, the tutorial's: `mysite`, with its app `shop` and the tutorial's files
(tests/test_adoption.py's `write_project`, run with this repository's interpreter). Each page
gets a copy of that project, then its own file blocks on top: a `*/settings.py` or `*/urls.py`
block is appended to the project's (it is what a reader adds at the end), any other is written
(and a second block of the same path on the page appended to the first). A page that goes on
from another one (`GOES_ON_FROM`) gets that page's files first. In the page's project
`makemigrations` and `migrate` run where the page wrote models, then `manage.py check`, then a
script that imports every module the page wrote and runs its other Python blocks, the
snippets, in order, in one namespace. The snippets find there only what their page's prose
says the reader has at hand (`PAGE_SCRIPT`). A page that writes tests has them collected by
pytest in its project, and one of their cases run on a real worker.

**Shell.** Each block is run by the runner that knows its commands (`SHELL_RUNNERS`): `make`
targets with `make -n` (the target exists, the variables it is given are the Makefile's, and
the options they pass to a Python module are that module's), `python -m` commands' options
likewise, `manage.py sagas_purge` for real on the test database, environment files and
`export` lines through the reference project's settings. The blocks that need the reference
project's running stack (`curl`) are run by tests/test_stack.py, on its stack
(`stack_blocks()`).

A block that none of these runs says why on the line above it, `<!-- untested: <reason> -->`;
`test_every_block_is_run_or_says_why_not` checks that no other block is left out.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from django.conf import settings
from psycopg import sql

from sagaproject.celery import app as celery_app
from tests.conftest import database_url
from tests.test_adoption import project_env, run, server_params, write_project
from tests.test_docs import BLOCKS, ROOT, Block

pytestmark = [pytest.mark.system]

TUTORIAL = ROOT / "docs" / "tutorial.md"  # run by tests/test_adoption.py
# A file of the reader's project: its path, first on the block's first line.
FILE_HEADER = re.compile(r"^# ((?:[\w.-]+/)*[\w.-]+\.(?:py|toml))\b")
# What a reader adds at the end of the project's own file, rather than writes anew.
APPENDED = ("/settings.py", "/urls.py")
# Pages whose prose goes on from another page's project: they get its files first.
GOES_ON_FROM = {
    "docs/howto/operate.md": ["docs/howto/define-a-saga.md"],
    "docs/howto/testing.md": ["docs/howto/define-a-saga.md"],
    "docs/howto/waits.md": ["docs/howto/define-a-saga.md", "docs/howto/testing.md"],
    "docs/howto/groups.md": ["docs/howto/define-a-saga.md", "docs/howto/testing.md"],
    "docs/howto/children.md": ["docs/howto/define-a-saga.md", "docs/howto/testing.md"],
    "docs/howto/reconcile.md": ["docs/howto/define-a-saga.md", "docs/howto/testing.md"],
}
# Python's own, relative to the repository (the pages name the virtualenv's).
VENV_PYTHON = ".venv/bin/python"


def name_of(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def runnable(block: Block) -> bool:
    return block.untested is None and block.page != TUTORIAL


def file_path(block: Block) -> str | None:
    """The project path a block is the content of, or None for a snippet."""
    if block.language not in ("python", "toml"):
        return None
    header = FILE_HEADER.match(block.code)
    return header.group(1) if header else None


# -- Python: the pages' files in the tutorial's project, then their snippets -----------------


@dataclass
class PageCode:
    """What a page gives its project: files (by path, in the page's order) and snippets."""

    page: Path
    files: dict[str, list[Block]] = field(default_factory=dict)
    snippets: list[Block] = field(default_factory=list)

    @classmethod
    def of(cls, page: Path) -> PageCode:
        code = cls(page)
        for block in BLOCKS:
            if block.page != page or not runnable(block):
                continue
            path = file_path(block)
            if path is not None:
                code.files.setdefault(path, []).append(block)
            elif block.language == "python":
                code.snippets.append(block)
        return code

    def test_files(self) -> list[str]:
        """Its test modules, which pytest collects."""
        return [
            path
            for path in self.files
            if path.rsplit("/", 1)[-1].startswith("test_") and not path.endswith("settings.py")
        ]

    def modules(self) -> list[str]:
        """The modules it writes, as the script imports them: the settings are imported by
        `django.setup()`, the test code (`conftest.py`, `tests/`, test settings) by pytest."""
        return [
            path.removesuffix(".py").replace("/", ".")
            for path in self.files
            if path.endswith(".py") and not is_test_code(path) and not path.endswith("settings.py")
        ]


def is_test_code(path: str) -> bool:
    parts = path.split("/")
    return "tests" in parts[:-1] or parts[-1].startswith(("test_", "conftest"))


PYTHON_PAGES = sorted(
    {block.page for block in BLOCKS if block.language == "python" and runnable(block)}
)


def apply_files(code: PageCode, project: Path) -> list[str]:
    """Write a page's files into a project; returns the paths written or added to."""
    for path, blocks in code.files.items():
        target = project / path
        target.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(block.code for block in blocks)
        if path.endswith(APPENDED):
            target.write_text(target.read_text() + "\n" + text)
        else:
            target.write_text(text)
    return list(code.files)


# Run in a page's project with its Python: the modules the page wrote, then its snippets, in
# one namespace that holds what the pages' prose says the reader has at hand, and nothing
# else: a view's `request`, whose user is saved (`created_by=request.user`). A snippet's line
# numbers are the page's, in a traceback.
PAGE_SCRIPT = '''"""A page's modules and snippets (tests/test_docs_run.py): argv[1], a JSON file."""
import importlib
import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django.setup()

from django.contrib.auth import get_user_model
from django.test import RequestFactory

page = json.loads(open(sys.argv[1]).read())
for module in page["modules"]:
    importlib.import_module(module)
request = RequestFactory().get("/")
request.user = get_user_model().objects.create_user("reader")
namespace = {"__name__": "__main__", "request": request}
for snippet in page["snippets"]:
    code = "\\n" * snippet["line"] + snippet["code"]
    exec(compile(code, snippet["page"], "exec"), namespace)
print(f"{len(page['modules'])} module(s) imported, {len(page['snippets'])} snippet(s) run")
'''


@dataclass
class Project:
    """The tutorial's project, migrated on a database of its own that each page's copies."""

    path: Path
    env: dict[str, str]
    python: Path
    database: dict[str, str]
    queue: str
    databases: list[str] = field(default_factory=list)  # every one made, dropped at the end

    def manage(self, *args: str, cwd: Path, timeout: float = 120) -> str:
        return run([self.python, "manage.py", *args], cwd=cwd, env=self.env, timeout=timeout)

    def new_database(self, suffix: str) -> str:
        """A copy of the migrated database (PostgreSQL's template: a file copy, no migrations)."""
        name = f"{self.database['NAME']}_{suffix}"
        self.databases.append(name)
        with psycopg.connect(dbname="postgres", autocommit=True, **server_params()) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(self.database["NAME"])
                )
            )
        return name


def drop_databases(names: list[str]) -> None:
    with psycopg.connect(dbname="postgres", autocommit=True, **server_params()) as conn:
        for name in names:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def tutorial_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The tutorial's project, with this repository's interpreter and its packages, migrated
    on a database and sending to a queue of its own (both deleted afterwards)."""
    venv = Path(sys.prefix)
    env = project_env(venv)
    suffix = uuid.uuid4().hex[:8]
    base = str(settings.DATABASES["default"]["NAME"]).removeprefix("test_")
    params = server_params()
    database = {"NAME": f"{base}_docs_{suffix}", **{k.upper(): v for k, v in params.items()}}
    project = Project(
        path=tmp_path_factory.mktemp("tutorial") / "mysite",
        env=env,
        python=venv / "bin" / "python",
        database=database,
        queue=f"docs-{suffix}",
    )
    project.databases.append(database["NAME"])
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database["NAME"])))
    try:
        write_project(venv, env, project.path, database=database, queue=project.queue)
        project.manage("makemigrations", "shop", cwd=project.path)
        project.manage("migrate", cwd=project.path)
        yield project
    finally:
        drop_databases(project.databases)
        drop_databases([f"test_{name}" for name in project.databases])  # a test run's, if left
        with celery_app.connection_for_write() as conn:
            # The queue, and its bindings (kombu's keys), as tests/test_adoption.py's `queue`.
            bindings = [
                f"_kombu.binding.{project.queue}",
                f"_kombu.binding_permanent.{project.queue}",
            ]
            conn.default_channel.client.delete(project.queue, *bindings)


def page_project(page: Path, tutorial: Project, where: Path) -> tuple[Path, PageCode]:
    """A copy of the tutorial's project with the page's files (and those of the page it goes
    on from), on a copy of its database; migrated again where the page changed models."""
    project = where / "mysite"
    shutil.copytree(tutorial.path, project, symlinks=True)
    written = []
    for earlier in GOES_ON_FROM.get(name_of(page), []):
        written += apply_files(PageCode.of(ROOT / earlier), project)
    code = PageCode.of(page)
    written += apply_files(code, project)
    slug = re.sub(r"\W+", "_", page.stem.lower())
    database = tutorial.new_database(slug)
    with (project / "mysite" / "settings.py").open("a") as settings_py:
        settings_py.write("\n# tests/test_docs_run.py: the page's database\n")
        settings_py.write(f"DATABASES['default']['NAME'] = {database!r}\n")
    if any(path.endswith("/models.py") for path in written):
        tutorial.manage("makemigrations", cwd=project)
        tutorial.manage("migrate", cwd=project)
    return project, code


def collected(output: str) -> dict[str, list[str]]:
    """`pytest --collect-only -q`'s node ids, by file: {path: [name, ...]}."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        if "::" in line:
            path, name = line.split("::", 1)
            found.setdefault(path, []).append(name)
    return found


def expected_collection(code: PageCode) -> dict[str, list[str]]:
    """The test ids a page shows (a `text` block right after a test file's block, of names
    such as `test_x[case]`), by that file."""
    blocks = [b for b in BLOCKS if b.page == code.page]
    shown = {}
    for before, after in itertools.pairwise(blocks):
        path = file_path(before)
        if path in code.test_files() and after.language == "text":
            lines = [line.strip() for line in after.code.splitlines() if line.strip()]
            if all(re.match(r"^test\w*(\[.*\])?$", line) for line in lines):
                shown[path] = lines
    return shown


def run_page(page: Path, tutorial: Project, where: Path) -> None:
    """A page's project: `manage.py check`, its modules and snippets, its tests."""
    project, code = page_project(page, tutorial, where)
    tutorial.manage("check", "--fail-level", "WARNING", cwd=project)
    details = {
        "modules": code.modules(),
        "snippets": [{"page": str(b.page), "line": b.line, "code": b.code} for b in code.snippets],
    }
    (where / "page.json").write_text(json.dumps(details))
    (project / "run_page.py").write_text(PAGE_SCRIPT)
    run([tutorial.python, "run_page.py", where / "page.json"], cwd=project, env=tutorial.env)
    if code.test_files():
        pytest_run = [tutorial.python, "-m", "pytest", "-p", "no:cacheprovider"]
        output = run(
            [*pytest_run, "--collect-only", "-q", *code.test_files()],
            cwd=project,
            env=tutorial.env,
        )
        found = collected(output)
        for path, names in expected_collection(code).items():
            assert found.get(path) == names, f"{page}: {path} collects other tests than it shows"
        # One case for real, on a worker: the first of the page's first test file.
        first = code.test_files()[0]
        assert found.get(first), f"{page}: {first} collects no test"
        case = f"{first}::{found[first][0]}"
        output = run([*pytest_run, "-q", case], cwd=project, env=tutorial.env, timeout=180)
        assert re.search(r"^1 passed\b", output, flags=re.MULTILINE), f"{case}:\n{output}"


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest,
    tutorial_project: Project,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[Path, Future[None]]]:
    """The pages that this session's tests ask for, run side by side (most of their time is
    spent waiting on processes): the ones with tests, the longest, first."""
    wanted = {
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_the_python_of_a_page_runs"
        and hasattr(item, "callspec")
    }
    ordered = sorted(wanted, key=lambda page: (not PageCode.of(page).test_files(), page))
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {
            page: pool.submit(run_page, page, tutorial_project, tmp_path_factory.mktemp("page"))
            for page in ordered
        }


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=name_of)
def test_the_python_of_a_page_runs(page: Path, page_runs: dict[Path, Future[None]]) -> None:
    page_runs[page].result()


# -- Shell ------------------------------------------------------------------------------------


def commands(block: Block) -> list[list[str]]:
    """A block's commands as words: continued lines joined, comments and blank lines left out
    (ValueError for quoting that spans lines, which only bash runs)."""
    lines = block.code.replace("\\\n", " ").splitlines()
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def assignments(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 command ...`: the leading variables, and the command."""
    count = 0
    while count < len(words) and re.match(r"^[A-Z_][A-Z0-9_]*=", words[count]):
        count += 1
    variables = dict(word.split("=", 1) for word in words[:count])
    return variables, words[count:]


def is_cli(words: list[str]) -> bool:
    """`export NAME=value`, `[NAME=value] make ...`, `.venv/bin/python -m <module> ...`."""
    _, command = assignments(words)
    if words[0] == "export":
        return len(words) == 2 and "=" in words[1]
    return bool(command) and (
        command[0] == "make" or (command[0] == VENV_PYTHON and command[1:2] == ["-m"])
    )


def is_purge(words: list[str]) -> bool:
    return words[:3] == [VENV_PYTHON, "manage.py", "sagas_purge"]


def is_environment_file(block: Block) -> bool:
    """An environment file (`# /etc/<...>/environment`, then `NAME=value` lines)."""
    first, *rest = block.code.strip().splitlines()
    return bool(re.match(r"^# /etc/\S+/environment$", first)) and all(
        re.match(r"^[A-Z_][A-Z0-9_]*=\S*$", line) for line in rest
    )


def needs_the_stack(block: Block) -> bool:
    """Requests to the reference project's running stack (`make run`'s), or a look at the
    spans it writes: run by tests/test_stack.py."""
    return bool(re.search(r"(^|[\s|(])curl\s", block.code)) or ".local/traces.jsonl" in block.code


def runner_of(block: Block) -> str | None:
    """Which runner runs a shell block: "stack", "environment", "purge", "cli", or None."""
    if needs_the_stack(block):
        return "stack"
    if is_environment_file(block):
        return "environment"
    try:
        found = commands(block)
    except ValueError:
        return None
    if found and all(map(is_purge, found)):
        return "purge"
    if found and all(map(is_cli, found)):
        return "cli"
    return None


SHELL_BLOCKS = [block for block in BLOCKS if block.language in ("sh", "bash") and runnable(block)]
SHELL_RUNNERS = {block: runner_of(block) for block in SHELL_BLOCKS}


def shell_blocks(runner: str) -> list[Block]:
    return [block for block, name in SHELL_RUNNERS.items() if name == runner]


def stack_blocks() -> list[Block]:
    """The blocks that tests/test_stack.py runs on its stack."""
    return shell_blocks("stack")


# The pages' requests, as tests/test_stack.py runs them: a request that fails, or answers
# other than 2xx or a 409 (an operator action that the saga's state refuses, as the pages
# say), fails its block.
CURL = r"""
curl() {
    local answer code
    answer=$(command curl --silent --show-error --write-out '\n%{http_code}' "$@") || return
    code=${answer##*$'\n'}
    printf '%s\n' "${answer%$'\n'*}"
    case "$code" in
        2??|409) ;;
        *) echo "curl $*: HTTP $code" >&2; return 22 ;;
    esac
}
"""


def run_stack_block(
    block: Block, *, base: str, worker_metrics: str, variables: dict[str, str], cwd: Path
) -> str:
    """A block of requests to the stack at `base` (for `localhost:8000`) whose worker serves
    its metrics at `worker_metrics` (for `localhost:9808`), with the variables the pages set
    before it (`T`, `STAFF`, `ORDER_ID`, `SAGA_ID`), in `cwd` (where `.local/` is)."""
    code = block.code.replace("localhost:8000", urlsplit(base).netloc)
    code = code.replace("localhost:9808", worker_metrics)
    script = "set -euo pipefail\n" + CURL + code
    return run(["bash", "-c", script], cwd=cwd, env=own_environment(**variables), timeout=60)


def test_every_block_is_run_or_says_why_not() -> None:
    """Each Python block is a file or a snippet of its page's project; each shell block has a
    runner; any other is marked `<!-- untested: why -->` (tests/test_docs.py checks a reason
    is given)."""
    unrun = [str(block) for block, name in SHELL_RUNNERS.items() if name is None]
    assert unrun == [], "no runner runs these shell blocks: make them runnable, or say why not"
    for block in BLOCKS:
        if block.language == "python" and runnable(block):
            assert block.page in PYTHON_PAGES
    assert len(stack_blocks()) >= 3 and shell_blocks("purge") and shell_blocks("environment")


def own_environment(**variables: str) -> dict[str, str]:
    """This process's environment, without a parent make's, with `variables` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return {**env, **variables}


# How the reference project's settings read each variable a page sets (sagaproject/settings.py),
# as the settings that the script below prints should then be.
def env_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def database_settings(url: str) -> dict:
    parts = urlsplit(url)
    return {
        "NAME": parts.path.lstrip("/"),
        "HOST": parts.hostname or "",
        "PORT": parts.port or "",
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
    }


READS: dict[str, Callable[[str], dict]] = {
    "DATABASE_URL": lambda value: {"DATABASE": database_settings(value)},
    "CELERY_BROKER_URL": lambda value: {"CELERY_BROKER_URL": value},
    "DJANGO_SECRET_KEY": lambda value: {"SECRET_KEY": value},
    "DJANGO_DEBUG": lambda value: {"DEBUG": env_bool(value)},
    "DJANGO_ALLOWED_HOSTS": lambda value: {"ALLOWED_HOSTS": value.split(",")},
}
SETTINGS_SCRIPT = """import json
from sagaproject import settings as s

keys = ("NAME", "HOST", "PORT", "USER", "PASSWORD")
database = {key: s.DATABASES["default"][key] or "" for key in keys}
print(json.dumps({
    "DATABASE": database, "CELERY_BROKER_URL": s.CELERY_BROKER_URL, "SECRET_KEY": s.SECRET_KEY,
    "DEBUG": s.DEBUG, "ALLOWED_HOSTS": s.ALLOWED_HOSTS,
}))
"""


def check_read_by_the_settings(variables: dict[str, str], output: str, block: Block) -> None:
    read = json.loads(output.strip().splitlines()[-1])
    for name, value in variables.items():
        assert name in READS, f"{block}: this test does not know how the project reads {name}"
        for key, expected in READS[name](value).items():
            assert read[key] == expected, f"{block}: {name}={value} gives {key}={read[key]!r}"


def settings_environment(variables: dict[str, str]) -> dict[str, str]:
    """The environment of a command that reads the reference project's settings with
    `variables`: never one without servers named (it would start the embedded ones)."""
    servers = {name: os.environ[name] for name in ("DATABASE_URL", "CELERY_BROKER_URL")}
    return own_environment(**{**servers, **variables})


@pytest.mark.parametrize("block", shell_blocks("environment"), ids=str)
def test_an_environment_file_is_what_the_settings_read(block: Block, tmp_path: Path) -> None:
    """Sourced by bash, as systemd's `EnvironmentFile=` and Compose's `env_file` take it."""
    path = tmp_path / "environment"
    path.write_text(block.code)
    variables = dict(line.split("=", 1) for line in block.code.strip().splitlines()[1:])
    script = f'set -a; . "$1"; set +a; exec {shlex.quote(sys.executable)} -c "$2"'
    output = run(
        ["bash", "-c", script, "bash", path, SETTINGS_SCRIPT],
        cwd=ROOT,
        env=settings_environment({}),
    )
    check_read_by_the_settings(variables, output, block)


HELP: dict[tuple[str, ...], str] = {}


def help_of(program: tuple[str, ...]) -> str:
    """A program's `--help` (a Python module's, or pytest's without the suite's conftest)."""
    if program not in HELP:
        HELP[program] = run([*program, "--help"], cwd=ROOT, env=own_environment())
    return HELP[program]


def check_options(program: tuple[str, ...], words: list[str], block: Block) -> None:
    """Every option in `words` is one that `program` offers; every path exists."""
    text = help_of(program)
    for word in words:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{block}: {' '.join(program)} has no option {option}"
            )
        elif "/" in word or word.endswith(".py"):
            assert (ROOT / word).exists(), f"{block}: {word} does not exist"


def program_of(line: str) -> tuple[str, ...] | None:
    """The program of a recipe's command: `python -m <module>`, or pytest."""
    words = shlex.split(line)
    if words[1:2] == ["-m"]:
        return (sys.executable, "-m", words[2])
    if words[0].endswith("/pytest"):
        return (sys.executable, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider")
    return None


def check_make(
    words: list[str], given: dict[str, str], exported: dict[str, str], block: Block
) -> None:
    """`make -n`: the targets exist, each variable given is the Makefile's and what it passes on
    is an option of the program it goes to; each variable given in the command's environment
    (`NAME=value make ...`) is read by that program."""
    variables = dict(word.split("=", 1) for word in words if "=" in word)
    makefile = (ROOT / "Makefile").read_text()
    for name in variables:
        assert f"$({name})" in makefile, f"{block}: the Makefile has no variable {name}"
    recipe = run(["make", "-n", *words], cwd=ROOT, env=own_environment(**exported, **given))
    for name, value in variables.items():
        lines = [line for line in recipe.splitlines() if value in line]
        assert lines, f"{block}: make passes {name} to no command"
        for line in lines:
            program = program_of(line)
            if program is not None:
                check_options(program, shlex.split(value), block)
    modules = re.findall(r"-m ([\w.]+)", recipe)
    for name in given:
        sources = [Path(importlib.util.find_spec(m).origin).read_text() for m in modules]  # type: ignore[union-attr, arg-type]
        assert any(f'"{name}"' in source for source in sources), (
            f"{block}: {name} is read by none of {modules}"
        )


@pytest.mark.parametrize("block", shell_blocks("cli"), ids=str)
def test_make_targets_and_commands_exist_with_their_options(block: Block) -> None:
    """Benchmarks, the drill, the stack and the test suite take minutes: their commands are
    checked, not run. `export` lines go through the reference project's settings."""
    exported: dict[str, str] = {}
    for words in commands(block):
        if words[0] == "export":
            name, value = words[1].split("=", 1)
            exported[name] = value
            continue
        environment, command = assignments(words)
        if command[0] == "make":
            check_make(command[1:], environment, exported, block)
        else:
            module = command[2]
            assert importlib.util.find_spec(module), f"{block}: no module {module}"
            if command[3:]:
                check_options((sys.executable, "-m", module), command[3:], block)
    if exported:
        env = settings_environment(exported)
        output = run([sys.executable, "-c", SETTINGS_SCRIPT], cwd=ROOT, env=env)
        check_read_by_the_settings(exported, output, block)


@pytest.mark.parametrize("block", shell_blocks("purge"), ids=str)
def test_the_purge_commands_run_on_the_test_database(block: Block, transactional_db) -> None:
    """In order, on finished sagas of several ages and statuses: each deletes exactly the
    sagas its options name (a dry run none), and says how many."""
    from datetime import timedelta

    from django.utils import timezone

    from sagas.durations import parse_duration
    from sagas.models import Saga
    from sagas.retention import PURGEABLE, parse_statuses

    now = timezone.now()
    for status, age in [
        ("completed", "40 days"),
        ("completed", "1 hour"),
        ("compensated", "40 days"),
        ("compensated", "2 hours"),
        ("compensated", "10 minutes"),
        ("failed", "40 days"),
        ("running", "40 days"),
    ]:
        amount, unit = age.split()
        finished = now - timedelta(**{unit if unit.endswith("s") else unit + "s": int(amount)})
        is_final = status not in ("running",)
        Saga.objects.create(
            name="docs", status=status, input={}, finished_at=finished if is_final else None
        )
    env = own_environment(DATABASE_URL=database_url(settings.DATABASES["default"]))
    for words in commands(block):
        options = dict(zip(words[3::2], words[4::2], strict=False))
        cutoff = timezone.now() - parse_duration(options["--older-than"])
        statuses = parse_statuses(options.get("--status", ",".join(PURGEABLE)))
        doomed = Saga.objects.filter(status__in=statuses, finished_at__lt=cutoff)
        expected, before = doomed.count(), Saga.objects.count()
        output = run([sys.executable, *words[1:]], cwd=ROOT, env=env)
        if "--dry-run" in words:
            assert output.startswith(f"Dry run: {expected} saga(s)"), f"{block}: {output}"
            assert Saga.objects.count() == before
        else:
            assert output.startswith(f"Purged {expected} saga(s)"), f"{block}: {output}"
            assert Saga.objects.count() == before - expected and not doomed.exists()
    assert Saga.objects.filter(status__in=("failed", "running")).count() == 2
