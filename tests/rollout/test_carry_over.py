"""Partial rollouts with carry-over (``lit_rlhf.rollout.carry_over``), driven by an engine whose rows have
known lengths: the rollout stops waiting for its longest rows, no token is lost or duplicated across
stop and resume, every token carries the version that sampled it, and the staleness bound holds."""

import pytest

from lit_rlhf.rollout import RolloutEngine, Sample
from lit_rlhf.rollout.carry_over import SEED_STRIDE, CarryOver, InFlight
from lit_rlhf.settings import AsyncSettings, GenerationSettings

EOS, PROMPT_BASE, N = 2, 1000, 2


class KnownLengths(RolloutEngine):
    """Row ``r`` (its first seed, ``BASE + r``) writes ``length(r)`` tokens: ``10, 11, ...`` then EOS, one per
    decode step; a token's log-prob is minus the version of the weights that sampled it (``sync_weights``
    counts the pushes). The kept tokens of a continuation are the prompt's ids below ``PROMPT_BASE``."""

    BASE = 500

    def __init__(self, length):
        self.length, self.version, self.calls = length, 0, []

    def start(self, actor, device):
        return True

    def sync_weights(self, actor):
        self.version += 1

    def generate(self, requests, generation, on_token=None):
        self.calls.append([len(r.prompt_ids) for r in requests])
        out = []
        for request in requests:
            kept = sum(1 for t in request.prompt_ids if t < PROMPT_BASE)
            row = request.seed - SEED_STRIDE * kept - self.BASE
            total = self.length(row)
            budget = request.max_new_tokens or generation.max_new_tokens
            ids = [EOS if i == total - 1 else 10 + i for i in range(kept, min(total, kept + budget))]
            reason = "stop" if ids and ids[-1] == EOS else "length"
            out.append(Sample(tuple(ids), tuple([-float(self.version)] * len(ids)), reason))
        return out


def prompts(positions):
    return [[PROMPT_BASE + p, PROMPT_BASE + p] for p in positions]


def run(carry, engine, rollouts, max_new=64, start=0):
    """``rollouts`` rollouts: push the weights (one version per rollout), generate; the outcomes."""
    generation = GenerationSettings(max_new_tokens=max_new, n_samples_per_prompt=N)
    outcomes = []
    for k in range(start, start + rollouts):
        engine.version = k  # the weights of rollout k are version k
        outcomes.append(carry.run(k, engine, generation, prompts))
    return outcomes


def long_tail(row):  # one row in eight is long
    return 40 if row % 8 == 7 else 3 + row % 5


def test_a_rollout_ends_once_its_groups_are_complete_and_carried_rows_resume_token_exact():
    settings = AsyncSettings(max_staleness=2, over_provision=2, segment_tokens=4)
    engine = KnownLengths(long_tail)
    carry = CarryOver(settings, rollout_batch_size=4, n_samples=N, base_seed=KnownLengths.BASE)
    outcomes = run(carry, engine, 6)
    # synchronously every rollout waits for its longest row (40 steps); here it stops at a segment's end
    assert all(o.decode_steps < 40 for o in outcomes[:2]), [o.decode_steps for o in outcomes]
    seen = []
    for k, outcome in enumerate(outcomes):
        assert len(outcome.trained) == 4
        for group in outcome.trained:
            seen.append(group.position)
            for i, row in enumerate(group.rows):
                total = long_tail(group.position * N + i)
                assert row.token_ids == [10 + j for j in range(total - 1)] + [EOS], "no token lost or duplicated"
                assert row.finish_reason == "stop"
                assert row.log_probs == [-float(v) for v in row.versions], "each token's behaviour log-prob kept"
                assert row.versions == sorted(row.versions) and row.versions[-1] <= k
                assert k - min(row.versions) <= settings.max_staleness
    assert any(o.carried_rows for o in outcomes), "some rows were stopped and carried over"
    assert any(min(r.versions) < k for k, o in enumerate(outcomes) for g in o.trained for r in g.rows)
    # every admitted prompt is trained, in flight, or dropped: none twice, none skipped
    in_flight = [g.position for g in carry.state.groups]
    assert sum(o.dropped_rows for o in outcomes) == 0
    assert sorted(seen + in_flight) == list(range(carry.state.next_position))


