"""The shape the rollout refactor promised, kept by a test: no string switch on the engine, no module
reached into from rollout/ or rewards/, no trainable-token mask read back from the EOS position."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent / "lit_rlhf"


def sources(*folders: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for folder in folders for p in (ROOT / folder).rglob("*.py")}


def test_no_comparison_with_the_native_shorthand():
    comparisons = re.compile(r"""[!=]=\s*["']native["']|["']native["']\s*[!=]=""")
    found = [name for name, text in sources(".").items() if comparisons.search(text)]
    assert not found, found


def test_rollout_and_rewards_never_reach_into_a_lightning_module():
    for name, text in sources("rollout", "rewards").items():
        assert "module: Any" not in text, name
        accesses = re.findall(r"pl_module\.\w+", text)
        if name == "rollout/callback.py":  # the trigger: asks the module for a rollout, fills its buffer (and
            # on a failed fit calls the module's own teardown, which Lightning then skips)
            assert set(accesses) <= {"pl_module.collect_rollout", "pl_module.buffer", "pl_module.teardown"}, accesses
        else:
            assert not accesses, (name, accesses)
        assert not re.search(r"^\s*(from|import) lit_rlhf\.modules", text, re.M), name  # arrows point one way


def test_no_action_mask_is_derived_from_the_eos_position():
    for name, text in sources(".").items():
        assert "action_mask" not in text, name
        assert "eos_before" not in text, name  # the old rule: tokens up to the first EOS are trained on
