"""The documentation's examples run as written (with the tiny assets in place of the demo's), the
blocks it marks runnable run, the README is a front page, and the settings reference covers every group.

``mkdocs build --strict`` (every link and anchor of the site) runs in ``make test``, beside ruff."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
RUNNABLE = "<!-- runnable -->"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def docs_text() -> str:
    """The README and every page of the site."""
    return "\n".join(read(p) for p in [os.path.join(ROOT, "README.md"), *PAGES])


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", docs_text(), flags=re.S)


def runnable_blocks(language: str) -> list[tuple[str, str]]:
    """``(page, block)`` for each ``language`` block right after a ``<!-- runnable -->`` line."""
    pattern = re.escape(RUNNABLE) + r"\n```" + language + r"\n(.*?)```"
    return [
        (os.path.relpath(p, ROOT), block)
        for p in [os.path.join(ROOT, "README.md"), *PAGES]
        for block in re.findall(pattern, read(p), flags=re.S)
    ]


def test_python_api_example_trains_with_two_reward_components(tiny_assets, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "RewardFunction(exact_match" in b and ".fit(module" in b)
    code = (
        block.replace("assets/demo/sft", tiny_assets["policy"])
        .replace("assets/demo/rm", tiny_assets["reward"])
        .replace("assets/demo/prompts.jsonl", tiny_assets["prompts"])
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    module = namespace["module"]
    assert module.current_epoch == 2 and module.buffer.experience is not None
    reward_model, exact = module.rewards
    assert (reward_model.weight, exact.weight, exact.name) == (1.0, 0.5, "exact_match")
    assert set(module.component_scores) == {"reward_model", "exact_match"}


def test_subclass_example_adds_to_the_components(tiny_assets):
    block = next(b for b in python_blocks() if "class LengthPenalisedPPO" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    from lit_rlhf.rewards import RewardFunction

    module = namespace["LengthPenalisedPPO"](
        models={"actor_path": tiny_assets["policy"]},
        rewards=[RewardFunction(lambda prompts, responses: [1.0] * len(prompts), name="one")],
    )
    scores = module.compute_reward(["p", "p"], ["x" * 20, "x" * 30])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5]))


def test_your_own_data_examples_load_as_written(tmp_path):
    """The three JSONL blocks of "Your own data": prompts, SFT records, preference pairs."""
    from types import SimpleNamespace

    from lit_rlhf import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lit_rlhf.tasks import chat_tokenizer

    blocks = re.findall(r"```jsonl\n(.*?)```", read(os.path.join(ROOT, "docs", "guides", "data.md")), flags=re.S)
    assert len(blocks) == 3
    tok = chat_tokenizer("chatml", [b for b in blocks] * 20)
    modules = [
        lambda path: PromptDataModule(path, apply_chat_template=True, field="prompt"),
        lambda path: SFTDataModule(path),
        lambda path: PreferenceDataModule(path),
    ]
    for i, (block, make) in enumerate(zip(blocks, modules, strict=True)):
        lines = block.strip().splitlines()
        if i == 0:  # prompts: the plain one under `prompt`, the conversations under `messages`
            path = tmp_path / "plain.jsonl"
            path.write_text(lines[0] + "\n")
            conversations = tmp_path / "messages.jsonl"
            conversations.write_text("\n".join(lines[1:]) + "\n")
            for file, field in ((path, "prompt"), (conversations, "messages")):
                dm = PromptDataModule(str(file), apply_chat_template=True, field=field)
                dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
                dm.setup("fit")
                assert all(r.text.endswith("<|im_start|>assistant\n") for r in dm.train_prompts)
            continue
        path = tmp_path / f"block{i}.jsonl"
        path.write_text(block)
        dm = make(str(path))
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
        dm.setup("fit")
        assert len(dm.train_examples) == 3


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
ENV["PATH"] = os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")  # lit-rlhf of this venv


def commands(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_docs_mark_runnable_blocks_of_both_kinds():
    assert len(runnable_blocks("bash")) >= 1 and len(runnable_blocks("yaml")) >= 2


@pytest.mark.parametrize("page, block", runnable_blocks("bash"), ids=lambda v: v if v.endswith(".md") else "")
def test_every_runnable_shell_block_runs(page, block):
    for command in commands(block):
        done = subprocess.run(command, shell=True, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


def shell_blocks() -> list[tuple[str, str]]:
    """``(page, block)`` for every ``bash`` block of the README and the site."""
    return [
        (os.path.relpath(p, ROOT), block)
        for p in [os.path.join(ROOT, "README.md"), *PAGES]
        for block in re.findall(r"```bash\n(.*?)```", read(p), flags=re.S)
    ]


FIT = re.compile(r"(?:lit-rlhf|python train\.py|-m lit_rlhf\.cli) (fit|validate) (.*)$")


def test_every_training_command_in_the_docs_parses(tmp_path):
    """Each ``fit``/``validate`` command the docs show (shell blocks, runnable or not) is parsed by the CLI
    with ``--print_config`` appended: its configs exist, and its flags and class paths resolve. A module a
    page writes out (a python block opening with ``# mypkg/rewards.py``) is written to an importable path."""
    for source in python_blocks():
        first = source.splitlines()[0]
        if re.fullmatch(r"# [\w/]+\.py", first):
            path = tmp_path / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(source)
    found = []
    for page, block in shell_blocks():
        for command in commands(block):
            match = FIT.search(command)
            if match and "--model.help" not in command:
                words = shlex.split(match.group(2))
                shell = [i for i, w in enumerate(words) if w in {">", "|", "&&", ";"}]
                words = [w for w in words[: shell[0] if shell else None] if w != "--print_config"]
                found.append((page, [match.group(1), *words]))
    pages = {page for page, _ in found}
    assert {"docs/guides/grpo.md", "docs/guides/scaling.md", "docs/guides/rewards.md", "docs/guides/dpo.md"} <= pages
    script = (
        "import contextlib, io, json, sys\n"
        "from lit_rlhf.cli import main\n"
        "failed = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "            main([*argv, '--print_config'])\n"
        "        code = 0\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code or 0\n"
        "    if code != 0 or 'class_path' not in out.getvalue():\n"
        "        failed.append((argv, err.getvalue()[-1500:]))\n"
        "print(json.dumps(failed))\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
    argvs = json.dumps([argv for _, argv in found])
    done = subprocess.run([sys.executable, "-c", script, argvs], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{' '.join(argv)}\n{err}" for argv, err in failed)


def contains(printed, written, where: str = "") -> None:
    """Every value ``written`` in a config block is the value the CLI parsed."""
    if isinstance(written, dict):
        assert isinstance(printed, dict), where
        for key, value in written.items():
            assert key in printed, f"{where}.{key}"
            contains(printed[key], value, f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(printed, list) and len(printed) == len(written), where
        for i, (p, w) in enumerate(zip(printed, written, strict=True)):
            contains(p, w, f"{where}[{i}]")
    else:
        assert printed == written, f"{where}: {printed!r} != {written!r}"


@pytest.mark.parametrize("page, block", runnable_blocks("yaml"), ids=lambda v: v if v.endswith(".md") else "")
def test_every_runnable_config_block_parses_to_what_it_says(page, block, tmp_path):
    """A config block is given on top of ``configs/ppo_tiny.yaml``; the CLI parses it (``--print_config``)
    and every value it writes is the value parsed."""
    path = tmp_path / "block.yaml"
    path.write_text(block)
    command = ["lit-rlhf", "fit", "--config", "configs/ppo_tiny.yaml", "--config", str(path), "--print_config"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page}\n{done.stderr[-3000:]}"
    contains(yaml.safe_load(done.stdout), yaml.safe_load(block), page)


def test_the_readme_is_a_front_page_whose_links_reach_the_docs():
    text = read(os.path.join(ROOT, "README.md"))
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", re.sub(r"```.*?```", "", text, flags=re.S))
    assert any(link.startswith("docs/guides/") for link in links)
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


def test_the_readme_reward_example_scores_as_it_says():
    block = next(b for b in python_blocks() if "def exact_match(" in b and "rewards = [" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    [reward] = namespace["rewards"]
    assert (reward.name, reward.weight) == ("exact_match", 1.0)
    assert reward.fn(["1+1=", "2+2="], [" 2", "5"], answer=["2", "4"]) == [1.0, 0.0]


def test_the_settings_reference_is_generated_for_every_settings_group():
    """The page holds a mkdocstrings directive per group (the fields are rendered from the classes'
    own docstrings at build time), and every field of every group has a docstring to render."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    import lit_rlhf.settings as settings

    page = read(os.path.join(ROOT, "docs", "reference", "settings.md"))
    groups = [getattr(settings, n) for n in settings.__all__ if n.endswith("Settings")]
    assert len(groups) >= 10
    for group in groups:
        assert f"::: lit_rlhf.settings.{group.__name__}" in page, group.__name__
        documented = set()
        for cls in group.__mro__[:-1]:  # a field's docstring is on the class that declares it
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
            for field, after in zip(body, body[1:], strict=False):
                docstring = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                if isinstance(field, ast.AnnAssign) and docstring and isinstance(after.value.value, str):
                    documented.add(field.target.id)
        undocumented = {f.name for f in dataclasses.fields(group)} - documented
        assert not undocumented, f"{group.__name__}: {sorted(undocumented)}"


# a measured figure: a time, a memory size or a ratio (``2.69 s``, ``576 MiB``, ``0.29×``)
FIGURE = re.compile(r"(?<![\w.,])(?:\d[\d,]*\.\d+\s?(?:MiB|GiB|ms|s|×)|\d[\d,]*\s?(?:MiB|GiB|ms|s))(?!\w)")


def test_no_page_repeats_a_figure_another_page_owns():
    """Each measured figure lives on one page (benchmark figures on the benchmarks page, which
    includes ``benchmarks/README.md``); other pages link to it."""
    owners: dict[str, set[str]] = {}
    for page in PAGES:
        text = read(page)
        if page.endswith(os.path.join("docs", "benchmarks.md")):
            text += read(os.path.join(ROOT, "benchmarks", "README.md"))
        for figure in FIGURE.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
            owners.setdefault(figure.replace(" ", ""), set()).add(os.path.relpath(page, ROOT))
    repeated = {figure: sorted(pages) for figure, pages in owners.items() if len(pages) > 1}
    assert not repeated, repeated


def config_blocks() -> list[tuple[str, str]]:
    """``(page, block)`` for each ``yaml`` block of a guide that the docs do not mark runnable."""
    return [
        (os.path.relpath(p, ROOT), block)
        for p in PAGES
        if os.sep + "guides" + os.sep in p
        for block in re.findall(r"(?<!" + re.escape(RUNNABLE) + r"\n)```yaml\n(.*?)```", read(p), flags=re.S)
    ]


@pytest.mark.parametrize("page, block", config_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_every_config_block_of_the_guides_parses_to_what_it_says(page, block, tmp_path):
    """A guide's config block is a whole config (on top of the tiny config of its module) or a module's
    settings groups (``rollout:``, ``algorithm:`` ..., under ``model.init_args``); either way the CLI parses it
    and every value it writes is the value parsed."""
    written = yaml.safe_load(block)
    if "model" not in written:
        written = {"model": {"init_args": written}}
    base = "configs/dpo_tiny.yaml" if "DPOModule" in block else "configs/ppo_tiny.yaml"
    path = tmp_path / "block.yaml"
    path.write_text(yaml.safe_dump(written))
    command = ["lit-rlhf", "fit", "--config", base, "--config", str(path), "--print_config"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page}\n{done.stderr[-3000:]}"
    contains(yaml.safe_load(done.stdout), written, page)