def test_the_capacity_rule_bounds_the_groups_in_flight():
    settings = AsyncSettings(max_staleness=1, over_provision=100, segment_tokens=4)
    assert settings.groups_in_flight(4) == 8  # (max_staleness + 1) * rollout_batch_size, not 4 + 100
    assert AsyncSettings(max_staleness=3).groups_in_flight(8) == 10  # over_provision null: a quarter
    carry = CarryOver(settings, 4, N, KnownLengths.BASE)
    engine = KnownLengths(long_tail)
    generation = GenerationSettings(max_new_tokens=64, n_samples_per_prompt=N)
    for k in range(5):
        carry.admit(k, prompts)
        assert len(carry.state.groups) <= 8
        engine.version = k
        # run() admits again: nothing new fits, the groups stay within the bound
        outcome = carry.run(k, engine, generation, prompts)
        assert len(outcome.trained) == 4 and len(carry.state.groups) <= 4


def slow_first_group(row):  # the first prompt's rows take 30 tokens, every other row 2
    return 30 if row < N else 2


@pytest.mark.parametrize("on_stale", ["wait", "drop"])
def test_a_group_at_the_staleness_bound_is_waited_for_or_dropped(on_stale):
    settings = AsyncSettings(max_staleness=1, over_provision=4, segment_tokens=4, on_stale=on_stale)
    carry = CarryOver(settings, 2, N, KnownLengths.BASE)
    engine = KnownLengths(slow_first_group)
    first, second, third = run(carry, engine, 3)
    assert 0 not in [g.position for g in first.trained], "rollout 0 did not wait for the slow group"
    assert first.carried_rows >= N
    if on_stale == "wait":  # rollout 1 is the slow group's last chance: it decodes until it is complete
        assert second.trained[0].position == 0 and second.trained[0].rows[0].token_ids[-1] == EOS
        # 26 more tokens for the slow rows; the new prompts' first segment (2 tokens) is a call of its own
        assert second.decode_steps == 30 - first.decode_steps + 2
        assert second.dropped_rows == third.dropped_rows == 0
    else:  # rollout 1 ends without it, rollout 2 discards it: its prompt is not repeated
        assert 0 not in [g.position for g in second.trained + third.trained]
        assert third.dropped_rows == N
        assert 0 not in [g.position for g in carry.state.groups]
    for k, outcome in enumerate((first, second, third)):
        assert all(k - min(r.versions) <= 1 for g in outcome.trained for r in g.rows)


def test_without_carry_over_the_unfinished_rows_are_dropped():
    settings = AsyncSettings(max_staleness=1, over_provision=2, segment_tokens=4, carry_over=False)
    carry = CarryOver(settings, 4, N, KnownLengths.BASE)
    (outcome,) = run(carry, KnownLengths(long_tail), 1)
    assert outcome.dropped_rows > 0 and all(g.complete for g in carry.state.groups)
    assert outcome.carried_rows == sum(len(g.rows) for g in carry.state.groups)


def test_the_in_flight_state_round_trips_and_a_restored_run_goes_on_as_the_uninterrupted_one():
    settings = AsyncSettings(max_staleness=2, over_provision=3, segment_tokens=3)
    straight = CarryOver(settings, 4, N, KnownLengths.BASE)
    whole = run(straight, KnownLengths(long_tail), 6)
    first = CarryOver(settings, 4, N, KnownLengths.BASE)
    run(first, KnownLengths(long_tail), 3)
    state = first.state.state_dict()
    assert InFlight.from_state(state).state_dict() == state
    resumed = CarryOver(settings, 4, N, KnownLengths.BASE)
    resumed.state = InFlight.from_state(state)
    rest = run(resumed, KnownLengths(long_tail), 3, start=3)
    for a, b in zip(whole[3:], rest, strict=True):
        assert [(g.position, [r.token_ids for r in g.rows]) for g in a.trained] == [
            (g.position, [r.token_ids for r in g.rows]) for g in b.trained
        ]
    assert straight.state.state_dict() == resumed.state.state_dict()


def test_a_stop_string_split_by_a_segment_boundary_still_ends_the_row():
    settings = AsyncSettings(max_staleness=1, over_provision=0, segment_tokens=4)
    # "the text" completes at the row's 6th token (index 5), which the engine's second segment sees alone
    carry = CarryOver(settings, 1, 1, KnownLengths.BASE, stop_strings=lambda ids: 5 if len(ids) > 5 else None)
    generation = GenerationSettings(max_new_tokens=64, n_samples_per_prompt=1)
    outcome = carry.run(0, KnownLengths(lambda row: 20), generation, prompts)
    (row,) = outcome.trained[0].rows
    assert row.token_ids == [10, 11, 12, 13, 14, 15] and row.finish_reason == "stop"
